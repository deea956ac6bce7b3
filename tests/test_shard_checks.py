"""Issue 23: shards and dataset records are data someone may have sent. Each chunk is checked whole (header, SHA-256)
before a sample of it is used, once per machine; declared counts are checked before anything is sized by them; a
record nested 200,000 deep is one line."""

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

import s3server
from synth import QUICK, TINY, make_image_folder
from test_shards import error_line, needs, one_line, prepare_shards
from warmstart.data import shard_format, shard_reader, sources
from warmstart.data.folder import cache_dir, index_folder
from warmstart.data.shard_format import META
from warmstart.prepare import extract

DEEP = "[" * 200_000


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A small folder and its shards (several chunks per split), copied by each test before it tampers."""
    root = tmp_path_factory.mktemp("checks")
    data = make_image_folder(root / "data", classes=2, train_per_class=6, val_per_class=3, size=32)
    prepare_shards(data, root / "shards", "--chunk-bytes", "4KB")
    return data, root / "shards"


@pytest.fixture()
def shards(made, tmp_path):
    shutil.copytree(made[1], tmp_path / "shards")
    return tmp_path / "shards"


def meta(shards: Path) -> dict:
    return json.loads((shards / META).read_text())


def train_cmd(data, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "warmstart", "train", str(data), *TINY, *QUICK, "-b", "4", "--epochs", "1",
            "--out", str(run), *extra]


def rebuild_from_val(made, shards: Path, which: int) -> Path:
    """Train chunk `which` rebuilt from validation images, at its byte size and sample count: labelled as train
    classes, each with its own CRC-32, LitData's layout, zeros after the last sample (which readers never reach).
    The chunk's size, header and every sample's CRC hold: only its SHA-256 tells."""
    from warmstart.data import litdata_hooks

    rec = meta(shards)["splits"]["train"]["chunks"][which]
    chunk = shards / "train" / rec["file"]
    out = shards.parent / f"{shards.name}-rebuilt"
    writer = litdata_hooks.binary_writer(out, "1GB")
    for i, path in enumerate(sorted((made[0] / "val").rglob("*.jpg"))[:rec["samples"]]):
        buf = io.BytesIO()
        with Image.open(path) as img:
            img.resize((24, 24)).save(buf, "JPEG", quality=50)  # smaller than any train image: room to pad
        data = buf.getvalue()
        writer.add_item(i, (data, "c00", f"train_0_{i}.jpg", zlib.crc32(data)))
    litdata_hooks.finish_writer(writer)
    data = (out / "chunk-0-0.bin").read_bytes()
    assert len(data) < rec["bytes"]
    chunk.write_bytes(data + bytes(rec["bytes"] - len(data)))
    shutil.rmtree(out)
    return chunk


# ---------------------------------------------------------------- a same-size swap: refused, naming the chunk

def test_a_chunk_rebuilt_from_val_at_its_size_is_refused_before_training(made, shards, tmp_path):
    bad = rebuild_from_val(made, shards, 0)
    run = tmp_path / "run"
    r = subprocess.run(train_cmd(shards, run), capture_output=True, text=True, timeout=300)
    line = one_line(r.stderr)
    assert r.returncode == 2 and str(bad) in line and "SHA-256" in line, r.stderr[-3000:]
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()  # nothing trained


def test_a_chunk_swapped_on_s3_is_refused_at_its_first_download(made, shards, tmp_path):
    needs("moto")
    bad = rebuild_from_val(made, shards, -1)  # the last chunk: read by a data worker, mid-epoch
    cache = tmp_path / "chunks"
    with s3server.serve():
        s3server.upload(shards, "swapped", "x")
        r = subprocess.run(train_cmd("s3://swapped/x", tmp_path / "run", "-j", "2", "--cache-dir", str(cache)),
                           capture_output=True, text=True, timeout=300)
    line = one_line(r.stderr)  # LitData's download thread prints no traceback
    url = f"s3://swapped/x/train/{bad.name}"
    assert r.returncode == 2 and url in line and "SHA-256" in line, r.stderr[-3000:]
    held = {p.name for p in cache.glob("*/train/*") if not p.name.endswith((".lock", ".cnt"))}
    assert not {n for n in held if n.startswith(bad.name)}, held  # neither in the cache nor left as a temp file
    assert held - {"index.json"}, held  # the good chunks were downloaded and kept


def test_s3_chunks_are_hashed_once_as_downloaded(shards, tmp_path, monkeypatch):
    needs("moto")
    hashed = []
    digest = shard_format.file_digest
    monkeypatch.setattr(shard_format, "file_digest", lambda p, *a: hashed.append(Path(p).name) or digest(p, *a))
    chunks = [c["file"] for c in meta(shards)["splits"]["val"]["chunks"]]
    with s3server.serve():
        s3server.upload(shards, "once", "x")
        for _ in range(2):  # the second run finds every chunk in its cache, checked when it came
            reader = shard_reader.val_reader("s3://once/x", ["c00", "c01"], cache_dir=tmp_path / "chunks")
            assert len({reader[i][2] for i in range(len(reader))}) == 6
    assert sorted(h.split(".bin")[0] + ".bin" for h in hashed) == sorted(chunks), hashed  # temp files' names


# ---------------------------------------------------------------- local chunks: hashed once per machine

def test_a_second_run_hashes_nothing(shards, monkeypatch):
    hashed = []
    digest = shard_format.file_digest
    monkeypatch.setattr(shard_format, "file_digest", lambda p, *a: hashed.append(Path(p)) or digest(p, *a))
    doc = meta(shards)
    every = sorted(shards / s / c["file"] for s in doc["splits"] for c in doc["splits"][s]["chunks"])
    shard_reader.open_shard_splits(str(shards))
    assert sorted(hashed) == every
    hashed.clear()
    shard_reader.open_shard_splits(str(shards))
    assert hashed == []
    touched = every[1]
    os.utime(touched)  # a chunk written again (or touched) since: checked again, alone
    shard_reader.open_shard_splits(str(shards))
    assert hashed == [touched]
    hashed.clear()
    for record in (cache_dir() / "hashed").glob("*.json"):  # the record is a cache: damaged, it is rebuilt
        record.write_text(DEEP)
    shard_reader.open_shard_splits(str(shards))
    assert sorted(hashed) == every
    hashed.clear()
    shard_reader.val_reader(str(shards), doc["classes"])  # evaluate reads the val split: it needs no train chunk
    assert hashed == []


# ---------------------------------------------------------------- declared counts, before anything is sized by them

def declare(shards: Path, samples: int) -> str:
    """warmstart.json and index.json agree that the last train chunk holds `samples` samples (class and image counts
    too): not the first, which the model check reads before the sampler is built. -> the chunk's name."""
    doc, index_path = meta(shards), shards / "train" / "index.json"
    index = json.loads(index_path.read_text())
    train, extra = doc["splits"]["train"], samples - doc["splits"]["train"]["chunks"][-1]["samples"]
    train["chunks"][-1]["samples"] = index["chunks"][-1]["chunk_size"] = samples
    train["images"] += extra
    train["classes"]["c00"] += extra
    (shards / META).write_text(json.dumps(doc))
    index_path.write_text(json.dumps(index))
    return train["chunks"][-1]["file"]


def rewrite_header(shards: Path, samples: int) -> str:
    """The last train chunk's own header says `samples`; warmstart.json's SHA-256 follows (an author's coherent
    edit). -> the chunk's name."""
    doc = meta(shards)
    rec = doc["splits"]["train"]["chunks"][-1]
    chunk = shards / "train" / rec["file"]
    with open(chunk, "r+b") as f:
        f.write(struct.pack("<I", samples))
    rec["sha256"] = shard_format.file_digest(chunk)
    (shards / META).write_text(json.dumps(doc))
    return rec["file"]


LIMITED = """import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from warmstart.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["declared", "header"])
def test_a_chunk_declaring_a_billion_samples_is_one_line_at_once(shards, tmp_path, where):
    if where == "declared":
        chunk, says = declare(shards, 10**9), "declares 1,000,000,000 samples"
    else:
        chunk, says = rewrite_header(shards, 10**9), "its header does not match the 3 samples"
    # 6 GB of address space: a small run takes under 4 (one math thread, two malloc arenas), a permutation of 10^9
    # samples 8 more
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", LIMITED, str(6 * 2**30), *train_cmd(shards, tmp_path / "run")[3:]],
                       capture_output=True, text=True, timeout=300, env=env)
    line = one_line(r.stderr)
    assert r.returncode == 2 and says in line and chunk in line, r.stderr[-3000:]
    assert time.time() - t0 < 120 and not (tmp_path / "run" / "metrics.csv").exists()  # refused before training


# ---------------------------------------------------------------- 200,000 `[`: one line, no traceback

@pytest.mark.parametrize("record", [META, "train/index.json"])
def test_a_deeply_nested_shard_record_is_one_line(shards, tmp_path, capsys, record):
    (shards / record).write_text(DEEP)
    line = error_line(capsys, train_cmd(shards, tmp_path / "run")[3:])
    assert f"{shards / record} is not valid JSON" in line, line


def test_a_deeply_nested_prepared_json_is_one_warning_line(made, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(made[0], data)
    (data / "prepared.json").write_text(DEEP)
    warning = sources.load_splits(data).warning
    assert warning.count("\n") == 0 and "prepared.json is not valid JSON" in warning, warning


@pytest.mark.parametrize("damage", ["deep", "torn", "a list", "files a number", "a path for a name"])
def test_a_damaged_folder_index_cache_is_rebuilt(made, damage):
    fresh = index_folder(made[0] / "train")
    cached = list((cache_dir() / "index").glob("*.json"))
    assert len(cached) == 1
    doc = json.loads(cached[0].read_text())
    files = {"files a number": 5, "a path for a name": {**doc["files"], "c00": ["../../../etc/passwd"]}}
    cached[0].write_text({"deep": DEEP, "torn": "{torn", "a list": "[1, 2]"}.get(damage)
                         or json.dumps({**doc, "files": files.get(damage)}))
    assert index_folder(made[0] / "train") == fresh
    assert json.loads(cached[0].read_text())["files"]  # written again, whole


def test_damaged_prepare_state_is_redone_not_a_traceback(tmp_path):
    out, options = tmp_path / "out", {"resize": None}
    (out / ".partial").mkdir(parents=True)
    (out / ".partial" / "options.json").write_text(DEEP)
    extract.Output(out, options, 1, "", None, None, 90).close()  # started afresh
    assert json.loads((out / ".partial" / "options.json").read_text()) == options
    good = {"key": "train/c00", "files": 1, "bytes": 5, "resized_bytes": 0, "repairs": [], "unreadable": [],
            "counts": {"train/c00": 1}}
    lines = [json.dumps(good), DEEP, json.dumps({**good, "key": 5}), json.dumps({**good, "key": "x", "counts": []}),
             "[]", '{"key": "train/c01"']
    (out / ".partial" / "journal.jsonl").write_text("\n".join(lines) + "\n")
    output = extract.Output(out, options, 1, "", None, None, 90)
    output.close()
    assert output.done == {"train/c00": good}
