"""data/litdata_hooks.py against the installed LitData: one test per private name warmstart relies on, so an upgrade
that moves or changes one fails the test named after it (pinned: litdata==0.2.76)."""

import json
import zlib

import pytest

pytest.importorskip("litdata", reason="needs litdata, from the shards extra (pip install -e '.[test]')")

from warmstart.data import litdata_hooks  # noqa: E402
from warmstart.data.shard_format import FIELDS  # noqa: E402
from warmstart.errors import UserError  # noqa: E402

SAMPLES = [(bytes([i]) * (100 + i), f"c{i % 2}", f"{i}.jpg") for i in range(6)]


def write_split(folder):
    writer = litdata_hooks.binary_writer(folder, "300B")  # a few samples a chunk: several chunks
    for i, (data, cls, name) in enumerate(SAMPLES):
        writer.add_item(i, (data, cls, name, zlib.crc32(data)))
    litdata_hooks.finish_writer(writer)
    return folder


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("split"))


def open_split(folder):
    lit = litdata_hooks.load()
    return lit.StreamingDataset(str(folder), batch_decode=0, serializers=litdata_hooks.refusing_serializers(FIELDS))


def test_hook_streaming_writer_BinaryWriter_and_StringSerializer(tmp_path):
    # A string that names an existing file is stored as the string, not as that file's contents.
    (tmp_path / "c0").write_text("a file's contents")
    folder = tmp_path / "split"
    folder.mkdir()
    writer = litdata_hooks.binary_writer(folder, "1MB")
    writer.add_item(0, (b"x", str(tmp_path / "c0"), "0.jpg", zlib.crc32(b"x")))
    litdata_hooks.finish_writer(writer)
    assert tuple(open_split(folder)[0])[1] == str(tmp_path / "c0")


def test_hook__merge_no_wait(split):
    # index.json written by one writer alone, listing every chunk and sample, in the format shard_format checks
    index = json.loads((split / "index.json").read_text())
    assert sum(c["chunk_size"] for c in index["chunks"]) == len(SAMPLES) and len(index["chunks"]) > 1
    assert index["config"]["data_format"] == FIELDS
    assert not list(split.glob("0.index.json"))


def test_hook_serializers__SERIALIZERS():
    refused = litdata_hooks.refusing_serializers(FIELDS)
    assert "pickle" in refused and not set(FIELDS) & set(refused)
    with pytest.raises(UserError, match="names a data format"):
        refused["pickle"].deserialize(b"anything")


def test_hook_downloader__OBSTORE_CLIENT_OPTIONS(monkeypatch):
    downloader = litdata_hooks.load().streaming.downloader
    monkeypatch.setattr(downloader, "_OBSTORE_CLIENT_OPTIONS", dict(downloader._OBSTORE_CLIENT_OPTIONS))
    litdata_hooks.allow_http()
    assert downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] == "true"
    # and LitData still builds its obstore client with that dict
    import inspect
    assert "client_options=_OBSTORE_CLIENT_OPTIONS" in inspect.getsource(downloader)


def test_hook_resolver_Dir(tmp_path):
    d = litdata_hooks.cache_dir(str(tmp_path), "s3://bucket/prefix/train")
    assert (d.path, d.url) == (str(tmp_path), "s3://bucket/prefix/train")


def test_hook__on_demand_bytes(split):
    ds = open_split(split)
    litdata_hooks.fetch_whole_chunks(ds)
    ds[0]  # the first read builds the cache with the setting
    assert ds.cache._reader.on_demand_bytes is False


def test_hook_cache_len(split):
    ds = open_split(split)
    data, cls, name, crc = ds[3]
    assert (bytes(data), cls, name, crc) == (*SAMPLES[3], zlib.crc32(SAMPLES[3][0]))
    assert litdata_hooks.split_length(ds) == len(SAMPLES)


def test_hook_cache__reader_enable_mmap_for_chunks(split):
    ds = open_split(split)
    ds[0]
    chunks = len(json.loads((split / "index.json").read_text())["chunks"])
    litdata_hooks.mmap_chunks(ds, chunks)
    assert [bytes(ds[i][0]) for i in range(len(SAMPLES))] == [d for d, _, _ in SAMPLES]  # still reads, mapped


def test_hook_Downloader__publish_file(tmp_path):
    # every S3 download ends in _publish_file(tmp, destination): boto3 or obstore, whole or in ranges, sync or async
    import inspect

    downloader = litdata_hooks.load().streaming.downloader
    assert "self._publish_file(tmp_path, local_filepath)" in inspect.getsource(downloader.S3Downloader.download_file)
    assert inspect.getsource(downloader._obstore_adownload_file).count("downloader._publish_file(tmp_path,") == 2

    def check(path, name):
        if name != "good.bin":
            raise UserError(f"refused {name}")

    cache = tmp_path / "cache"
    cache.mkdir()
    litdata_hooks.check_downloads(str(cache), check)
    d = downloader.get_downloader("s3://bucket/x/train", str(cache), [])  # registered for s3://: ours
    for name in ("good.bin", "bad.bin"):
        (cache / f"{name}.tmp.1").write_bytes(b"x")
    d._publish_file(str(cache / "good.bin.tmp.1"), str(cache / "good.bin"))
    with pytest.raises(UserError, match="refused bad.bin"):
        d._publish_file(str(cache / "bad.bin.tmp.1"), str(cache / "bad.bin"))
    assert sorted(p.name for p in cache.iterdir()) == ["good.bin"]  # the refused download removed
    other = downloader.get_downloader("s3://bucket/y/train", str(tmp_path / "elsewhere"), [])
    (tmp_path / "t").write_bytes(b"x")
    with pytest.raises(UserError, match="did not ask for"):  # a cache folder warmstart did not name
        other._publish_file(str(tmp_path / "t"), str(tmp_path / "elsewhere.bin"))


def test_hook_PrepareChunksThread__report_crash(tmp_path, capsys):
    # a refusal ends LitData's download thread (run() keeps it for the waiting read, raised `from` it, and reports
    # it): quiet for a UserError, which shard_reader shows as one line
    import inspect

    streaming = litdata_hooks.load().streaming
    litdata_hooks.check_downloads(str(tmp_path), lambda path, name: None)
    run = inspect.getsource(streaming.reader.PrepareChunksThread.run)
    assert "self._error = exc" in run and "self._report_crash(exc)" in run
    assert ") from err" in inspect.getsource(streaming.item_loader.BaseItemLoader._raise_if_prefetch_crashed)
    streaming.reader.PrepareChunksThread._report_crash(object(), UserError("refused"))
    assert capsys.readouterr().err == ""
