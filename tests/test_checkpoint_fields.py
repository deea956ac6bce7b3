"""Issue 23, items 7-8: a checkpoint's fields are checked against each other (one class name per output, image sizes
in range, printable names), predict's table escapes what it prints, and export/predict I/O errors are one line; a
failed export leaves the output folder holding exactly what it held before.

User-facing checks run the CLI as a real process, in a bounded address space (MEMORY): a regression that builds a
30 GB image fails with MemoryError there instead of exhausting a shared machine."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from synth import REPO, make_image_folder
from userside import one_line_error, small_file_system
from warmstart import cli, export
from warmstart.errors import printable, shown

TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"
MEMORY = 8 * 2**30  # a predict or export of TinyNet peaks near 4 GB of address space (torch's libraries)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """TinyNet trained for one epoch on 4 generated classes (c00..c03); conftest's module config dir trusts it."""
    root = tmp_path_factory.mktemp("fields")
    data = make_image_folder(root / "data")
    assert cli.main(["train", str(data), "--model", TINYNET, "--model-kwargs", '{"width": 8}', "--img-size", "32",
                     "-b", "16", "-j", "0", "--epochs", "1", "--warmup-epochs", "0", "--out", str(root / "run")]) == 0
    return SimpleNamespace(data=data, ckpt=root / "run" / "checkpoints" / "best.pt",
                           image=sorted((data / "val" / "c01").glob("*.jpg"))[0])


def edited(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def warmstart(*argv, prefix=(), env=None) -> subprocess.CompletedProcess:
    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    return subprocess.run([*prefix, sys.executable, "-m", "warmstart", *map(str, argv)], capture_output=True,
                          text=True, encoding="utf-8", timeout=300, preexec_fn=bounded, env=env)


def unprivileged() -> list[str]:
    """A prefix under which permission bits apply: root writes and reads through them, except as the unmapped user
    of a new user namespace. Skips where that cannot be had."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") and subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--user"]
    pytest.skip("running as root without `unshare --user`: permission bits cannot be tested")


def tree(root: Path) -> dict:
    """Every path under root with its bytes (None for a folder)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- item 7: fields cross-checked


def _names(**classes):
    return lambda c: c["classes"].update(classes)


def _transform(**t):
    return lambda c: c["transform"].update(t)


def _no_classes_and(**spec):
    def edit(c):
        del c["classes"]
        c["model_spec"].update(spec)
    return edit


FIELD_CASES = {  # edit -> the field the one line names
    "fewer names than outputs": (_names(names=["c00", "c01"]), "classes.names (2 names for a model with 4 outputs"),
    "no names": (_names(names=[]), "classes.names (0 names"),
    "newline in a name": (_names(names=["c00", "c01\nc03   99.9%", "c02", "c03"]), "classes.names[1]"),
    "escape in a human name": (_names(human=["a", "b", "\x1b[2Jc", "d"]), "classes.human[2]"),
    "name too long": (_names(names=["c00", "c01", "c02", "c" * 5000]), "classes.names[3]"),
    "huge transform.size": (_transform(size=100000), "transform.size"),
    "huge eval resize": (_transform(crop_pct=0.001), "transform.crop_pct"),
    "huge config.img_size": (lambda c: c["config"].update(img_size=100000), "config.img_size"),
    "huge num_classes": (_no_classes_and(num_classes=10**12), "model_spec.num_classes"),
    "head rows": (lambda c: (c["model_spec"].update(head={"module": "head.1", "num_classes": 3}),
                             c["classes"].update(names=["c00", "c01", "c02"])), "model_spec.head"),
}


@pytest.mark.parametrize("case", FIELD_CASES)
def test_inconsistent_checkpoint_fields_are_one_line(case, trained, tmp_path):
    edit, named = FIELD_CASES[case]
    bad = edited(trained.ckpt, tmp_path / "bad.pt", edit)
    r = warmstart("predict", "--checkpoint", bad, trained.image, "-j", "0")
    one_line_error(r, f"malformed checkpoint field {named}")
    assert r.stdout == ""


def test_a_file_without_class_names_names_its_outputs_by_index(trained, tmp_path):
    """upgrade()'s default for a file from before classes were recorded: each output is named by its index."""
    old = edited(trained.ckpt, tmp_path / "old.pt", _no_classes_and())
    r = warmstart("predict", "--checkpoint", old, trained.image, "-j", "0", "--top-k", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(line.split()[-1] for line in r.stdout.splitlines()[1:]) == ["0", "1", "2", "3"]


def test_model_code_that_ignores_num_classes_is_caught_by_its_weights(trained, tmp_path):
    """num_classes says 2 and so do the names, but the (edited, --trust-code) source builds 4 outputs, which the
    4-row weights fit: no tensor of the weights is 2 wide."""
    def edit(c):
        spec = c["model_spec"]
        spec["source"] = spec["source"].replace("nn.Linear(8 * w, num_classes)", "nn.Linear(8 * w, 4)")
        spec["num_classes"] = 2
        c["classes"]["names"] = ["c00", "c01"]

    bad = edited(trained.ckpt, tmp_path / "bad.pt", edit)
    one_line_error(warmstart("predict", "--checkpoint", bad, trained.image, "-j", "0", "--trust-code"),
                   "malformed checkpoint field model_spec.num_classes (2 outputs, but no tensor of the model weights")


def test_shown_escapes_what_would_break_a_line():
    assert shown("a\nb\tc\x1b[31m\u202ed\u2028") == "a\\nb\\tc\\x1b[31m\\u202ed\\u2028"
    assert shown(os.fsdecode(b"\xff\xfe.jpg")) == "\\xff\\xfe.jpg"  # a non-UTF-8 file name: its bytes
    assert shown("tench, Tinca tinca — é 日本\u3000語") == "tench, Tinca tinca — é 日本\u3000語"
    assert printable("tench, Tinca tinca") and not printable("c01\r") and not printable(os.fsdecode(b"\xff"))


def test_predict_table_escapes_file_names(trained, tmp_path):
    """A newline in a file name forges no line; a non-UTF-8 name under a strict UTF-8 stdout prints escaped, and
    the images after it are still predicted."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a\nb.jpg", os.fsdecode(b"\xff\xfe.jpg"), "z.jpg"):
        shutil.copy(trained.image, photos / name)
    (photos / "bad\rname.jpg").write_bytes(b"not a jpeg")
    r = warmstart("predict", "--checkpoint", trained.ckpt, photos, "-j", "0", "--top-k", "2",
                  env={**os.environ, "PYTHONIOENCODING": "utf-8"})  # strict: an unencodable character raises
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1 + 3 * 2  # the header, 2 rows for each of the 3 images
    firsts = [line.split()[0] for line in lines[1::2]]  # sorted as predict walks the folder
    assert firsts == [str(photos / "a\\nb.jpg"), str(photos / "z.jpg"), str(photos / "\\xff\\xfe.jpg")]
    assert len({line.index("%") for line in lines[1:]}) == 1  # still aligned
    err = r.stderr.strip().splitlines()  # the unreadable file: one line, its name escaped too
    assert len(err) == 1 and f"cannot read {photos / 'bad'}\\rname.jpg" in err[0], err


def test_an_unreadable_checkpoint_is_one_line(trained, tmp_path):
    prefix = unprivileged()
    ckpt = tmp_path / "secret.pt"
    shutil.copy(trained.ckpt, ckpt)
    ckpt.chmod(0)
    one_line_error(warmstart("predict", "--checkpoint", ckpt, trained.image, "-j", "0", prefix=prefix),
                   f"cannot read checkpoint {ckpt}: Permission denied")


# ---------------------------------------------------------------- item 8: export I/O


def _read_only(root: Path) -> None:
    (root / "ro").mkdir()
    (root / "ro" / "kept.txt").write_text("here before")
    (root / "ro").chmod(0o555)


EXPORT_CASES = {  # where -> (--out under root, set-up, what the one line says)
    "read-only folder": ("ro/m.safetensors", _read_only, "Permission denied"),
    "new folder in a read-only one": ("ro/new/sub/m.safetensors", _read_only, "Permission denied"),
    "a file as its folder": ("afile/m.safetensors", lambda root: (root / "afile").write_text("x"),
                             "afile is a file, not a folder"),
    "below a file": ("afile/sub/m.safetensors", lambda root: (root / "afile").write_text("x"),
                     "afile is a file, not a folder"),
    "FILE.json is a folder": ("m.safetensors", lambda root: (root / "m.safetensors.json").mkdir(),
                              "m.safetensors.json is a folder"),
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_where_it_cannot_write_is_one_line_and_writes_nothing(case, trained, tmp_path):
    out, set_up, says = EXPORT_CASES[case]
    root = tmp_path / "out"
    root.mkdir()
    (root / "earlier.txt").write_text("an earlier file")
    prefix = unprivileged() if set_up is _read_only else []
    set_up(root)
    before = tree(root)
    try:
        r = warmstart("export", "--checkpoint", trained.ckpt, "--format", "safetensors", "--out", root / out,
                      prefix=prefix)
        one_line_error(r, f"cannot write {root / out}", says)
        assert tree(root) == before
    finally:
        if (root / "ro").exists():
            (root / "ro").chmod(0o755)


def test_a_failed_export_removes_the_folders_it_made(trained, tmp_path, monkeypatch, capsys):
    """An export whose file does not match PyTorch (its comparison made to fail) leaves no folder it made."""
    out = tmp_path / "new" / "a" / "m.safetensors"
    real = export.EXPORTERS["safetensors"]
    monkeypatch.setitem(export.EXPORTERS, "safetensors", export.Exporter(
        real.extension, real.title, real.note, real.write, real.load, compare=lambda *args: 1.0))
    assert cli.main(["export", "--checkpoint", str(trained.ckpt), "--format", "safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differs from PyTorch" in err and "nothing was written" in err, err
    assert list(tmp_path.iterdir()) == []


def test_every_destination_is_checked_before_any_is_moved(trained, tmp_path, monkeypatch, capsys):
    """FILE.json's place becomes a folder while the export runs: the check before moving catches it, and the model
    file is not moved into place either."""
    out = tmp_path / "m.safetensors"
    real = export.EXPORTERS["safetensors"]

    def write(model, sample, target, embedded, opset):
        (tmp_path / "m.safetensors.json").mkdir()
        return real.write(model, sample, target, embedded, opset)

    monkeypatch.setitem(export.EXPORTERS, "safetensors", export.Exporter(
        real.extension, real.title, real.note, write, real.load))
    assert cli.main(["export", "--checkpoint", str(trained.ckpt), "--format", "safetensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "m.safetensors.json is a folder" in err
    assert tree(tmp_path) == {"m.safetensors.json": None}


def test_export_onto_a_full_disk_is_one_line_and_writes_nothing(trained, tmp_path):
    """A 256 KB tmpfs for TinyNet's 490 KB of weights (torch.jit.save would abort the process on it). Needs root
    (mount); skipped otherwise."""
    with small_file_system(tmp_path / "small", "256k") as small:
        r = warmstart("export", "--checkpoint", trained.ckpt, "--format", "torchscript", "--out", small / "m.pt")
        one_line_error(r, "no space left on the device", "nothing was written")
        assert tree(small) == {}


def test_a_good_export_keeps_the_folders_it_made(trained, tmp_path):
    out = tmp_path / "new" / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(trained.ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    assert sorted(tree(tmp_path)) == ["new", "new/m.safetensors", "new/m.safetensors.json"]
    assert json.loads((tmp_path / "new" / "m.safetensors.json").read_text())["classes"] == ["c00", "c01", "c02", "c03"]
