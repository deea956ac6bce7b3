"""Shards: a dataset as a few large files instead of a million small ones, in LitData's format.

Layout (what `warmstart prepare --shards OUT` writes; OUT may then be copied to a shared file system or an
object store as it is):

    OUT/warmstart.json           classes, counts per class, every chunk's size and SHA-256, how it was made
    OUT/train/index.json         LitData's index of the split (chunk files and sample counts)
    OUT/train/chunk-0-N.bin      samples: (the image file's bytes as stored, class name, file name, CRC-32 of the bytes)
    OUT/val/...                  the same for the validation split

LitData stores and fetches (local folders are read in place; `s3://` chunks are downloaded into a size-capped local
cache); warmstart keeps its own order: the samplers address samples by global index, exactly as for folders, so a
shard run sees every sample once per epoch and resumes on any process count, the same way. Every read checks the
sample's CRC-32, so a damaged chunk is one error naming it, not silently different pixels.
"""

import hashlib
import json
import logging
import os
import re
import zlib
from bisect import bisect_right
from pathlib import Path

from warmstart import fileio
from warmstart.version import __version__
from warmstart.errors import UserError
from warmstart.options import DEFAULT_CACHE_LIMIT
from warmstart.prepare.manifest import size

FORMAT = "warmstart-shards/1"
META = "warmstart.json"
SPLITS = ("train", "val")
DEFAULT_CHUNK_BYTES = "64MB"
CHUNK_NAME = re.compile(r"chunk-[0-9]+-[0-9]+\.bin")  # as LitData's writer names them: no folders, no ".."
FIELDS = ["bytes", "str", "str", "int"]  # a sample: image bytes, class name, file name, CRC-32
_LEAF = {"type": None, "context": None, "children_spec": []}
# index.json's config as SplitWriter writes it (LitData 0.2.76), chunk_bytes aside. The reader refuses any other:
# its data_format picks LitData's deserializers, and "pickle" among them would run code a shard's author chose.
INDEX_CONFIG = {"chunk_size": None, "compression": None, "compression_batch_size": None, "compression_level": None,
                "data_format": FIELDS, "encryption": None, "ipc_compression": None, "item_loader": "PyTreeLoader",
                "types": "json", "data_spec": [1, {"type": "builtins.tuple", "context": "null",
                                                   "children_spec": [_LEAF] * 4}]}


def is_remote(data) -> bool:
    return str(data).startswith("s3://")


def is_shards(data) -> bool:
    """Whether --data names shards: an s3:// URL, or a folder holding warmstart.json."""
    return is_remote(data) or (Path(data) / META).is_file()


def litdata():
    """LitData, or one line saying how to install it (an optional dependency: warmstart[shards])."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # it would ask PyPI for a newer version
    try:
        import litdata
        import litdata.streaming.downloader
        import litdata.streaming.resolver
        import litdata.streaming.serializers
        import litdata.streaming.writer
    except ImportError:
        raise UserError("shards need LitData: pip install 'warmstart[shards]'") from None
    logging.getLogger("litdata").setLevel(logging.ERROR)  # e.g. advice on cache sizes, printed by every worker
    return litdata


# --------------------------------------------------------------------------------------------------- writing

class SplitWriter:
    """One split's chunks, written in the order samples are added (LitData's BinaryWriter, one process)."""

    def __init__(self, folder: Path, chunk_bytes: str = DEFAULT_CHUNK_BYTES):
        streaming = litdata().streaming

        class PlainStr(streaming.serializers.StringSerializer):
            def can_serialize(self, data) -> bool:  # LitData's own stores the *file* a string names, if it exists
                return isinstance(data, str)

        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.count, self.bytes = folder, 0, 0
        self.classes: dict[str, int] = {}  # images per class name
        # a fresh folder each time: LitData's writer silently writes nothing where an index.json exists
        self.writer = streaming.writer.BinaryWriter(str(folder), chunk_bytes=chunk_bytes,
                                                    serializers={"str": PlainStr()})

    def add(self, name: str, data: bytes, cls: str) -> None:
        data = bytes(data)
        self.writer.add_item(self.count, (data, cls, name, zlib.crc32(data)))
        self.count += 1
        self.bytes += len(data)
        self.classes[cls] = self.classes.get(cls, 0) + 1

    def close(self) -> dict:
        """Flush the last chunk, write index.json; -> this split's record for warmstart.json, each chunk hashed as
        read back from disk (what a later check compares with)."""
        if self.count == 0:
            raise UserError(f"{self.folder}: no readable images for this split; nothing to write")
        self.writer.done()
        self.writer._merge_no_wait()  # 0.index.json -> index.json; merge() waits for WORLD_SIZE writers (torchrun)
        chunks = []
        for c in json.loads((self.folder / "index.json").read_text())["chunks"]:
            path = self.folder / c["filename"]
            chunks.append({"file": c["filename"], "samples": c["chunk_size"], "bytes": path.stat().st_size,
                           "sha256": sha256(path)})
        return {"images": self.count, "bytes": self.bytes, "classes": dict(sorted(self.classes.items())),
                "chunks": chunks}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_meta(out: Path, *, classes: list[str], human: list[str] | None, splits: dict, options: dict,
               unverified: list[str], notes: list[str], checksums: list[dict] = ()) -> dict:
    """OUT/warmstart.json, written last and atomically: its presence means the shards are complete."""
    doc = {
        "format": FORMAT,
        "tool": f"warmstart {__version__}",
        "classes": classes,
        "human": human,
        "options": options,
        "verified": not unverified,
        "unverified_reasons": list(unverified),
        "checksums": list(checksums),  # the archives', as prepared.json records them
        "chunk_sha256": "SHA-256 of each chunk file, read back from disk after writing",
        "splits": splits,
        "notes": notes,
    }
    fileio.write_text(out / META, json.dumps(doc, indent=1) + "\n")
    return doc


# --------------------------------------------------------------------------------------------------- reading

def _s3_parts(url: str) -> tuple[str, str]:
    """(bucket, key prefix: "" at the bucket's root, else ending in "/")."""
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"--data {url}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def s3_config(read_timeout: int = 15):
    """Bounded retries and timeouts: boto3's and LitData's defaults wait minutes on an endpoint that never answers."""
    import botocore.config

    return botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                                  read_timeout=read_timeout)


def read_text(url: str, name: str) -> str:
    """The text of url/name, a local path or an s3:// object; one line when it cannot be read."""
    if not is_remote(url):
        try:
            return (Path(url) / name).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {Path(url) / name} ({getattr(e, 'strerror', None) or e})") from None
    bucket, prefix = _s3_parts(url)
    litdata()  # and with it boto3
    import boto3
    import botocore.exceptions

    try:
        body = boto3.client("s3", config=s3_config()).get_object(Bucket=bucket, Key=prefix + name)["Body"]
        return body.read().decode()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, UnicodeDecodeError) as e:
        raise UserError(f"--data {url}: cannot read {name} ({str(e).splitlines()[0][:200]}); check the URL, "
                        f"AWS credentials and AWS_ENDPOINT_URL") from None


def _count(v, least: int = 0) -> bool:
    return type(v) is int and v >= least


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
        if not isinstance(counts, dict) or not all(_count(v, 1) for v in counts.values()):
            return f"{name}: classes must map class names to image counts"
        chunks = rec.get("chunks")
        if not isinstance(chunks, list) or not chunks or not all(
                isinstance(c, dict) and isinstance(c.get("file"), str) and CHUNK_NAME.fullmatch(c["file"])
                and _count(c.get("samples"), 1) and _count(c.get("bytes"), 1) for c in chunks):
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


def refusing_serializers() -> dict:
    """LitData's deserializers with every one warmstart's samples do not use replaced by a refusal: whatever an
    index.json says, a read never unpickles, loads tensors or writes files."""
    serializers = litdata().streaming.serializers

    class Refused(serializers.Serializer):
        def serialize(self, data):
            raise TypeError("not a warmstart shard field")

        def deserialize(self, data):
            raise UserError(f"a shard's index.json names a data format other than {', '.join(FIELDS)}; refused")

        def can_serialize(self, data) -> bool:
            return False

    return {k: Refused() for k in serializers._SERIALIZERS if k not in FIELDS}


class ShardReader:
    """Samples of one split by global index. Opened lazily, in the process that reads (each data worker opens
    its own after the fork: LitData keeps file handles and download threads)."""

    def __init__(self, url: str, split: dict, classes: list[str], *, cache_dir: Path | None, cache_limit: str):
        self.url, self.cache_dir, self.cache_limit = url, cache_dir, cache_limit
        self.label = {c: i for i, c in enumerate(classes)}  # class name -> label (evaluate: the checkpoint's order)
        self.files = [c["file"] for c in split["chunks"]]
        sums = " ".join(str(c.get("sha256")) for c in split["chunks"])
        self.fingerprint = hashlib.sha256(sums.encode()).hexdigest()[:16]  # a mid-epoch resume needs the same images
        self.ends, n = [], 0
        for c in split["chunks"]:
            n += c["samples"]
            self.ends.append(n)
        self.n, self.ds, self.pid = n, None, None

    def __len__(self):
        return self.n

    def _read(self, index: int) -> tuple:
        try:
            data, cls, name, crc = self.ds[index]
            return bytes(data), cls, name, crc
        except Exception as e:  # LitData's own errors for a damaged chunk (struct.error, RuntimeError, timeouts)
            raise UserError(f"shard chunk {self.chunk(index)} is unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); copy it again or write "
                            f"the shards again") from None

    def chunk(self, index: int) -> str:
        return f"{self.url.rstrip('/')}/{self.files[bisect_right(self.ends, index)]}"

    def _open(self, index: int) -> tuple:
        """Open LitData's dataset in this process; -> sample `index`, whose read builds LitData's cache."""
        lit = litdata()
        where, kw = self.url, {}
        if is_remote(self.url):
            if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):  # a loopback or in-cluster endpoint
                lit.streaming.downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
            # our own cache folder, holding the index.json load_splits checked: LitData's default layout is a folder
            # named by index.json's "updated_at", which the shards' author could point anywhere on this disk
            where = lit.streaming.resolver.Dir(path=str(self.cache_dir), url=self.url)
            kw = {"max_cache_size": self.cache_limit,  # LitData's default: 1000 retries, for ever on a dead endpoint
                  "storage_options": {"config": s3_config(read_timeout=120)}}
        try:
            # batch_decode=0: decode the one sample asked for (its default decodes whole windows: ~5x slower here)
            self.ds = lit.StreamingDataset(where, batch_decode=0, serializers=refusing_serializers(), **kw)
        except Exception as e:  # noqa: BLE001  (LitData's and the store's errors, to one line)
            raise UserError(f"cannot open the shards at {self.url} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
        # whole chunks into the cache, one request each, instead of LitData's default for indexing: one ranged
        # request per sample, which is the small-files problem again (set before the first read: LitData reads it
        # when it builds its cache)
        self.ds._on_demand_bytes = False
        first = self._read(index)  # LitData builds its cache on the first read
        # the cache's length is the whole split's; the dataset's own len() is this rank's share under torchrun
        if len(self.ds.cache) != self.n:
            raise UserError(f"{self.url}/index.json lists {len(self.ds.cache)} samples, {META} {self.n}; the shards "
                            f"were changed after writing: write them again")
        if is_remote(self.url):  # downloaded chunks memory-mapped, not read whole for every sample
            self.ds.cache._reader.enable_mmap_for_chunks(set(range(len(self.files))))
        return first

    def __getitem__(self, index: int) -> tuple[bytes, int, str]:
        if self.pid != os.getpid():  # first read in this process (a forked worker must not share its parent's)
            data, cls, name, crc = self._open(index)
            self.pid = os.getpid()
        else:
            data, cls, name, crc = self._read(index)
        if zlib.crc32(data) != crc:
            raise UserError(f"shard chunk {self.chunk(index)} is damaged: sample {index} ({name}) fails its CRC-32; "
                            f"copy the chunk again or write the shards again")
        if cls not in self.label:
            raise UserError(f"shard chunk {self.chunk(index)}: sample {index} ({name}) has class {cls!r}, which is not "
                            f"in {META}; the shards were changed after writing: write them again")
        return data, self.label[cls], name


def stored_sizes(url: str) -> dict[str, int]:
    """{path under url: bytes} of every file stored there (one listing per 1,000 objects on S3)."""
    if not is_remote(url):
        root = Path(url)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.glob("*/*") if p.is_file()}
    import boto3

    bucket, prefix = _s3_parts(url)
    sizes = {}
    pages = boto3.client("s3", config=s3_config()).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                            Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(prefix):]] = obj["Size"]
    return sizes


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


def cache_folder(url: str, meta: str, cache_dir: Path | None) -> Path:
    """Where chunks of an s3:// dataset are cached: a folder named after the URL and its warmstart.json (shards
    written again at the same URL get a fresh folder, never stale chunks), under --cache-dir or warmstart's cache."""
    from warmstart.data.folder import cache_dir as base

    key = hashlib.sha1(f"{url.rstrip('/')}\n{meta}".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / key if cache_dir else base() / "shards" / key


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as LitData reads them


def parse_size(text: str, flag: str) -> int:
    """'64MB' -> 64_000_000; one line for anything else."""
    t = str(text).strip().upper()
    number = t.rstrip("KMGTB")
    try:
        value = float(number) * UNITS[t[len(number):]]
    except (ValueError, KeyError):
        value = 0
    if not 1 <= value < 1e18:  # NaN and infinity too
        raise UserError(f"{flag} {text}: expected a size such as 500MB or 20GB")
    return int(value)


def load_splits(data: str, *, cache_dir=None, cache_limit: str = DEFAULT_CACHE_LIMIT):
    """(classes, human names, {split: ShardReader}, a warning when unverified) of a shard folder or s3:// prefix."""
    limit = parse_size(cache_limit, "--cache-limit")
    doc = read_meta(data)
    url = data.rstrip("/") if is_remote(data) else str(Path(data).resolve())
    check_chunks(url, doc)
    cache = cache_folder(url, json.dumps(doc, sort_keys=True), cache_dir) if is_remote(data) else None
    readers = {}
    for s in (s for s in SPLITS if s in doc["splits"]):
        index = read_index(url, s, doc["splits"][s])
        if cache:  # LitData reads this checked copy, never the bucket's (which could change in between)
            try:
                fileio.write_text(cache / s / "index.json", index, durable=False)
            except OSError as e:
                raise UserError(f"cannot write to the shard cache {cache} ({e.strerror}); name another with "
                                f"--cache-dir") from None
        readers[s] = ShardReader(f"{url}/{s}", doc["splits"][s], doc["classes"], cache_dir=cache and cache / s,
                                 cache_limit=cache_limit)
    reasons = "; ".join(doc.get("unverified_reasons") or ["not verified"])
    warnings = [] if doc.get("verified") else [f"warning: training on unverified shards ({reasons}); see {url}/{META}"]
    need = sum(c["bytes"] for rec in doc["splits"].values() for c in rec["chunks"])
    if is_remote(data) and need > limit:  # samples come in a random order: a chunk is wanted again within the epoch
        warnings.append(f"warning: --cache-limit {cache_limit} is below the {size(need)} of these shards: "
                        f"chunks will be downloaded again and again; raise it (disk space allowing)")
    warning = "\n".join(warnings) or None
    return doc["classes"], doc.get("human"), readers, warning


def val_reader(data: str, classes: list[str], *, cache_dir=None, cache_limit: str = DEFAULT_CACHE_LIMIT) -> ShardReader:
    """The val split of shards, labelled in `classes` order (a checkpoint's): matched by class name."""
    theirs, _, readers, _ = load_splits(data, cache_dir=cache_dir, cache_limit=cache_limit)
    if "val" not in readers:
        raise UserError(f"{data} has no val shards to evaluate on")
    unknown = [c for c in theirs if c not in classes]
    if unknown:
        raise UserError(f"{data} has classes the checkpoint does not know: {', '.join(unknown[:5])}; evaluate on data "
                        f"with the checkpoint's classes ({len(classes)})")
    readers["val"].label = {c: i for i, c in enumerate(classes)}
    return readers["val"]
