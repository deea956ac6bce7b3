"""Every place warmstart reaches past LitData's public API, pinned to litdata==0.2.76 (pyproject's `shards` extra).

The shard modules call LitData only through these functions (and `load()`'s public `StreamingDataset`). Each one
names the private name it relies on and why; tests/test_litdata_hooks.py exercises each against the installed
LitData, so an upgrade that moves or changes one fails the test named after it.
"""

import contextlib
import logging
import os

from warmstart.errors import UserError

_CHECKS = {}  # cache folder of a split -> check(downloaded file, chunk file name), for check_downloads' downloader
_checking = False  # whether check_downloads' downloader is installed in this process (or the parent it forked from)


def load():
    """LitData with the internal modules the hooks use, or one line saying how to install it (an optional
    dependency: warmstart[shards])."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # it would ask PyPI for a newer version
    try:
        import litdata
        import litdata.streaming.downloader
        import litdata.streaming.reader
        import litdata.streaming.resolver
        import litdata.streaming.serializers
        import litdata.streaming.writer
    except ImportError:
        raise UserError("shards need LitData: pip install 'warmstart[shards]'") from None
    logging.getLogger("litdata").setLevel(logging.ERROR)  # e.g. advice on cache sizes, printed by every worker
    return litdata


def binary_writer(folder, chunk_bytes: str):
    """`litdata.streaming.writer.BinaryWriter` (its chunk writer, not exported at the top level) whose "str" fields
    go through a `litdata.streaming.serializers.StringSerializer` that stores the string itself: LitData's own
    stores the *file* a string names, if one exists."""
    streaming = load().streaming

    class PlainStr(streaming.serializers.StringSerializer):
        def can_serialize(self, data) -> bool:
            return isinstance(data, str)

    return streaming.writer.BinaryWriter(str(folder), chunk_bytes=chunk_bytes, serializers={"str": PlainStr()})


def finish_writer(writer) -> None:
    """Flush the last chunk and write index.json: `BinaryWriter._merge_no_wait()` turns 0.index.json into
    index.json; the public merge() waits for WORLD_SIZE writers, which under torchrun never come."""
    writer.done()
    writer._merge_no_wait()


def refusing_serializers(keep: list[str]) -> dict:
    """`litdata.streaming.serializers._SERIALIZERS` (the registry of deserializers an index.json's data_format picks
    from) with every name outside `keep` replaced by a `Serializer` that refuses: whatever an index.json says, a
    read never unpickles, loads tensors or writes files."""
    serializers = load().streaming.serializers

    class Refused(serializers.Serializer):
        def serialize(self, data):
            raise TypeError("not a warmstart shard field")

        def deserialize(self, data):
            raise UserError(f"a shard's index.json names a data format other than {', '.join(keep)}; refused")

        def can_serialize(self, data) -> bool:
            return False

    return {k: Refused() for k in serializers._SERIALIZERS if k not in keep}


def allow_http() -> None:
    """Let LitData's S3 client talk plain http (a loopback or in-cluster endpoint): the client options it builds
    every obstore store with, `litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS`, take no setting otherwise."""
    load().streaming.downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"


def cache_dir(path: str, url: str):
    """`litdata.streaming.resolver.Dir(path, url)`: LitData reads `url` through the folder `path` (ours, holding the
    index.json warmstart checked) instead of its default, a folder named by index.json's "updated_at", which the
    shards' author could point anywhere on this disk."""
    return load().streaming.resolver.Dir(path=path, url=url)


def fetch_whole_chunks(ds) -> None:
    """Whole chunks into the cache, one request each, instead of LitData's default for indexing: one ranged request
    per sample, which is the small-files problem again. `StreamingDataset._on_demand_bytes`, set before the first
    read (the public setter asserts a cache, which the first read builds, and LitData reads it then)."""
    ds._on_demand_bytes = False


def split_length(ds) -> int:
    """Samples in the whole split: `len(StreamingDataset.cache)`, built by the first read (the dataset's own len()
    is this rank's share under torchrun)."""
    return len(ds.cache)


def mmap_chunks(ds, count: int) -> None:
    """Memory-map downloaded chunks instead of reading them whole for every sample:
    `StreamingDataset.cache._reader.enable_mmap_for_chunks` (LitData calls it only when it iterates, which warmstart
    never asks of it: its samplers read by index)."""
    ds.cache._reader.enable_mmap_for_chunks(set(range(count)))


def check_downloads(cache: str, check) -> None:
    """Every chunk LitData downloads into the cache folder `cache` (one per split and warmstart.json) goes through
    `check(file, name)` (raising UserError) before it is renamed into place; a refused file is removed. An "s3://"
    downloader (LitData's public `register_downloader`) overriding `Downloader._publish_file`: the one step every
    download path ends in (boto3 or obstore, whole or in ranges, sync or async). A download into another folder is
    refused. A refusal ends LitData's download thread, whose `PrepareChunksThread._report_crash` would print a
    traceback: it stays quiet for a UserError, which the waiting read raises `from` it and shard_reader shows as one
    line."""
    global _checking
    _CHECKS[os.path.realpath(cache)] = check
    if _checking:
        return
    streaming = load().streaming

    class CheckedS3(streaming.downloader.S3Downloader):
        def _publish_file(self, tmp_path: str, local_filepath: str) -> None:
            check = _CHECKS.get(os.path.realpath(self._cache_dir))
            try:
                if check is None:
                    raise UserError(f"{self._remote_dir}: a download warmstart did not ask for; refused")
                check(tmp_path, os.path.basename(local_filepath))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp_path)
                raise
            super()._publish_file(tmp_path, local_filepath)

    streaming.downloader.register_downloader("s3://", CheckedS3, overwrite=True)
    thread = streaming.reader.PrepareChunksThread
    report = thread._report_crash

    def _report_crash(self, exc):
        if not isinstance(exc, UserError):
            report(self, exc)

    thread._report_crash = _report_crash
    _checking = True
