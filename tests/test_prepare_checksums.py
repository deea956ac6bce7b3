"""`warmstart prepare`: what its checksums claim, unverified data, and a full disk (issue 7)."""

import errno
import json
import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from warmstart.cli import main
from warmstart.errors import UserError
from warmstart.data import verified
from warmstart.prepare import command, facts, fixtures, images, manifest

CLASSES = fixtures.pick_classes(3)
PER_CLASS, VAL, TEST = 2, 6, 2
TRAIN, VAL_TAR = facts.TRAIN_TAR, facts.VAL_TAR


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Path:
    """Mini archives with an MD5SUMS that matches them: a forged one, as far as the official MD5s are concerned."""
    return fixtures.build_official(tmp_path_factory.mktemp("official"), CLASSES, PER_CLASS, VAL, TEST)


def prepare(archive_dir: Path, out: Path, *extra: str) -> int:
    return main(["prepare", "--archives", str(archive_dir), "--out", str(out), *extra])


def copy(official: Path, dest: Path, names=None) -> Path:
    dest.mkdir(parents=True)
    for p in official.iterdir():
        if names is None or p.name in names:
            shutil.copyfile(p, dest / p.name)
    return dest


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def doc(out: Path) -> dict:
    return json.loads((out / "prepared.json").read_text())


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def as_official(monkeypatch, archive_dir: Path) -> None:
    """Make the mini archives' own MD5s the published ones, as if they were the real downloads."""
    for name in facts.MD5:
        monkeypatch.setitem(facts.MD5, name, fixtures.md5sum(archive_dir / name))


def test_forged_md5sums_cannot_stand_in_for_the_official_md5(official, tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare(official, out) == 2
    err = one_line(capsys)
    assert f"{VAL_TAR}: MD5" in err and "does not match the official MD5" in err and "cannot stand in" in err
    assert not (out / "prepared.json").exists() and not (out / "val").exists()

    assert prepare(official, out, "--partial") == 0
    d = doc(out)
    by_file = {c["file"]: c for c in d["checksums"]}
    for name, published in facts.MD5.items():
        actual = fixtures.md5sum(official / name)
        assert by_file[name] == {"file": name, "size": (official / name).stat().st_size, "md5": actual,
                                 "official_md5": published, "official_match": False,
                                 "md5sums_md5": actual, "md5sums_match": True, "ok": False}
    test = by_file[facts.TEST_TARS[0]]  # no official MD5: MD5SUMS is the only reference, and it matched
    assert test["official_md5"] is None and test["md5sums_match"] is True and test["ok"] is True
    assert d["verified"] is False
    assert sorted(d["unverified_reasons"]) == sorted(f"{n} does not match its official MD5" for n in facts.MD5)
    assert TRAIN in verified.folder_reason(out)


def test_verified_run(official, tmp_path, monkeypatch):
    as_official(monkeypatch, official)
    out = tmp_path / "out"
    assert prepare(official, out, "--partial") == 0  # --partial only for the missing classes
    d = doc(out)
    assert d["verified"] is True and d["unverified_reasons"] == [] and all(c["ok"] for c in d["checksums"])
    assert all(c["official_match"] for c in d["checksums"] if c["file"] in facts.MD5)
    assert verified.folder_reason(out) is None


@pytest.mark.parametrize("line", ["not-a-checksum  ILSVRC2012_img_val.tar", "MD5 (ILSVRC2012_img_val.tar) = abc",
                                  "0123456789abcdef0123456789abcde  ILSVRC2012_img_val.tar"])
def test_malformed_md5sums_line(official, tmp_path, capsys, line):
    archive_dir = copy(official, tmp_path / "archives")
    lines = (archive_dir / "MD5SUMS").read_text().splitlines()
    (archive_dir / "MD5SUMS").write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    out = tmp_path / "out"
    assert prepare(archive_dir, out, "--partial") == 2
    err = one_line(capsys)
    assert f"{archive_dir / 'MD5SUMS'} line 2" in err and "`<32 hex digits>  <file name>`" in err
    assert not (out / "train").exists() and not (out / "val").exists()


def test_train_mismatch_removes_its_classes(official, tmp_path, capsys):
    archive_dir = copy(official, tmp_path / "archives", {TRAIN})  # no MD5SUMS: only the official MD5
    out = tmp_path / "out"
    assert prepare(archive_dir, out, "--resize-short", "32", "--workers", "2") == 2
    err = one_line(capsys)
    assert f"{TRAIN}: MD5" in err and "class folders already extracted from it were removed" in err
    assert not (out / "prepared.json").exists()
    assert not (out / "train").exists() and not (out / "short32" / "train").exists()
    journal = (out / ".partial" / "journal.jsonl").read_text()
    assert '"train/' not in journal  # a rerun redoes every class

    # --partial accepts it; both the folder and its resized copy say why the data is unverified.
    assert prepare(archive_dir, out, "--partial", "--resize-short", "32", "--workers", "2") == 0
    assert f"unverified: {TRAIN} does not match its official MD5" in capsys.readouterr().out
    assert doc(out)["verified"] is False
    assert verified.folder_reason(out) == verified.folder_reason(out / "short32") == \
        f"{TRAIN} does not match its official MD5"

    # A resized copy of unverified data is unverified too.
    copy_out = tmp_path / "copy"
    assert main(["prepare", "--from-folder", str(out / "short32"), "--resize-short", "16", "--out", str(copy_out),
                 "--workers", "1"]) == 0
    assert doc(copy_out)["verified"] is False and "which is unverified" in verified.folder_reason(copy_out)


def test_rerun_without_partial_does_not_inherit_an_accepted_mismatch(official, tmp_path, monkeypatch, capsys):
    archive_dir = copy(official, tmp_path / "archives", {TRAIN})
    out = tmp_path / "out"

    def interrupted(records):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed after the train tar was accepted and journaled
        m.setattr(manifest, "tally", interrupted)
        assert prepare(archive_dir, out, "--partial") == 130
    capsys.readouterr()
    assert prepare(archive_dir, out) == 2
    assert "an earlier run with --partial accepted" in one_line(capsys)
    assert not (out / "prepared.json").exists()


def test_unverified_reason_layouts(tmp_path):
    assert verified.folder_reason(tmp_path) is None  # not made by prepare: nothing to say
    root = tmp_path / "imagenet"
    (root / "short160").mkdir(parents=True)
    (root / "prepared.json").write_text(json.dumps({"verified": False, "unverified_reasons": ["x does not match"]}))
    assert verified.folder_reason(root) == verified.folder_reason(root / "short160") == "x does not match"
    # A prepared.json from before "verified" existed is judged by its checksums.
    (root / "prepared.json").write_text(json.dumps({"checksums": [{"file": TRAIN, "md5": "0" * 32, "ok": True}]}))
    assert verified.folder_reason(root) == f"{TRAIN} does not match its official MD5"
    (root / "prepared.json").write_text(json.dumps({"checksums": [{"file": TRAIN, "md5": facts.MD5[TRAIN]}]}))
    assert verified.folder_reason(root) is None
    (root / "prepared.json").write_text("{torn")
    assert "unreadable" in verified.folder_reason(root)


class FullDisk:
    """`os` as images.write_file sees it, with a disk that fills up after `room` files."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)


def test_out_of_space_is_one_line_and_resumable(official, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(images, "os", FullDisk(VAL + PER_CLASS + 1))  # val and one class fit, then the disk is full
        assert prepare(official, out, "--partial", "--workers", "1") == 2
    err = one_line(capsys)
    assert "no space left on the device writing" in err and f"{out / '.partial'}" in err and "run the same command" in err
    assert not (out / "prepared.json").exists()
    assert len(list((out / "val").rglob("*.JPEG"))) == VAL  # finished units are kept...
    kept = {p: p.stat().st_ino for p in (out / "train").rglob("*.JPEG")}
    assert len(kept) == PER_CLASS
    (out / ".partial" / ".journal.jsonl.tmp99999999").write_text("{")  # a journal rewrite killed mid-way

    assert prepare(official, out, "--partial", "--workers", "1") == 0  # ...and the rerun completes
    assert all(p.stat().st_ino == ino for p, ino in kept.items())
    reference = tmp_path / "reference"
    assert prepare(official, reference, "--partial") == 0
    assert tree(out) == tree(reference) and not (out / ".partial").exists()


def test_out_of_space_outside_image_writes(official, tmp_path, monkeypatch, capsys):
    def full(root, classes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / "synsets.txt"))

    monkeypatch.setattr(manifest, "write_synsets", full)
    out = tmp_path / "out"
    assert prepare(official, out, "--partial") == 2
    assert f"no space left on the device writing {out / 'synsets.txt'}" in one_line(capsys)
    assert not (out / "prepared.json").exists()


def test_image_writes_report_a_full_disk():
    jpeg = fixtures.class_images(CLASSES[0], 1)[0]
    with pytest.raises(UserError, match="no space left on the device writing /dev/full"):
        images.write_file("/dev/full", jpeg)  # /dev/full: every write fails with ENOSPC
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:  # as prepare resizes
        with pytest.raises(UserError, match="no space left on the device writing /dev/full"):
            pool.submit(images.write_resized, [(jpeg, "/dev/full")], 32, 90).result()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount -t tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_disk(official, small_tmpfs, monkeypatch, capsys):
    out = small_tmpfs / "out"
    # leave a third of what the output needs, whatever the fixture images weigh (real JPEGs or drawn ones)
    payload = sum(f.stat().st_size for f in official.iterdir() if f.is_file())
    subprocess.run(["mount", "-o", f"remount,size={payload * 4}", str(small_tmpfs)], check=True)
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(small_tmpfs).free - payload // 3))
    with monkeypatch.context() as m:
        m.setattr(command, "check_space", lambda out, need: None)  # the disk fills up during the run
        assert prepare(official, out, "--partial", "--workers", "1") == 2
    assert "no space left on the device writing" in one_line(capsys)
    assert not (out / "prepared.json").exists()
    filler.unlink()
    assert prepare(official, out, "--partial", "--workers", "1") == 0
    assert doc(out)["splits"]["train"]["images"] == len(CLASSES) * PER_CLASS
