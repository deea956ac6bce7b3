"""The shard format: what `warmstart prepare --shards OUT` writes, and the checks a reader makes before trusting it.

Layout (OUT may be copied to a shared file system or an object store as it is):

    OUT/warmstart.json           classes, counts per class, every chunk's size and SHA-256, how it was made
    OUT/train/index.json         LitData's index of the split (chunk files and sample counts)
    OUT/train/chunk-0-N.bin      samples: (the image file's bytes as stored, class name, file name, CRC-32 of the bytes)
    OUT/val/...                  the same for the validation split

`read_meta` checks warmstart.json field by field, `read_index` index.json against exactly what SplitWriter writes
(its data_format picks LitData's deserializers, pickle among them), `check_chunks` every chunk's stored size and,
for local chunks, `check_chunk`: its header and SHA-256 (s3:// chunks get `check_chunk` as they are downloaded).
"""

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from warmstart.data.shard_store import hashed_chunks, is_remote, read_text, stored_sizes
from warmstart.errors import UserError
from warmstart.fields import whole_number
from warmstart.fileio import human
from warmstart.untrusted import parse_json

FORMAT = "warmstart-shards/1"
META = "warmstart.json"
SPLITS = ("train", "val")
CHUNK_NAME = re.compile(r"chunk-[0-9]+-[0-9]+\.bin")  # as LitData's writer names them: no folders, no ".."
SHA256 = re.compile(r"[0-9a-f]{64}")
FIELDS = ["bytes", "str", "str", "int"]  # a sample: image bytes, class name, file name, CRC-32
_LEAF = {"type": None, "context": None, "children_spec": []}
# index.json's config as SplitWriter writes it (LitData 0.2.76), chunk_bytes aside. The reader refuses any other:
# its data_format picks LitData's deserializers, and "pickle" among them would run code a shard's author chose.
INDEX_CONFIG = {"chunk_size": None, "compression": None, "compression_batch_size": None, "compression_level": None,
                "data_format": FIELDS, "encryption": None, "ipc_compression": None, "item_loader": "PyTreeLoader",
                "types": "json", "data_spec": [1, {"type": "builtins.tuple", "context": "null",
                                                   "children_spec": [_LEAF] * 4}]}


def is_shards(data) -> bool:
    """Whether --data names shards: an s3:// URL, or a folder holding warmstart.json."""
    return is_remote(data) or (Path(data) / META).is_file()


def _problem(doc: dict) -> str | None:
    """What is wrong with a parsed warmstart.json of our format, or None: everything the readers rely on."""
    classes, splits = doc["classes"], doc["splits"]
    if not all(isinstance(c, str) and c for c in classes) or classes != sorted(set(classes)):
        return "classes must be distinct names in sorted order"
    human = doc.get("human")
    if human is not None and not (isinstance(human, list) and len(human) == len(classes)
                                  and all(isinstance(h, str) for h in human)):
        return "human must be null or one name per class"
    if not splits or not set(splits) <= set(SPLITS):
        return f"splits must be {' and/or '.join(SPLITS)}"
    held = set()
    for name, rec in splits.items():
        counts = rec.get("classes") if isinstance(rec, dict) else None
        if not isinstance(counts, dict) or not all(whole_number(v, 1) for v in counts.values()):
            return f"{name}: classes must map class names to image counts"
        chunks = rec.get("chunks")
        if not isinstance(chunks, list) or not chunks or not all(
                isinstance(c, dict) and isinstance(c.get("file"), str) and CHUNK_NAME.fullmatch(c["file"])
                and whole_number(c.get("samples"), 1) and whole_number(c.get("bytes"), 1)
                and isinstance(c.get("sha256"), str) and SHA256.fullmatch(c["sha256"]) for c in chunks):
            return f"{name}: chunks must list files named chunk-N-M.bin with their sample and byte counts and SHA-256"
        # a chunk's header holds a uint32 offset per sample: counts its bytes cannot hold are refused here, before
        # anything is sized by them (a sampler's permutation of 10^9 declared samples is 8 GB)
        big = next((c for c in chunks if 4 * (c["samples"] + 2) > c["bytes"]), None)
        if big:
            return f"{name}: {big['file']} declares {big['samples']:,} samples, more than {big['bytes']:,} bytes hold"
        if len({c["file"] for c in chunks}) != len(chunks):
            return f"{name}: a chunk file is listed twice"
        if not rec.get("images") == sum(c["samples"] for c in chunks) == sum(counts.values()):
            return f"{name}: its image count, chunk sample counts and class counts disagree"
        held |= set(counts)
    if held != set(classes):
        return "classes is not the set of classes the splits hold"
    return None


def read_meta(data: str) -> dict:
    """warmstart.json of a shard folder or s3:// prefix, checked; one line for anything else."""
    where = f"{data.rstrip('/')}/{META}" if is_remote(data) else Path(data) / META
    doc = parse_json(read_text(data, META), where)
    if not (doc.get("format") == FORMAT and isinstance(doc.get("classes"), list)
            and isinstance(doc.get("splits"), dict)):
        raise UserError(f"{where} is not a warmstart shard description ({FORMAT}); write shards with "
                        f"`warmstart prepare --shards`")
    problem = _problem(doc)
    if problem:
        raise UserError(f"{where} is damaged or was edited ({problem}); write the shards again")
    return doc


def read_index(url: str, split: str, rec: dict) -> str:
    """LitData's index.json of one split, checked against what SplitWriter writes and what warmstart.json lists
    (same chunk files, same sample counts) before LitData reads any of it; -> its text."""
    text, where = read_text(f"{url}/{split}", "index.json"), f"{url}/{split}/index.json"
    index = parse_json(text, where)
    try:
        config = dict(index["config"])
        config["data_spec"] = parse_json(config["data_spec"], f"{where} (its data_spec)", list)
        chunks = [(c["filename"], c["chunk_size"]) for c in index["chunks"]]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{where} is not LitData's index of a shard split; write the shards again") from None
    if {k: v for k, v in config.items() if k != "chunk_bytes"} != INDEX_CONFIG:
        raise UserError(f"{where} is not what `warmstart prepare --shards` writes (samples of {', '.join(FIELDS)}, "
                        f"uncompressed, unencrypted); refused: its format would choose how samples are decoded")
    if chunks != [(c["file"], c["samples"]) for c in rec["chunks"]]:
        raise UserError(f"{where} lists other chunks than {META}; the shards were changed after writing: write them "
                        f"again")
    return text


def file_digest(path, algorithm: str = "sha256") -> str:
    """The hex digest of a file, read in 4 MiB blocks (hashlib.file_digest is Python 3.11+)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def check_chunk(path, where: str, chunk: dict) -> None:
    """The chunk file at `path` is the one warmstart.json lists (`chunk`), or one line naming `where`: its size; its
    header (LitData's: a uint32 sample count, then a uint32 offset per sample and one for the end) against the count
    index.json and warmstart.json declare, before LitData reads any of it; then the SHA-256 of the whole file (a
    same-size swap passes every other check)."""
    n, size = chunk["samples"], os.path.getsize(path)
    if size != chunk["bytes"]:
        raise UserError(f"shard chunk {where} holds {size:,} bytes, not the {chunk['bytes']:,} written; copy it again "
                        f"or write the shards again")
    with open(path, "rb") as f:  # never more than the file holds: `n` is what is being checked
        table = np.frombuffer(f.read(min(4 * (n + 2), size // 4 * 4)), "<u4").astype(np.int64)
    if len(table) != n + 2 or table[0] != n or table[1] != 4 * (n + 2) or (np.diff(table[1:]) < 0).any() \
            or table[-1] > size:
        said = f"it says {table[0]:,}" if len(table) and table[0] != n else f"its offsets do not fit its {size:,} bytes"
        raise UserError(f"shard chunk {where}: its header does not match the {n:,} samples {META} and index.json "
                        f"declare ({said}); the shards were changed after writing: write them again")
    if file_digest(path) != chunk["sha256"]:
        raise UserError(f"shard chunk {where} is not the chunk written there: its SHA-256 is not the one {META} "
                        f"records; it was changed or swapped after writing: copy it again or write the shards again")


def check_chunks(url: str, doc: dict, splits=SPLITS) -> None:
    """Every chunk of `splits` that warmstart.json lists is there at the size written, before any process waits for
    one (LitData waits minutes for a chunk that is missing or short, then fails inside a data worker). Local chunks are
    then checked whole (`check_chunk`) here, in one process before the loaders fork, once per machine: chunks whose
    file and record are unchanged since a check are remembered (shard_store.hashed_chunks)."""
    sizes = stored_sizes(url)
    listed = [(s, c) for s in splits if s in doc["splits"] for c in doc["splits"][s]["chunks"]]
    for split, c in listed:
        have = sizes.get(f"{split}/{c['file']}")
        if have != c["bytes"]:
            state = "is missing" if have is None else f"holds {have:,} bytes, not the {c['bytes']:,} written"
            raise UserError(f"shard chunk {url}/{split}/{c['file']} {state}; copy it again or write the shards "
                            f"again")
    if is_remote(url):
        return  # each is checked as it is downloaded, before it enters the cache (shard_reader)
    with hashed_chunks(url) as seen:
        todo = []
        for split, c in listed:
            path = Path(url) / split / c["file"]
            st = path.stat()  # taken before hashing: a file changed meanwhile is hashed again next time
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, c["sha256"], c["samples"]]
            if seen.get(f"{split}/{c['file']}") != stamp:
                todo.append((path, f"{split}/{c['file']}", c, stamp))
        total = sum(c["bytes"] for _, _, c, _ in todo)
        if total >= 10**9:  # minutes at disk speed: say why the start waits
            print(f"checking the SHA-256 of {len(todo)} shard chunks ({human(total)}) in {url}, once on this machine",
                  flush=True)
        for path, key, c, stamp in todo:
            check_chunk(path, str(path), c)
            seen[key] = stamp
