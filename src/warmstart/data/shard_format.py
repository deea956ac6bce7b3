"""The shard format: what `warmstart prepare --shards OUT` writes, and the checks a reader makes before trusting it.

Layout (OUT may be copied to a shared file system or an object store as it is):

    OUT/warmstart.json           classes, counts per class, every chunk's size and SHA-256, how it was made
    OUT/train/index.json         LitData's index of the split (chunk files and sample counts)
    OUT/train/chunk-0-N.bin      samples: (the image file's bytes as stored, class name, file name, CRC-32 of the bytes)
    OUT/val/...                  the same for the validation split

`read_meta` checks warmstart.json field by field, `read_index` index.json against exactly what SplitWriter writes
(its data_format picks LitData's deserializers, pickle among them), `check_chunks` every chunk's stored size.
"""

import json
import re
from pathlib import Path

from warmstart.data.shard_store import is_remote, read_text, stored_sizes
from warmstart.errors import UserError
from warmstart.fields import whole_number

FORMAT = "warmstart-shards/1"
META = "warmstart.json"
SPLITS = ("train", "val")
CHUNK_NAME = re.compile(r"chunk-[0-9]+-[0-9]+\.bin")  # as LitData's writer names them: no folders, no ".."
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
                and whole_number(c.get("samples"), 1) and whole_number(c.get("bytes"), 1) for c in chunks):
            return f"{name}: chunks must list files named chunk-N-M.bin with their sample and byte counts"
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
    text = read_text(data, META)
    try:
        doc = json.loads(text)
        ok = doc.get("format") == FORMAT and isinstance(doc.get("classes"), list) and isinstance(doc.get("splits"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
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
    try:
        index = json.loads(text)
        config = dict(index["config"])
        config["data_spec"] = json.loads(config["data_spec"])
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


def check_chunks(url: str, doc: dict) -> None:
    """Every chunk warmstart.json lists is there at the size written, before any process waits for one (LitData
    waits minutes for a chunk that is missing or short, then fails inside a data worker)."""
    sizes = stored_sizes(url)
    for split, rec in doc["splits"].items():
        for c in rec["chunks"]:
            have = sizes.get(f"{split}/{c['file']}")
            if have != c["bytes"]:
                state = "is missing" if have is None else f"holds {have:,} bytes, not the {c['bytes']:,} written"
                raise UserError(f"shard chunk {url}/{split}/{c['file']} {state}; copy it again or write the shards "
                                f"again")
