"""Where shards are stored: a local folder or an `s3://` prefix. Reading a small file and listing stored sizes from
either, the S3 client's bounded retries, and the local chunk cache (its folder and its size limit)."""

import hashlib
from pathlib import Path

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


def read_text(url: str, name: str) -> str:
    """The text of url/name, a local path or an s3:// object; one line when it cannot be read."""
    if not is_remote(url):
        try:
            return (Path(url) / name).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {Path(url) / name} ({getattr(e, 'strerror', None) or e})") from None
    bucket, prefix = s3_parts(url)
    litdata_hooks.load()  # and with it boto3
    import boto3
    import botocore.exceptions

    try:
        body = boto3.client("s3", config=s3_config()).get_object(Bucket=bucket, Key=prefix + name)["Body"]
        return body.read().decode()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, UnicodeDecodeError) as e:
        raise UserError(f"--data {url}: cannot read {name} ({first_line(e, 200)}); check the URL, "
                        f"AWS credentials and AWS_ENDPOINT_URL") from None


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
    key = hashlib.sha1(f"{url.rstrip('/')}\n{meta}".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / key if cache_dir else warmstart_cache() / "shards" / key


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
