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
import zlib
from bisect import bisect_right
from pathlib import Path

from warmstart import __version__, fileio
from warmstart.errors import UserError
from warmstart.options import DEFAULT_CACHE_LIMIT

FORMAT = "warmstart-shards/1"
META = "warmstart.json"
SPLITS = ("train", "val")
DEFAULT_CHUNK_BYTES = "64MB"


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


def read_meta(data: str) -> dict:
    """warmstart.json of a shard folder or s3:// prefix, checked; one line for anything else."""
    if is_remote(data):
        bucket, prefix = _s3_parts(data)
        litdata()  # and with it boto3
        import boto3
        import botocore.exceptions

        try:
            body = boto3.client("s3").get_object(Bucket=bucket, Key=prefix + META)["Body"]
            text = body.read().decode()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise UserError(f"--data {data}: cannot read {META} ({str(e).splitlines()[0][:200]}); check the URL, "
                            f"AWS credentials and AWS_ENDPOINT_URL") from None
        where = f"{data.rstrip('/')}/{META}"
    else:
        where = Path(data) / META
        try:
            text = where.read_text()
        except OSError as e:
            raise UserError(f"cannot read {where} ({e.strerror})") from None
    try:
        doc = json.loads(text)
        ok = doc.get("format") == FORMAT and isinstance(doc.get("classes"), list) and isinstance(doc.get("splits"), dict)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{where} is not a warmstart shard description ({FORMAT}); write shards with "
                        f"`warmstart prepare --shards`")
    return doc


class ShardReader:
    """Samples of one split by global index. Opened lazily, in the process that reads (each data worker opens
    its own after the fork: LitData keeps file handles and download threads)."""

    def __init__(self, url: str, split: dict, classes: list[str], *, cache_dir: Path | None, cache_limit: str):
        self.url, self.cache_dir, self.cache_limit = url, cache_dir, cache_limit
        self.label = {c: i for i, c in enumerate(classes)}  # class name -> label (evaluate: the checkpoint's order)
        self.files = [c["file"] for c in split["chunks"]]
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

    def _open(self, index: int):
        lit = litdata()
        if is_remote(self.url) and os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
            lit.streaming.downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"  # a loopback or in-cluster endpoint (MinIO)
        kw = {}
        if is_remote(self.url):
            import botocore.config  # LitData's default, 1000 adaptive retries, waits for ever on a dead endpoint

            kw = {"cache_dir": str(self.cache_dir), "max_cache_size": self.cache_limit,
                  "storage_options": {"config": botocore.config.Config(
                      retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=120)}}
        # batch_decode=0: decode the one sample asked for (its default decodes whole windows: ~5x slower here)
        self.ds = lit.StreamingDataset(self.url, batch_decode=0, **kw)
        # whole chunks into the cache, one request each, instead of LitData's default for indexing: one ranged
        # request per sample, which is the small-files problem again (set before the first read: LitData reads it
        # when it builds its cache)
        self.ds._on_demand_bytes = False
        self._read(index)  # LitData builds its cache on the first read
        # the cache's length is the whole split's; the dataset's own len() is this rank's share under torchrun
        if len(self.ds.cache) != self.n:
            raise UserError(f"{self.url}/index.json lists {len(self.ds.cache)} samples, {META} {self.n}; the shards "
                            f"were changed after writing: write them again")
        if is_remote(self.url):  # downloaded chunks memory-mapped, not read whole for every sample
            self.ds.cache._reader.enable_mmap_for_chunks(set(range(len(self.files))))

    def __getitem__(self, index: int) -> tuple[bytes, int, str]:
        if self.pid != os.getpid():  # first read in this process (a forked worker must not share its parent's)
            self._open(index)
            self.pid = os.getpid()
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
    for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
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


def cache_folder(url: str, cache_dir: Path | None) -> Path:
    """Where chunks of an s3:// dataset are cached: --cache-dir, else one folder per URL under warmstart's cache."""
    from warmstart.data.folder import cache_dir as base

    if cache_dir:
        return Path(cache_dir).expanduser()
    return base() / "shards" / hashlib.sha1(url.rstrip("/").encode()).hexdigest()[:16]


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as LitData reads them


def parse_size(text: str, flag: str) -> int:
    """'64MB' -> 64_000_000; one line for anything else."""
    t = str(text).strip().upper()
    number = t.rstrip("KMGTB")
    try:
        value = float(number) * UNITS[t[len(number):]]
    except (ValueError, KeyError):
        value = 0
    if value < 1:
        raise UserError(f"{flag} {text}: expected a size such as 500MB or 20GB")
    return int(value)


def load_splits(data: str, *, cache_dir=None, cache_limit: str = DEFAULT_CACHE_LIMIT):
    """(classes, human names, {split: ShardReader}, a warning when unverified) of a shard folder or s3:// prefix."""
    limit = parse_size(cache_limit, "--cache-limit")
    doc = read_meta(data)
    url = data.rstrip("/") if is_remote(data) else str(Path(data).resolve())
    check_chunks(url, doc)
    cache = cache_folder(url, cache_dir) if is_remote(data) else None
    readers = {s: ShardReader(f"{url}/{s}", doc["splits"][s], doc["classes"], cache_dir=cache and cache / s,
                              cache_limit=cache_limit) for s in SPLITS if s in doc["splits"]}
    reasons = "; ".join(doc.get("unverified_reasons") or ["not verified"])
    warnings = [] if doc.get("verified") else [f"warning: training on unverified shards ({reasons}); see {url}/{META}"]
    need = sum(c["bytes"] for rec in doc["splits"].values() for c in rec["chunks"])
    if is_remote(data) and need > limit:  # samples come in a random order: a chunk is wanted again within the epoch
        warnings.append(f"warning: --cache-limit {cache_limit} is below the {need / 1e9:.1f} GB of these shards: "
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
