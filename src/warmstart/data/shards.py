"""Transitional: the names evaluate.py, bench.py and benchmarks/shards.py still import from here. Shards now live in
shard_format.py (the format and its checks), shard_writer.py, shard_reader.py, shard_store.py (local or s3://, the
chunk cache) and litdata_hooks.py; delete this file once those callers import from there."""

from warmstart.data.shard_format import is_shards  # noqa: F401
from warmstart.data.shard_reader import open_shard_splits as load_splits, val_reader  # noqa: F401
