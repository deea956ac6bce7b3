"""Where shards are stored: a local folder or an `s3://` prefix. Reading a small file and listing stored sizes from
either, the S3 client's bounded retries, the local chunk cache (its folder and its size limit), and the record of
local chunks already hashed on this machine."""

import contextlib
import fcntl
import hashlib
import json
from pathlib import Path

from warmstart import fileio, untrusted
from warmstart.data import litdata_hooks
from warmstart.data.folder import cache_dir as warmstart_cache
from warmstart.errors import UserError, first_line

DEFAULT_CACHE_LIMIT = "50GB"  # --cache-limit: the most the chunk cache of s3:// shards may hold
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as LitData reads them


def is_remote(data) -> bool:
    return str(data).startswith("s3://")


def s3_parts(url: str) -> tuple[str, str]:
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


def read_text(url: str, name: str, limit: int = untrusted.MAX_BYTES) -> str:
    """The text of url/name, a local path or an s3:// object, of at most `limit` bytes (the shards' author chose its
    size); one line when it cannot be read."""
    if not is_remote(url):
        return untrusted.read_text(Path(url) / name, name, limit)
    bucket, prefix = s3_parts(url)
    litdata_hooks.load()  # and with it boto3
    import boto3
    import botocore.exceptions

    try:
        body = boto3.client("s3", config=s3_config()).get_object(Bucket=bucket, Key=prefix + name)["Body"]
        data = body.read(limit + 1)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise UserError(f"--data {url}: cannot read {name} ({first_line(e, 200)}); check the URL, "
                        f"AWS credentials and AWS_ENDPOINT_URL") from None
    return untrusted.text_of(data, f"{url}/{name}", name, limit)


def stored_sizes(url: str) -> dict[str, int]:
    """{path under url: bytes} of every file stored there (one listing per 1,000 objects on S3)."""
    if not is_remote(url):
        root = Path(url)
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.glob("*/*") if p.is_file()}
    import boto3

    bucket, prefix = s3_parts(url)
    sizes = {}
    pages = boto3.client("s3", config=s3_config()).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                            Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            sizes[obj["Key"][len(prefix):]] = obj["Size"]
    return sizes


def cache_folder(url: str, meta: str, cache_dir: Path | None) -> Path:
    """Where chunks of an s3:// dataset are cached: a folder named after the URL and its warmstart.json (shards
    written again at the same URL get a fresh folder, never stale chunks), under --cache-dir or warmstart's cache."""
    # "sha256-checked": chunks cached before downloads were hashed are never taken for checked ones
    key = hashlib.sha1(f"{url.rstrip('/')}\n{meta}\nsha256-checked".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / key if cache_dir else warmstart_cache() / "shards" / key


@contextlib.contextmanager
def hashed_chunks(url: str):
    """{split/file: stamp} of the local chunks of shards at `url` whose SHA-256 this machine already checked: a small
    JSON under warmstart's cache, so a second run pays nothing. Held under a lock: the processes of one run (torchrun
    ranks) wait for the first to hash, then find every chunk checked. Saved on leaving, also after a refusal."""
    path = warmstart_cache() / "hashed" / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError:  # a read-only cache: every run hashes
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            seen = untrusted.read_json(path, "hashed-chunks record") if path.is_file() else {}
        except UserError:
            seen = {}  # a damaged cache costs one more hashing, nothing else
        before = dict(seen)
        try:
            yield seen
        finally:
            if seen != before:
                with contextlib.suppress(OSError, UserError):
                    fileio.write_text(path, json.dumps(seen), durable=False)


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
