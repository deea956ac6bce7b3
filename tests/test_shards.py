"""Issue 15: `prepare --shards`, training and evaluating from local and s3:// shards, the exact-once audit."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import s3server
import test_train  # its SIGKILL test and its training command, run here on shards
from synth import QUICK, TINY, make_image_folder
from test_cluster import torchrun
from warmstart.cli import main
from warmstart.data import shard_reader, shard_store
from warmstart.data.folder import index_folder
from warmstart.data.shard_format import META
from warmstart.data.shard_writer import file_digest
from warmstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from warmstart.errors import UserError
from warmstart.prepare import facts, fixtures

SPLITS = ("train", "val")


def needs(module: str):
    return pytest.importorskip(module, reason=f"needs {module}, from the test extra (pip install -e '.[test]')")


def prepare_shards(src: Path, out: Path, *extra: str) -> None:
    needs("litdata")
    how = "--archives" if (src / facts.TRAIN_TAR).is_file() else "--from-folder"
    assert main(["prepare", how, str(src), "--shards", str(out), *extra]) == 0


def read_back(folder: Path, out: Path, ordered: bool = True) -> dict[str, bytes]:
    """Every sample of the shards in OUT against the dataset folder they stand for: the same images with the same
    labels (and, ordered, in the folder's index order), counted alike per class by warmstart.json, LitData's index
    and a reading of every sample; -> {split/class/name: the bytes the shards hold}."""
    doc = json.loads((out / META).read_text())
    classes, _, readers, _ = shard_reader.open_shard_splits(str(out))
    assert list(readers) == list(SPLITS) and doc["splits"].keys() == set(SPLITS)
    held = {}
    for split in SPLITS:
        _, samples = index_folder(folder / split, classes)
        rec, reader = doc["splits"][split], readers[split]
        assert rec["images"] == len(reader) == len(samples)
        assert rec["classes"] == dict(Counter(classes[y] for _, y in samples))
        index = json.loads((out / split / "index.json").read_text())["chunks"]
        assert [(c["filename"], c["chunk_size"]) for c in index] == [(c["file"], c["samples"]) for c in rec["chunks"]]
        assert sum(c["chunk_size"] for c in index) == len(samples)
        for c in rec["chunks"]:
            path = out / split / c["file"]
            assert (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()) == (c["bytes"], c["sha256"])
        read = [reader[i] for i in range(len(reader))]
        keys = [f"{split}/{classes[y]}/{name}" for _, y, name in read]
        if ordered:
            assert keys == [f"{split}/{path}" for path, _ in samples]
        assert sorted(keys) == sorted(f"{split}/{path}" for path, _ in samples)
        assert Counter(classes[y] for _, y, _ in read) == Counter(rec["classes"])
        held |= {k: data for k, (data, _, _) in zip(keys, read)}
    return held


def assert_repaired(data: bytes, source: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img, Image.open(io.BytesIO(source)) as src:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", src.size)


def archive_files(archives: Path) -> dict[str, bytes]:
    """{split/class/name: bytes} straight from the mini archives (tarfile, not warmstart's reader)."""
    files = {}
    with tarfile.open(archives / facts.TRAIN_TAR) as outer:
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                files |= {f"train/{member.name[:-4]}/{m.name}": inner.extractfile(m).read() for m in inner}
    labels = facts.val_labels()
    with tarfile.open(archives / facts.VAL_TAR) as val:
        files |= {f"val/{labels[m.name]}/{m.name}": val.extractfile(m).read() for m in val}
    return files


def test_prepare_shards_from_the_mini_archives(tmp_path, capsys):
    classes = fixtures.pick_classes(4, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
    archives = fixtures.build_official(tmp_path / "archives", classes, 3, 8)
    chunk = (archives / facts.TRAIN_TAR).stat().st_size // 3000  # in KB: a few chunks, however large the images
    prepare_shards(archives, tmp_path / "shards", "--partial", "--chunk-bytes", f"{chunk}KB")
    printed = capsys.readouterr().out
    assert main(["prepare", "--archives", str(archives), "--out", str(tmp_path / "folder"), "--partial"]) == 0
    held = read_back(tmp_path / "folder", tmp_path / "shards", ordered=False)  # in the archives' order
    doc = json.loads((tmp_path / "shards" / META).read_text())
    assert doc["splits"]["train"]["classes"] == dict.fromkeys(classes, 3) and doc["splits"]["val"]["images"] == 8
    assert len(doc["splits"]["train"]["chunks"]) > 1
    assert doc["verified"] is False  # mini archives: not the official MD5s
    assert not (tmp_path / "shards" / ".partial").exists()

    source = archive_files(archives)
    repaired = {f"train/{fixtures.PNG_CLASS}/{facts.PNG_FILES[0]}": "PNG",
                f"train/{fixtures.CMYK_CLASS}/n01739381_1309.JPEG": "JPEG CMYK"}
    assert held.keys() == source.keys()
    for key, data in held.items():
        assert data == (tmp_path / "folder" / key).read_bytes(), key  # what folder prepare writes, repairs included
        if key in repaired:
            assert_repaired(data, source[key])
            assert f"repaired {key} (was {repaired[key]})" in printed
        else:
            assert data == source[key], key  # RGB and greyscale JPEGs: the bytes as stored


def test_prepare_shards_from_a_folder_keeps_its_order_and_bytes(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=6, val_per_class=3, size=32)
    with Image.open(data / "train" / "c00" / "train_0_0.jpg") as img:
        img.save(data / "train" / "c00" / "train_0_1a.png")  # sorts between two JPEGs of its class
        img.convert("CMYK").save(data / "train" / "c01" / "cmyk.jpg")
    prepare_shards(data, tmp_path / "shards", "--chunk-bytes", "4KB")
    printed = capsys.readouterr().out
    held = read_back(data, tmp_path / "shards")
    repaired = {"train/c00/train_0_1a.png": "PNG", "train/c01/cmyk.jpg": "JPEG CMYK"}
    assert len(held) == 3 * 9 + 2
    for key, stored in held.items():
        if key in repaired:
            assert_repaired(stored, (data / key).read_bytes())
            assert f"repaired {key} (was {repaired[key]})" in printed
        else:
            assert stored == (data / key).read_bytes(), key


@pytest.mark.skipif(not (test_train.SHARED / "imagenette-dev").is_dir(),
                    reason=f"real images not found at {test_train.SHARED} (CI has them)")
def test_prepare_shards_of_imagenette_dev(tmp_path):
    src = test_train.SHARED / "imagenette-dev"
    prepare_shards(src, tmp_path / "shards", "--chunk-bytes", "4MB")
    held = read_back(src, tmp_path / "shards")
    assert all(data == (src / key).read_bytes() for key, data in held.items())


# ---------------------------------------------------------------- shards train and evaluate as the folder does

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A generated folder, its shards (several chunks per split), and the same run (test_train's slow model, 2
    epochs, mixup, a data worker) trained from each."""
    root = tmp_path_factory.mktemp("shards")
    data = make_image_folder(root / "data", classes=4, train_per_class=24, val_per_class=16)
    prepare_shards(data, root / "shards", "--chunk-bytes", "20KB")
    model = root / "slow.py"
    model.write_text(test_train.SLOW_MODEL)
    for name in ("data", "shards"):
        subprocess.run(test_train._train_cmd(root / name, model, root / f"run-{name}"), check=True,
                       capture_output=True, timeout=300)
    return SimpleNamespace(root=root, data=data, shards=root / "shards", model=model,
                           run=root / "run-shards", ckpt=root / "run-shards" / "checkpoints" / "last.pt")


def weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def evaluate_json(capsys, ckpt: Path, data, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "-j", "0", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_training_from_shards_equals_training_from_the_folder(synth, capsys):
    assert_same_weights(synth.root / "run-data", synth.run)
    log = (synth.run / "log.txt").read_text()
    assert "96 train / 64 val images" in log and "each epoch trains" not in log
    folder, shard = (evaluate_json(capsys, synth.ckpt, d) for d in (synth.data, synth.shards))
    assert shard == folder and shard["count"] == 64


def test_sigkill_mid_epoch_then_resume_from_shards_is_bitwise_identical(synth, tmp_path):
    test_train.test_sigkill_mid_epoch_then_resume_at_once_is_bitwise_identical(synth.shards, tmp_path)


def one_line(err: str) -> str:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def damage(chunk: Path, sample: int | None = None) -> Path:
    """Overwrite 64 bytes in the middle of a chunk file, or of one sample's record in it (LitData's chunk: uint32 item
    count, uint32 offsets, the items); its size is unchanged, and warmstart.json records its new SHA-256 (a chunk
    damaged after it was checked, e.g. in the cache), so only reading it can tell: each sample's CRC-32."""
    data = chunk.read_bytes()
    if sample is None:
        at = len(data) // 2
    else:
        start, end = (int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "little") for i in (sample, sample + 1))
        at = (start + end) // 2
    with open(chunk, "r+b") as f:
        f.seek(at)
        f.write(b"\x5a" * 64)
    meta = chunk.parent.parent / META
    doc = json.loads(meta.read_text())
    for c in doc["splits"][chunk.parent.name]["chunks"]:
        if c["file"] == chunk.name:
            c["sha256"] = file_digest(chunk)
    meta.write_text(json.dumps(doc))
    return chunk


# sample 0 of the first chunk is read by the main process (the model check); the last chunk, by a data worker only
@pytest.mark.parametrize("which,sample", [(0, 0), (-1, None)])
def test_a_damaged_chunk_is_one_line_naming_it(synth, tmp_path, which, sample):
    data = tmp_path / "damaged"
    shutil.copytree(synth.shards, data)
    files = [c["file"] for c in json.loads((data / META).read_text())["splits"]["train"]["chunks"]]
    bad = damage(data / "train" / files[which], sample)
    r = subprocess.run([sys.executable, "-m", "warmstart", "train", str(data), *TINY, *QUICK, "-j", "2", "--epochs",
                        "1", "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and str(bad) in one_line(r.stderr), r.stderr[-3000:]
    if sample == 0:
        return
    bad = damage(data / "val" / "chunk-0-1.bin")
    r = subprocess.run([sys.executable, "-m", "warmstart", "evaluate", "--checkpoint", str(synth.ckpt), "--data",
                        str(data), "-j", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and str(bad) in one_line(r.stderr), r.stderr[-3000:]


def test_training_from_s3_equals_training_from_local_shards(synth, tmp_path, capsys):
    needs("moto")
    with s3server.serve() as endpoint:
        s3server.upload(synth.shards, "data", "synth/shards")
        url = "s3://data/synth/shards"
        run, cache = tmp_path / "run", tmp_path / "chunks"
        start = s3server.requests(endpoint)
        subprocess.run(test_train._train_cmd(url, synth.model, run, "--cache-dir", str(cache)), check=True,
                       capture_output=True, timeout=300)
        trained = s3server.requests(endpoint) - start
        local = evaluate_json(capsys, synth.ckpt, synth.shards)
        start = s3server.requests(endpoint)
        remote = evaluate_json(capsys, synth.ckpt, url, "--cache-dir", str(tmp_path / "eval-chunks"))
        evaluated = s3server.requests(endpoint) - start
    assert_same_weights(synth.run, run)
    assert remote == local and remote["count"] == 64
    # whole chunks, a request or two each, not a request per image
    chunks = json.loads((synth.shards / META).read_text())["splits"]
    assert len(chunks["val"]["chunks"]) <= 8 and evaluated < 64 / 4, evaluated
    assert trained < 96, trained  # 2 epochs of 96 train and 64 val images, read by 2 processes (main, a worker)
    # every train chunk in one folder of the cache, named after the URL and its warmstart.json
    assert {p.name for p in cache.glob("*/train/chunk-*.bin")} == {c["file"] for c in chunks["train"]["chunks"]}
    assert len(list(cache.iterdir())) == 1


def test_shards_at_the_root_of_a_bucket(synth):
    needs("moto")
    import boto3

    with s3server.serve():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="whole")
        for path in sorted(synth.shards.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), "whole", path.relative_to(synth.shards).as_posix())
        classes, _, readers, _ = shard_reader.open_shard_splits("s3://whole")
        assert classes == ["c00", "c01", "c02", "c03"] and len(readers["val"]) == 64


# ---------------------------------------------------------------- the audit: ids recorded by the test itself

AUDIT_MODEL = '''
import json, os, time
from torch import nn

class Audit(nn.Module):
    """Appends the per-channel means of every training batch it is given to $AUDIT_DIR/<pid>.jsonl."""
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))
    def forward(self, x):
        if self.training:
            with open(os.path.join(os.environ["AUDIT_DIR"], f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(x.detach().float().mean((2, 3)).tolist()) + "\\n")
            time.sleep(0.2)
        return self.net(x)
'''
N, GLOBAL = 96, 12  # 8 updates per epoch, nothing dropped; 6 x 2 processes, 6 x 1 x 2 accumulation, 4 x 3
AUDIT_FLAGS = ["--epochs", "1", "--seed", "5", "--img-size", "32", "-b", "6", "--global-batch", str(GLOBAL), "-j", "2",
               "--warmup-epochs", "0", "--mixup", "0", "--save-every-minutes", "100"]


def colour(i: int) -> tuple[int, int, int]:
    return 16 + 32 * (i % 8), 16 + 32 * (i // 8 % 8), 16 + 32 * (i // 64)


def sample_id(means: list[float]) -> int:
    """A uniform image's id from its normalised channel means (crops, resizes and flips keep it uniform)."""
    rgb = [255 * (m * s + mu) for m, s, mu in zip(means, IMAGENET_STD, IMAGENET_MEAN)]
    steps = [(v - 16) / 32 for v in rgb]
    assert all(abs(s - round(s)) < 0.25 for s in steps), rgb  # a colour we wrote, not a blend
    return round(steps[0]) + 8 * round(steps[1]) + 64 * round(steps[2])


def seen_ids(folder: Path) -> list[int]:
    """Ids of every training sample the model was given, in all processes; each process's first forward is the model
    check on 2 images (engine/run.py's dry run), not training."""
    ids = []
    for f in folder.glob("*.jsonl"):
        batches = [json.loads(line) for line in f.read_text().splitlines()]
        assert len(batches[0]) == 2
        ids += [sample_id(m) for batch in batches[1:] for m in batch]
    return ids


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    for split, n in (("train", N), ("val", 8)):
        for i in range(n):
            d = root / "data" / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (36, 36), colour(i)).save(d / f"{i:03d}.jpg", quality=95)
    prepare_shards(root / "data", root / "shards", "--chunk-bytes", "2KB")
    (root / "audit.py").write_text(AUDIT_MODEL)

    def launch(nproc: int, run: Path, *extra: str, **kw) -> subprocess.Popen:
        (root / f"seen-{run.name}").mkdir()
        argv = ["train", str(root / "shards"), "--model", f"{root / 'audit.py'}:Audit", "--out", str(run),
                *AUDIT_FLAGS, *extra]
        cmd = torchrun(nproc, argv) if nproc > 1 else [sys.executable, "-m", "warmstart", *argv]
        return subprocess.Popen(cmd, env={**os.environ, "AUDIT_DIR": str(root / f"seen-{run.name}")},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)

    full = launch(2, root / "full")
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]

    # SIGTERM to the whole group (as SLURM does) once the model was given 3 of the epoch's 8 updates (2 ranks' batches)
    stopped = launch(2, root / "stopped", start_new_session=True)
    deadline = time.time() + 300
    while sum(max(0, f.read_text().count("\n") - 1) for f in (root / "seen-stopped").glob("*.jsonl")) < 3 * 2:
        if stopped.poll() is not None or time.time() > deadline:
            os.killpg(stopped.pid, signal.SIGKILL)
            pytest.fail(f"the run to be stopped ended or stalled first: {stopped.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.killpg(stopped.pid, signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    return SimpleNamespace(root=root, launch=launch, stderr=err)


def test_two_processes_two_workers_see_every_sample_once(audit):
    log = (audit.root / "full" / "log.txt").read_text()
    assert f"{N} train / 8 val images" in log and "x 2," in log and "each epoch trains" not in log  # nothing dropped
    assert Counter(seen_ids(audit.root / "seen-full")) == Counter(range(N))
    rows = [json.loads(r) for r in (audit.root / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_count"] == 8


@pytest.mark.parametrize("nproc", [1, 3])
def test_stopped_on_two_processes_resumed_on_another_count_sees_the_rest_once(audit, nproc):
    pos = torch.load(audit.root / "stopped" / "checkpoints" / "last.pt", weights_only=True)["train_state"]["position"]
    before = seen_ids(audit.root / "seen-stopped")
    assert pos["epoch"] == 0 and 3 <= pos["batch_in_epoch"] < 8, (pos, audit.stderr[-3000:])
    assert len(before) == len(set(before)) == pos["batch_in_epoch"] * GLOBAL  # what was given is what was saved
    run = audit.root / f"on{nproc}"
    shutil.copytree(audit.root / "stopped", run)
    proc = audit.launch(nproc, run, "--resume", "auto")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    after = seen_ids(audit.root / f"seen-{run.name}")
    assert len(after) == len(set(after)) and not set(before) & set(after), Counter(after).most_common(3)
    assert sorted(before + after) == list(range(N))


# ---------------------------------------------------------------- one line for what the user got wrong

def error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return one_line(capsys.readouterr().err)


def test_user_errors_are_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2, size=32)
    train = ["train", "--out", str(tmp_path / "run"), *TINY, *QUICK, "--epochs", "1"]
    mine = tmp_path / "mine"
    shutil.copytree(data, mine)
    (mine / META).write_text('{"name": "my experiment", "splits": 2}\n')  # not ours: a user's own file
    assert "is not a warmstart shard description" in error_line(capsys, [*train, str(mine)])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me\n")
    assert "is not empty" in error_line(capsys, ["prepare", "--from-folder", str(data), "--shards", str(busy)])
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert "already holds shards" in error_line(capsys, ["prepare", "--from-folder", str(data), "--shards", str(mine)])
    assert sorted(p.name for p in mine.iterdir()) == sorted(["train", "val", META])  # nothing removed


def test_an_s3_url_that_is_not_there_is_one_line(synth, capsys):
    needs("moto")
    train = ["train", "--out", str(synth.root / "nowhere"), *TINY, *QUICK, "--epochs", "1"]
    with s3server.serve():
        t0 = time.time()
        assert "s3://nobucket/x" in error_line(capsys, [*train, "s3://nobucket/x"])
        assert "s3://nobucket/x" in error_line(capsys, ["evaluate", "--checkpoint", str(synth.ckpt), "--data",
                                                        "s3://nobucket/x"])
        assert time.time() - t0 < 60  # no retrying for minutes


# ---------------------------------------------------------------- shards are data: tampering never runs code

@pytest.fixture()
def small(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=6, val_per_class=2, size=32)
    prepare_shards(data, tmp_path / "shards", "--chunk-bytes", "4KB")
    return tmp_path / "shards"


class Marker:
    """Unpickling this creates a file: what a shard's author could do with code of their choosing."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickled_train_split(shards_dir: Path, marker: Path) -> None:
    """Replace the train split with one whose first field LitData stores with pickle (as its writer does for any
    object), and make warmstart.json list its chunk at the right size: only index.json says "pickle"."""
    from litdata.streaming.writer import BinaryWriter

    train = shards_dir / "train"
    shutil.rmtree(train)
    writer = BinaryWriter(str(train), chunk_bytes="64MB")
    for i in range(12):
        writer.add_item(i, (Marker(marker), "c00", f"x{i}.jpg", 0))
    writer.done()
    writer._merge_no_wait()
    assert json.loads((train / "index.json").read_text())["config"]["data_format"][0] == "pickle"
    doc = json.loads((shards_dir / META).read_text())
    chunk = json.loads((train / "index.json").read_text())["chunks"][0]
    path = train / chunk["filename"]
    doc["splits"]["train"]["chunks"] = [{"file": chunk["filename"], "samples": 12, "bytes": path.stat().st_size,
                                         "sha256": file_digest(path)}]
    (shards_dir / META).write_text(json.dumps(doc))


def test_an_index_that_would_unpickle_is_refused_and_never_read(small, tmp_path, capsys):
    marker = tmp_path / "pwned"
    pickled_train_split(small, marker)
    line = error_line(capsys, ["train", str(small), "--out", str(tmp_path / "run"), *TINY, *QUICK, "-j", "2",
                               "--epochs", "1"])
    assert "index.json is not what `warmstart prepare --shards` writes" in line and not marker.exists()
    # and were index.json swapped after that check: LitData's readers get no pickle to call
    doc = json.loads((small / META).read_text())
    reader = shard_reader.ShardReader(str(small / "train"), doc["splits"]["train"], doc["classes"], cache_dir=None,
                                cache_limit="1GB")
    with pytest.raises(UserError, match="names a data format"):
        reader[0]
    assert not marker.exists()


def test_an_s3_index_cannot_move_the_cache(small, tmp_path):
    needs("moto")
    escaped = tmp_path / "escaped"
    index = small / "train" / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "updated_at": str(escaped)}))
    with s3server.serve():
        s3server.upload(small, "moved", "x")
        cache = tmp_path / "cache"
        _, _, readers, _ = shard_reader.open_shard_splits("s3://moved/x", cache_dir=cache)
        assert readers["train"][0][2] == "train_0_0.jpg"
    assert not escaped.exists()  # LitData would have put the chunk cache there
    assert {p.name for p in cache.glob("*/train/*.bin")} == {"chunk-0-0.bin"}


def edit(doc: dict, change: str) -> None:
    train = doc["splits"]["train"]
    chunk = train["chunks"][0]
    {"bytes as text": lambda: chunk.update(bytes=str(chunk["bytes"])),
     "no file": lambda: chunk.pop("file"),
     "file outside": lambda: chunk.update(file="../../../chunk-0-0.bin"),
     "chunks a number": lambda: train.update(chunks=5),
     "split null": lambda: doc["splits"].update(train=None),
     "samples as text": lambda: chunk.update(samples=str(chunk["samples"])),
     "samples negative": lambda: chunk.update(samples=-chunk["samples"]),
     "images wrong": lambda: train.update(images=99),
     "extra class": lambda: doc["classes"].append("zzz"),
     "duplicate class": lambda: doc.update(classes=["c00", "c00", "c01"]),
     "classes numbers": lambda: doc.update(classes=[0, 1]),
     "other split": lambda: doc["splits"].update(test=train),
     "human short": lambda: doc.update(human=["one"])}[change]()


@pytest.mark.parametrize("change", ["bytes as text", "no file", "file outside", "chunks a number", "split null",
                                    "samples as text", "samples negative", "images wrong", "extra class",
                                    "duplicate class", "classes numbers", "other split", "human short"])
def test_an_edited_warmstart_json_is_one_line(small, tmp_path, capsys, change):
    doc = json.loads((small / META).read_text())
    edit(doc, change)
    (small / META).write_text(json.dumps(doc))
    line = error_line(capsys, ["train", str(small), "--out", str(tmp_path / "run"), *TINY, *QUICK, "--epochs", "1"])
    assert f"{small / META} is damaged or was edited" in line, line


@pytest.mark.parametrize("index,says", [(None, "is missing"), ({}, "is not LitData's index"),
                                        ("renamed", "lists other chunks")])
def test_a_missing_or_edited_index_is_one_line(small, tmp_path, capsys, index, says):
    path = small / "train" / "index.json"
    if index is None:
        path.unlink()
    elif index == "renamed":
        doc = json.loads(path.read_text())
        doc["chunks"][0]["filename"] = "../../../../../../etc/passwd"
        path.write_text(json.dumps(doc))
    else:
        path.write_text(json.dumps(index))
    line = error_line(capsys, ["train", str(small), "--out", str(tmp_path / "run"), *TINY, *QUICK, "--epochs", "1"])
    assert says in line and "index.json" in line, line


@pytest.mark.parametrize("text", ["nan", "inf", "1e400", "-5GB", "0.5B"])
def test_sizes_that_are_not_sizes_are_one_line(text):
    with pytest.raises(UserError, match="expected a size such as"):
        shard_store.parse_size(text, "--cache-limit")


def test_shards_onto_a_file_is_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, size=32)
    (tmp_path / "afile").write_text("keep\n")
    argv = ["prepare", "--from-folder", str(data), "--shards", str(tmp_path / "afile")]
    assert "is a file" in error_line(capsys, argv)
    assert (tmp_path / "afile").read_text() == "keep\n"


def test_a_mid_epoch_resume_on_other_images_is_refused(synth, tmp_path, capsys):
    """Same classes, same count, other pixels: the chunks' SHA-256s tell (and a folder's file list does)."""
    from test_hardening import mid_epoch

    other = make_image_folder(tmp_path / "other", classes=4, train_per_class=24, val_per_class=16, seed=1)
    prepare_shards(other, tmp_path / "other-shards", "--chunk-bytes", "20KB")
    renamed = tmp_path / "renamed"
    shutil.copytree(synth.data, renamed)
    (renamed / "train" / "c00" / "train_0_0.jpg").rename(renamed / "train" / "c00" / "z.jpg")
    for data in (tmp_path / "other-shards", renamed):
        run = tmp_path / f"run-{data.name}"
        ckpt = mid_epoch(synth.ckpt, run / "checkpoints" / "last.pt")
        line = error_line(capsys, ["train", str(data), "--model", f"{synth.model}:Slow", "--out", str(run), *QUICK,
                                   "--epochs", "2", "--seed", "7", "--resume", str(ckpt)])
        assert "train-data" in line and "twice" in line, line
