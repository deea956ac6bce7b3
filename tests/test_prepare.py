"""`warmstart prepare` on mini ILSVRC2012 archives in the official and Kaggle structures."""

import io
import json
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from warmstart.cli import main
from warmstart.prepare import archives, facts, fixtures, images

CLASSES = fixtures.pick_classes(6, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
PER_CLASS, VAL, TEST = 3, 12, 3


def build(path: Path, **kw) -> Path:
    return fixtures.build_official(path, CLASSES, PER_CLASS, VAL, TEST, **kw)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def prepared(official, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "imagenet"
    assert main(["prepare", "--archives", str(official), "--out", str(out), "--partial"]) == 0
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def prepare(archive_dir: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--archives", str(archive_dir), "--out", str(out), *extra])


def test_layout_and_labels(prepared, official):
    labels = facts.val_labels()
    val = sorted(prepared.glob("val/*/*.JPEG"))
    assert len(val) == VAL and all(labels[p.name] == p.parent.name for p in val)
    assert sorted(p.name for p in (prepared / "train").iterdir()) == CLASSES
    assert all(len(list((prepared / "train" / w).iterdir())) == PER_CLASS for w in CLASSES)
    assert len(list((prepared / "test").glob("ILSVRC2012_test_*.JPEG"))) == TEST
    assert [line.split(" ", 1)[0] for line in (prepared / "synsets.txt").read_text().splitlines()] == CLASSES
    doc = json.loads((prepared / "prepared.json").read_text())
    assert doc["splits"]["train"]["classes"] == dict.fromkeys(CLASSES, PER_CLASS)
    assert doc["splits"]["val"]["images"] == VAL and doc["splits"]["test"]["images"] == TEST
    assert {c["file"] for c in doc["checksums"]} == {p.name for p in official.iterdir() if p.name != "MD5SUMS"}
    # Mini archives match the MD5SUMS written beside them, never the official MD5s: accepted (--partial), not ok.
    assert all(c["md5sums_match"] for c in doc["checksums"])
    assert {c["file"]: c["ok"] for c in doc["checksums"]} == {**dict.fromkeys(facts.MD5, False), facts.TEST_TARS[0]: True}
    assert doc["verified"] is False and len(doc["unverified_reasons"]) == 3
    assert doc["missing"] and not (prepared / ".partial").exists()


def test_repairs_png_and_cmyk_keeps_greyscale(prepared):
    doc = json.loads((prepared / "prepared.json").read_text())
    assert {(r["file"], r["was"]) for r in doc["repairs"]} == {
        (f"train/{fixtures.PNG_CLASS}/{facts.PNG_FILES[0]}", "PNG"),
        (f"train/{fixtures.CMYK_CLASS}/n01739381_1309.JPEG", "JPEG CMYK"),
    }
    for r in doc["repairs"]:
        with Image.open(prepared / r["file"]) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
    modes = {p.name: Image.open(p).mode for p in prepared.glob("train/*/*.JPEG")}
    assert "L" in modes.values()  # the greyscale JPEG is valid ImageNet content: left as it was
    assert set(modes.values()) == {"L", "RGB"}


def test_format_check_reads_headers_only():
    img = Image.new("RGB", (32, 24), (200, 10, 10))
    enc = {}
    for fmt, mode in (("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")):
        buf = io.BytesIO()
        img.convert(mode).save(buf, fmt)
        enc[(fmt, mode)] = buf.getvalue()
    assert images.kind(enc["JPEG", "RGB"]) == "JPEG RGB" and images.kind(enc["JPEG", "L"]) == "JPEG L"
    assert images.kind(enc["JPEG", "CMYK"]) == "JPEG CMYK" and images.kind(enc["PNG", "RGB"]) == "PNG"
    assert images.kind(enc["JPEG", "RGB"][:20]) == "JPEG corrupt" and images.kind(b"hello") == "unknown"


def as_official(monkeypatch, archive_dir: Path) -> None:
    """Make the mini archives' own MD5s the published ones, as if they were the real downloads."""
    for name in facts.MD5:
        monkeypatch.setitem(facts.MD5, name, fixtures.md5sum(archive_dir / name))


def test_full_mode_refuses_a_subset(official, tmp_path, monkeypatch, capsys):
    as_official(monkeypatch, official)
    assert prepare(official, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--partial" in err and "train: 994 of 1000 classes absent" in err
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_rerun_after_success_is_a_no_op(prepared, official, capsys):
    before = (prepared / "prepared.json").stat().st_mtime_ns
    assert prepare(official, prepared, "--partial") == 0
    assert "already prepared" in capsys.readouterr().out
    assert (prepared / "prepared.json").stat().st_mtime_ns == before


def test_resume_after_interrupt(official, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real, seen = archives.inner_files, []

    def interrupted(*a):
        seen.append(a[1])
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(archives, "inner_files", interrupted)
    assert prepare(official, out, "--partial") == 130
    assert not (out / "prepared.json").exists()
    finished = sorted(p.name for p in (out / "train").iterdir())
    assert finished == sorted(seen[:3])  # complete classes only; the fourth was never renamed into place
    assert all(len(list((out / "train" / w).iterdir())) == PER_CLASS for w in finished)
    inodes = {p: p.stat().st_ino for p in (out / "train").rglob("*.JPEG")}
    # A kill can also leave a half-written class and a torn journal line; both must be redone.
    (out / ".partial" / "train" / "n99999999").mkdir(parents=True)
    with open(out / ".partial" / "journal.jsonl", "a") as f:
        f.write('{"key": "train/n0')

    redone = []
    monkeypatch.setattr(archives, "inner_files", lambda *a: redone.append(a[1]) or real(*a))
    assert prepare(official, out, "--partial") == 0
    assert sorted(redone) == sorted(set(CLASSES) - set(finished))
    assert all(p.stat().st_ino == ino for p, ino in inodes.items())  # finished classes were not rewritten
    assert tree(out) == tree(prepared_again(official, tmp_path))
    assert json.loads((out / "prepared.json").read_text())["splits"]["train"]["images"] == len(CLASSES) * PER_CLASS


KILL_AT_CLASS = """
import os, signal, sys
from warmstart.prepare import archives
real, seen = archives.inner_files, []
def killed(*a):
    seen.append(a[1])
    if len(seen) == 4:  # a real SIGKILL: no cleanup, writer threads die mid-file
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a)
archives.inner_files = killed
from warmstart.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_sigkill(official, tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "--archives", str(official), "--out", str(out), "--partial"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_CLASS, *args], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "prepared.json").exists() and (out / ".partial" / "journal.jsonl").exists()
    assert all(len(list(d.iterdir())) == PER_CLASS for d in out.glob("train/*"))  # only whole classes, if any
    assert prepare(official, out, "--partial") == 0
    assert tree(out) == tree(prepared_again(official, tmp_path)) and not (out / ".partial").exists()


def prepared_again(official: Path, tmp_path: Path) -> Path:
    out = tmp_path / "reference"
    assert prepare(official, out, "--partial") == 0
    return out


@pytest.mark.parametrize("where,kind", [("inner", "traversal"), ("val", "absolute"), ("train", "symlink"),
                                        ("inner", "hardlink"), ("val", "device")])
def test_hostile_members_are_refused(tmp_path, capsys, where, kind):
    archive_dir = build(tmp_path / "archives", hostile=(where, kind), devkit=False)
    out = tmp_path / "box" / "out"
    assert prepare(archive_dir, out, "--partial") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to extract" in err and "Traceback" not in err
    assert not (out / "prepared.json").exists()
    assert not Path("/tmp/warmstart-evil.JPEG").exists() and not Path("/etc/passwd").is_symlink()
    escaped = [p for p in tmp_path.rglob("*evil*") if out not in p.parents]
    assert escaped == []


def test_truncated_archive(official, tmp_path, capsys):
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    for p in official.iterdir():
        if p.name != "MD5SUMS":
            (archive_dir / p.name).write_bytes(p.read_bytes())
    train = archive_dir / facts.TRAIN_TAR
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2 + 1000])
    assert prepare(archive_dir, tmp_path / "out", "--partial") == 2
    err = capsys.readouterr().err
    assert "ILSVRC2012_img_train.tar is truncated or corrupt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_wrong_checksum(official, tmp_path, capsys):
    archive_dir = tmp_path / "archives"
    archive_dir.mkdir()
    for p in official.iterdir():
        (archive_dir / p.name).write_bytes(p.read_bytes())
    val = bytearray((archive_dir / facts.VAL_TAR).read_bytes())
    with tarfile.open(archive_dir / facts.VAL_TAR) as tar:
        first = tar.getmembers()[0]
    val[first.offset_data + 5000] ^= 0xFF  # one flipped bit inside an image: the tar still parses
    (archive_dir / facts.VAL_TAR).write_bytes(bytes(val))
    out = tmp_path / "out"
    assert prepare(archive_dir, out, "--partial") == 2
    err = capsys.readouterr().err
    assert f"{facts.VAL_TAR}: MD5" in err and "MD5SUMS" in err
    assert not (out / "prepared.json").exists() and not (out / "val").exists()


def test_devkit_disagreement_is_an_error(tmp_path, capsys):
    name = fixtures.pick_val(CLASSES, VAL)[0]
    other = next(w for w in CLASSES if w != facts.val_labels()[name])
    archive_dir = build(tmp_path / "archives")
    fixtures.write_devkit(archive_dir / facts.DEVKIT, gt_override={name: other})
    (archive_dir / "MD5SUMS").unlink()
    assert prepare(archive_dir, tmp_path / "out", "--partial") == 2
    assert f"disagrees with the official ground truth for 1 validation files (e.g. {name}" in capsys.readouterr().err


def test_short_disk_is_refused(official, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 10_000, free=10_000))
    assert prepare(official, tmp_path / "out", "--partial") == 2
    assert "GB free but this needs about" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train").exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_kaggle_layout(prepared, tmp_path, zipped):
    src = fixtures.build_kaggle(tmp_path / "kaggle", CLASSES, PER_CLASS, VAL, TEST, zipped=zipped)
    assert (src / facts.KAGGLE_ZIP).is_file() == zipped
    out = tmp_path / "out"
    assert prepare(src, out, "--partial") == 0
    assert tree(out) == tree(prepared)  # the same images, labels and repairs as from the official tars
    doc = json.loads((out / "prepared.json").read_text())
    assert doc["options"]["layout"] == "kaggle" and len(doc["repairs"]) == 2


def test_resize_short_sizes_and_quality(official, prepared, tmp_path):
    out = tmp_path / "out"
    assert prepare(official, out, "--partial", "--resize-short", "64", "--quality", "75", "--workers", "2") == 0
    full, small = tree(prepared), tree(out / "short64")
    assert tree(out) == {**full, **{f"short64/{k}": v for k, v in small.items()}}
    assert small.keys() == full.keys()
    ref = io.BytesIO()
    Image.new("RGB", (8, 8)).save(ref, "JPEG", quality=75)
    for rel, data in small.items():
        with Image.open(io.BytesIO(full[rel])) as big, Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.mode in ("L", "RGB")
            assert min(img.size) == 64 and img.mode == ("L" if big.mode == "L" else "RGB")
            assert abs(img.size[0] / img.size[1] - big.size[0] / big.size[1]) < 0.05
            assert img.quantization[0] == Image.open(ref).quantization[0]
    assert (out / "short64" / "prepared.json").is_file() and (out / "short64" / "synsets.txt").is_file()


def test_resized_only_from_folder_never_upscales(prepared, tmp_path):
    out = tmp_path / "big"
    assert main(["prepare", "--from-folder", str(prepared), "--resize-short", "100000", "--out", str(out), "--workers", "1"]) == 0
    full, copy = tree(prepared), tree(out)
    assert copy.keys() == full.keys()
    for rel in full:
        with Image.open(io.BytesIO(full[rel])) as a, Image.open(io.BytesIO(copy[rel])) as b:
            assert a.size == b.size
    assert (out / "synsets.txt").read_text() == (prepared / "synsets.txt").read_text()
    assert json.loads((out / "prepared.json").read_text())["options"]["resize_short"] == 100000


def test_devkit_fixture_is_in_devkit_layout(official):
    import scipy.io

    with tarfile.open(official / facts.DEVKIT) as tar:
        mat = scipy.io.loadmat(io.BytesIO(tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()), squeeze_me=True)
        gt = tar.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read().split()
    synsets = mat["synsets"]
    assert set(synsets.dtype.names) >= {"ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
                                         "wordnet_height", "num_train_images"}
    id_to_wnid = {int(s["ILSVRC2012_ID"]): s["WNID"] for s in synsets}
    assert len(gt) == 50_000 and id_to_wnid[int(gt[0])] == facts.val_labels()["ILSVRC2012_val_00000001.JPEG"]
    assert [id_to_wnid[i] for i in range(1, 1001)] != sorted(id_to_wnid.values())  # devkit order is not sorted order


@pytest.mark.skipif(fixtures.shared_data() is None, reason="needs ../shared/data/imagenet-sample (real ImageNet JPEGs)")
def test_fixtures_use_real_imagenet_images():
    real = next((fixtures.shared_data() / "imagenet-sample").glob(f"{CLASSES[0]}_*.JPEG"))
    made = fixtures.class_images(CLASSES[0], 2)
    with Image.open(real) as src, Image.open(io.BytesIO(made[0])) as a, Image.open(io.BytesIO(made[1])) as b:
        assert a.size[0] >= 0.8 * src.size[0] - 1 and a.size[1] >= 0.8 * src.size[1] - 1
        assert made[0] != made[1] and a.quantization == src.quantization


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    text = capsys.readouterr().out
    for flag in ("--archives", "--from-folder", "--out", "--partial", "--workers", "--resize-short", "--quality", "--resized-only"):
        assert flag in text
    assert "OUT/shortN" in text and "prepared.json" in text


def test_kaggle_zip_with_traversal_is_refused(tmp_path, capsys):
    import zipfile

    src = tmp_path / "kaggle"
    src.mkdir()
    with zipfile.ZipFile(src / facts.KAGGLE_ZIP, "w") as z:
        z.writestr("ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_1.JPEG", b"x")
        z.writestr("ILSVRC/Data/CLS-LOC/../../../evil.JPEG", b"pwned")
    out = tmp_path / "out"
    assert prepare(src, out, "--partial") == 2
    assert "unsafe path" in capsys.readouterr().err
    assert not (out / "prepared.json").exists() and not list(tmp_path.rglob("evil.JPEG"))


def test_resized_only_from_archives(official, tmp_path):
    out = tmp_path / "out"
    assert prepare(official, out, "--partial", "--resize-short", "48", "--resized-only") == 0
    assert sorted(p.name for p in out.iterdir()) == ["prepared.json", "short48", "synsets.txt"]
    small = tree(out / "short48")
    assert len(small) == len(CLASSES) * PER_CLASS + VAL + TEST
    assert all(min(Image.open(io.BytesIO(d)).size) == 48 for d in small.values())
    doc = json.loads((out / "prepared.json").read_text())
    assert len(doc["repairs"]) == 2 and doc["splits"]["train"]["bytes"] == 0
