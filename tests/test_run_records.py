"""A run folder is data: tampered or half-deleted records give one line (or a skipped line), never a traceback, and a
finished run is never written over; every numeric setting is checked before any work; a NaN loss stops the run
without saving over the last good checkpoint."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synth import QUICK, TINY, make_image_folder
from userside import cli, one_line_error


def snapshot(run: Path) -> dict:
    return {p: p.read_bytes() for p in (run / "checkpoints" / "best.pt", run / "metrics.jsonl")}


@pytest.mark.parametrize("last", ["deleted", "dangling", "a folder"])
def test_a_finished_run_without_its_last_pt_is_never_written(last, trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / "checkpoints" / "last.pt"
    path.unlink()
    if last == "dangling":
        path.symlink_to(tmp_path / "gone.pt")
    elif last == "a folder":
        path.mkdir()
    before = snapshot(run)
    one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "1", *QUICK), str(run))
    one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "2", *QUICK, "--resume", "auto"), str(run))
    assert snapshot(run) == before


def test_a_recipe_cannot_choose_where_or_whether_a_run_writes(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    quick = ["--img-size", "32", "-b", "16", "--warmup-epochs", "0"]  # QUICK's -j would override the recipe's
    for setting in (f"out: {run}\nresume: auto\nepochs: 2\n", "evaluate: true\n", "workers: 100000\n"):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(setting)
        one_line_error(cli("train", data, *TINY, "--config", recipe, "--out", tmp_path / "other", *quick, "--epochs", "1"),
                 str(recipe), setting.split(":")[0])
    assert snapshot(run) == before and not (tmp_path / "other").exists()


@pytest.mark.parametrize("text,named", [
    ("epochs: &a 3\nlr: *a\n", "aliases"),  # a 'billion laughs' needs them; a real one would not finish parsing
    ("[" * 200_000, "not valid YAML"), ("1: 2\n", "must be text"), ("null: 3\n", "must be text"),
    ("epochs: [1, 2]\n", "bad value for epochs"), ("- epochs\n", "holds a list")])
def test_a_hostile_recipe_is_one_line(text, named, data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    one_line_error(cli("train", data, *TINY, "--config", recipe, "--out", tmp_path / "r", *QUICK), str(recipe), named)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("odd", ["config.yaml", "metrics.csv", "curves.png", "checkpoints"])
def test_a_record_that_is_not_a_file_is_one_line(odd, trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    path = run / odd
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir() if odd != "checkpoints" else path.write_text("not a folder")
    one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "2", *QUICK, "--resume", "auto"), odd)


def test_tampered_metrics_lines_are_skipped_and_the_run_advances(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"[" * 200_000 + b"\n" + b"\xff\xfe not json\n")
    r = cli("train", data, *TINY, "--out", run, "--epochs", "3", *QUICK, "--resume", "auto")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    import torch

    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]["position"]["epoch"] == 3
    assert (run / "metrics.csv").read_text().count("\n") == 4  # the header and epochs 1-3: the junk is no row


def test_a_huge_metrics_file_is_one_line(trained, data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.truncate(8 * 2**30)  # sparse: no disk used
    one_line_error(cli("train", data, *TINY, "--out", run, "--epochs", "2", *QUICK, "--resume", "auto"), "metrics.jsonl")


@pytest.mark.parametrize("flag", [["--min-scale", "nan"], ["--min-lr", "nan"], ["--img-size-start", "1"],
                                  ["--seed", "99999999999999999999"], ["--lr", "1e308"], ["--lr", "nan"],
                                  ["--auto-augment", "randaugment-99"], ["--eval-img-size", "-5"],
                                  ["--crop-pct", "nan"], ["--img-size", "1000000"], ["--clip-grad", "inf"]])
def test_numeric_settings_are_checked_before_any_work(flag, data, tmp_path):
    one_line_error(cli("train", data, *TINY, "--out", tmp_path / "r", *QUICK, *flag), flag[0])
    assert not (tmp_path / "r").exists()


NAN_AFTER = '''
import torch
from torch import nn

class Diverges(nn.Module):
    """A small convnet whose training forward turns to NaN at its 4th call (the 4th update, batch 16)."""
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, num_classes))
        self.calls = 0
    def forward(self, x):
        self.calls += self.training
        out = self.net(x)
        return out * float("nan") if self.training and self.calls > 4 else out
'''


def test_a_nan_loss_stops_the_run_naming_the_update_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """The dry run is the model's first training forward: updates 1-3 are finite, the 4th is NaN. Epoch 1 (6
    updates) is saved after update 2 by --save-every-minutes 0; the NaN one is never saved."""
    model = tmp_path / "diverges.py"
    model.write_text(NAN_AFTER)
    run = tmp_path / "run"
    r = cli("train", data, "--model", f"{model}:Diverges", "--out", run, "--epochs", "2", *QUICK,
            "--save-every-minutes", "0", "--trust-code")
    one_line_error(r, "NaN or infinite at update 4", "last.pt")
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["train_state"]["position"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_dataset_record_that_is_not_text_is_one_line(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=2)
    (data / "synsets.txt").write_bytes(b"c00 \xff\xfe tench\n")
    one_line_error(cli("train", data, *TINY, "--out", tmp_path / "r", "--epochs", "1", *QUICK), "synsets.txt",
                   "UTF-8")


@pytest.mark.parametrize("argv", [["bench", "train", "--model", "resnet18", "--synthetic", "--settle", "nan"],
                                  ["predict", "--checkpoint", "x.pt", "--top-k", "0", "x.jpg"],
                                  ["export", "--checkpoint", "x.pt", "--tolerance", "nan"],
                                  ["prepare", "--from-folder", ".", "--out", "x", "--workers", "100000"]])
def test_other_commands_numeric_flags_are_checked_as_parsed(argv, tmp_path):
    r = subprocess.run([sys.executable, "-m", "warmstart", *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2 and "must be from" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert not (tmp_path / "x").exists()
