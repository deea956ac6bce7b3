"""Reading shards: `open_shard_splits` checks a shard dataset (warmstart.json, every chunk's size, each index.json)
and gives one `ShardReader` per split; a ShardReader returns samples by global index.

LitData stores and fetches (local folders are read in place; `s3://` chunks are downloaded into a size-capped local
cache); warmstart keeps its own order: the samplers address samples by global index, exactly as for folders, so a
shard run sees every sample once per epoch and resumes on any process count, the same way. Every chunk is checked
whole against warmstart.json (header, SHA-256) before a sample of it is used: local ones before training
(`check_chunks`), s3:// ones as they are downloaded. Every read checks the sample's CRC-32, so a damaged chunk is one
error naming it, not silently different pixels.
"""

import hashlib
import json
import os
import zlib
from bisect import bisect_right
from pathlib import Path

from warmstart import fileio
from warmstart.data import litdata_hooks, verified
from warmstart.data.shard_format import FIELDS, META, SPLITS, check_chunk, check_chunks, read_index, read_meta
from warmstart.data.shard_store import DEFAULT_CACHE_LIMIT, cache_folder, is_remote, parse_size, s3_config
from warmstart.errors import UserError, first_line


class ShardReader:
    """Samples of one split by global index. Opened lazily, in the process that reads (each data worker opens
    its own after the fork: LitData keeps file handles and download threads)."""

    def __init__(self, url: str, split: dict, classes: list[str], *, cache_dir: Path | None, cache_limit: str):
        self.url, self.cache_dir, self.cache_limit = url, cache_dir, cache_limit
        self.label = {c: i for i, c in enumerate(classes)}  # class name -> label (evaluate: the checkpoint's order)
        self.files = [c["file"] for c in split["chunks"]]
        self.records = {c["file"]: c for c in split["chunks"]}
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
            if isinstance(e.__cause__, UserError):  # a download refused by _check_download, in LitData's thread
                raise e.__cause__ from None
            raise UserError(f"shard chunk {self.chunk(index)} is unreadable ({type(e).__name__}: "
                            f"{first_line(str(e), 120)}); copy it again or write the shards again") from None

    def chunk(self, index: int) -> str:
        return f"{self.url.rstrip('/')}/{self.files[bisect_right(self.ends, index)]}"

    def _check_download(self, path: str, name: str) -> None:
        """A chunk LitData downloaded, before it is renamed into the cache (litdata_hooks removes a refused one)."""
        if name not in self.records:
            raise UserError(f"{self.url}/{name} is not a chunk {META} lists; refused")
        check_chunk(path, f"{self.url}/{name} (downloaded, then removed)", self.records[name])

    def _open(self, index: int) -> tuple:
        """Open LitData's dataset in this process; -> sample `index`, whose read builds LitData's cache."""
        lit = litdata_hooks.load()
        where, kw = self.url, {}
        if is_remote(self.url):
            if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):  # a loopback or in-cluster endpoint
                litdata_hooks.allow_http()
            litdata_hooks.check_downloads(str(self.cache_dir), self._check_download)
            # our own cache folder, holding the index.json open_shard_splits checked
            where = litdata_hooks.cache_dir(str(self.cache_dir), self.url)
            kw = {"max_cache_size": self.cache_limit,  # LitData's default: 1000 retries, for ever on a dead endpoint
                  "storage_options": {"config": s3_config(read_timeout=120)}}
        refusing = litdata_hooks.refusing_serializers(FIELDS)
        try:
            # batch_decode=0: decode the one sample asked for (its default decodes whole windows: ~5x slower here)
            self.ds = lit.StreamingDataset(where, batch_decode=0, serializers=refusing, **kw)
        except Exception as e:  # noqa: BLE001  (LitData's and the store's errors, to one line)
            raise UserError(f"cannot open the shards at {self.url} ({type(e).__name__}: "
                            f"{first_line(str(e), 160)})") from None
        litdata_hooks.fetch_whole_chunks(self.ds)  # before the first read, which builds LitData's cache
        first = self._read(index)
        listed = litdata_hooks.split_length(self.ds)
        if listed != self.n:
            raise UserError(f"{self.url}/index.json lists {listed} samples, {META} {self.n}; the shards were changed "
                            f"after writing: write them again")
        if is_remote(self.url):
            litdata_hooks.mmap_chunks(self.ds, len(self.files))
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


def _cache_index(cache: Path, split: str, index: str) -> None:
    """Put the checked index.json where LitData reads it, never the bucket's (which could change in between)."""
    try:
        fileio.write_text(cache / split / "index.json", index, durable=False)
    except OSError as e:
        raise UserError(f"cannot write to the shard cache {cache} ({e.strerror}); name another with "
                        f"--cache-dir") from None


def open_shard_splits(data: str, *, cache_dir=None, cache_limit: str = DEFAULT_CACHE_LIMIT, splits=SPLITS):
    """(classes, human names, {split: ShardReader}, a warning or None) of a shard folder or s3:// prefix, for those of
    `splits` it has: the warning says when the shards are unverified, or when --cache-limit cannot hold them."""
    limit = parse_size(cache_limit, "--cache-limit")
    doc = read_meta(data)
    url = data.rstrip("/") if is_remote(data) else str(Path(data).resolve())
    splits = [s for s in splits if s in doc["splits"]]
    indexes = {s: read_index(url, s, doc["splits"][s]) for s in splits}  # all small files first, then the chunks
    check_chunks(url, doc, splits)
    cache = cache_folder(url, json.dumps(doc, sort_keys=True), cache_dir) if is_remote(data) else None
    readers = {}
    for s in splits:
        if cache:
            _cache_index(cache, s, indexes[s])
        readers[s] = ShardReader(f"{url}/{s}", doc["splits"][s], doc["classes"], cache_dir=cache and cache / s,
                                 cache_limit=cache_limit)
    warnings = [verified.shards_warning(url, doc, META)]
    need = sum(c["bytes"] for rec in doc["splits"].values() for c in rec["chunks"])
    if is_remote(data) and need > limit:  # samples come in a random order: a chunk is wanted again within the epoch
        warnings.append(f"warning: --cache-limit {cache_limit} is below the {fileio.human(need)} of these shards: "
                        f"chunks will be downloaded again and again; raise it (disk space allowing)")
    return doc["classes"], doc.get("human"), readers, "\n".join(w for w in warnings if w) or None


def val_reader(data: str, classes: list[str], *, cache_dir=None, cache_limit: str = DEFAULT_CACHE_LIMIT) -> ShardReader:
    """The val split of shards, labelled in `classes` order (a checkpoint's): matched by class name."""
    theirs, _, readers, _ = open_shard_splits(data, cache_dir=cache_dir, cache_limit=cache_limit, splits=["val"])
    if "val" not in readers:
        raise UserError(f"{data} has no val shards to evaluate on")
    unknown = [c for c in theirs if c not in classes]
    if unknown:
        raise UserError(f"{data} has classes the checkpoint does not know: {', '.join(unknown[:5])}; evaluate on data "
                        f"with the checkpoint's classes ({len(classes)})")
    readers["val"].label = {c: i for i, c in enumerate(classes)}
    return readers["val"]
