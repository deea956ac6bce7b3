"""warmstart predict on a checkpoint trained once for the module (TinyNet, 4 generated classes).

`trained` and `command` are shared with test_export.py and test_evaluate_report.py (they import them)."""

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from synth import make_image_folder
from warmstart import checkpoint, cli
from warmstart.data.transforms import Normalize, eval_resize_size, eval_transform, load_image
from warmstart.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"
WIDTH = 8  # TinyNet's features are 8 * width wide (its docstring and forward)


def command(*argv: str) -> int:
    """warmstart.cli.main(argv), also before cli.py lists the command (same parsing, same one-line errors)."""
    argv = [str(a) for a in argv]
    if argv[0] in cli.COMMANDS:
        return cli.main(argv)
    module = importlib.import_module(f"warmstart.{argv[0]}")
    parser = argparse.ArgumentParser(prog=f"warmstart {argv[0]}")
    module.add_arguments(parser)
    try:
        return int(module.run(parser.parse_args(argv[1:])) or 0)
    except UserError as e:
        print(f"warmstart {argv[0]}: error: {e}", file=sys.stderr)
        return 2


_TRAINED = []  # the test modules that import `trained` share one run: training is most of their time


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run, in its own cache and config dirs (conftest's are per test). Nothing writes into it
    but export's default-output test, beside the checkpoint."""
    if _TRAINED:
        return _TRAINED[0]
    root = tmp_path_factory.mktemp("trained")
    env = {"WARMSTART_CACHE": str(root / "cache"), "XDG_CONFIG_HOME": str(root / "config")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        data = make_image_folder(root / "data")
        assert cli.main(["train", str(data), "--model", TINYNET, "--model-kwargs", json.dumps({"width": WIDTH}),
                         "--out", str(root / "run"), "--epochs", "1", "--img-size", "32", "-b", "16", "-j", "0"]) == 0
    _TRAINED.append(SimpleNamespace(data=data, ckpt=root / "run" / "checkpoints" / "best.pt", env=env))
    return _TRAINED[0]


@pytest.fixture
def run(trained, monkeypatch):
    """The trained run, with its config dir in effect: the trust list that lets its TinyNet source load."""
    for k, v in trained.env.items():
        monkeypatch.setenv(k, v)
    return trained


def reference_probs(ckpt, path) -> torch.Tensor:
    """Softmax of the checkpoint's model on one image, preprocessed as its transform says."""
    loaded = checkpoint.load_model(ckpt)
    spec = loaded.transform
    x = eval_transform(spec)(load_image(path, eval_resize_size(spec)))[None]
    with torch.no_grad():
        return loaded.model(Normalize(spec["mean"], spec["std"])(x)).softmax(1)[0]


def test_predict_table_walks_folders_and_reports_unreadable_files(run, tmp_path, capsys):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    good = sorted((run.data / "val" / "c01").glob("*.jpg"))[:2]
    (photos / "a.jpg").write_bytes(good[0].read_bytes())
    (photos / "nested" / "b.JPG").write_bytes(good[1].read_bytes())
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "notes.txt").write_text("not an image: not picked up from a folder")
    capsys.readouterr()
    assert command("predict", "--checkpoint", run.ckpt, photos, tmp_path / "missing.jpg", "--top-k", "3", "-j", "0") == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["image", "prob", "class"]  # no human names for c00..c03: no name column
    assert len(lines) == 1 + 2 * 3  # header, then 3 rows for each of the 2 readable images
    starts = [line.split()[0] for line in lines[1::3]]
    assert starts == [str(photos / "a.jpg"), str(photos / "nested" / "b.JPG")]
    assert len({line.index("%") for line in lines[1:]}) == 1  # aligned: the prob column lines up
    assert "notes.txt" not in out + err
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 2 and all(line.startswith("warmstart predict: cannot read") for line in err_lines)
    assert "broken.jpg" in err and "missing.jpg" in err


def test_predict_json_lines_match_the_model(run, tmp_path, capsys):
    image = sorted((run.data / "val" / "c02").glob("*.jpg"))[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    capsys.readouterr()
    assert command("predict", "--checkpoint", run.ckpt, image, broken, "--top-k", "10", "--json", "-j", "0") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_path = {r["path"]: r for r in records}
    assert set(by_path) == {str(image), str(broken)} and "error" in by_path[str(broken)]
    top = by_path[str(image)]["top"]
    assert len(top) == 4  # --top-k beyond the number of classes: all of them
    assert set(top[0]) == {"class", "name", "prob"} and top[0]["name"] == top[0]["class"]  # no human names known
    probs = reference_probs(run.ckpt, image)
    assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-5)
    for t in top:
        assert t["prob"] == pytest.approx(probs[int(t["class"][1:])].item(), abs=1e-5)
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)


def test_predict_nothing_readable_is_one_line_error(run, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert command("predict", "--checkpoint", run.ckpt, tmp_path / "bad.jpg", "-j", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("warmstart predict: error: none of the 1 images")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert command("predict", "--checkpoint", run.ckpt, empty) == 2
    assert "no image files" in capsys.readouterr().err
