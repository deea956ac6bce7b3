"""Issue 7: no code runs from a checkpoint someone sent, checkpoints survive crashes and full disks, resume refuses
what it cannot continue exactly, learning rates follow the optimiser."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synth import QUICK, REPO, TINY, make_image_folder
from userside import small_file_system
from warmstart import checkpoint, config, trust
from warmstart.cli import COMMANDS, main
from warmstart.engine import recipe
from warmstart.errors import UserError



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK]) == 0
    return run / "checkpoints" / "last.pt"


def tampered(src: Path, dst: Path, **changes) -> Path:
    ckpt = torch.load(src, weights_only=True)
    ckpt["model_spec"] = {**ckpt["model_spec"], **changes}
    torch.save(ckpt, dst)
    return dst


def loaders(ckpt: Path, data: Path, tmp: Path) -> dict:
    """Every command that loads a checkpoint, as argv."""
    cmds = {"evaluate": ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "-j", "0"],
            "train -e": ["train", "-e", "--resume", str(ckpt), str(data), "-j", "0"],
            "finetune": ["finetune", "--from", str(ckpt), "--data", str(data), "--out", str(tmp / "ft"), "-j", "0",
                         "--epochs", "1"]}
    if "predict" in COMMANDS:
        cmds["predict"] = ["predict", "--checkpoint", str(ckpt), str(data / "val")]
    if "export" in COMMANDS:
        cmds["export"] = ["export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp / "m.st")]
    return cmds


@pytest.mark.parametrize("name,kwargs", [("os:system", {"command": "touch {marker}"}),
                                         ("subprocess:call", {"args": ["touch", "{marker}"]})])
def test_hostile_spec_never_runs(name, kwargs, trained, data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    kwargs = {k: (v.format(marker=marker) if isinstance(v, str) else [a.format(marker=marker) for a in v])
              for k, v in kwargs.items()}
    evil = tampered(trained, tmp_path / "evil.pt", name=name, kwargs=kwargs, source=None, source_file=None)
    for what, argv in loaders(evil, data, tmp_path).items():
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and name in err and "--trust-code" in err, (what, err)
        assert not marker.exists(), what
    import warmstart

    with pytest.raises(UserError, match="--trust-code"):
        warmstart.load_model(evil)
    assert not marker.exists()
    # as a user sees it: a real process, one line on stderr, no traceback
    r = subprocess.run([sys.executable, "-m", "warmstart", "evaluate", "--checkpoint", str(evil), "--data", str(data)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not marker.exists()


def test_trained_here_loads_tampered_asks_for_trust(trained, data, tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(trained), "--data", str(data), "-j", "0"]) == 0
    spec = torch.load(trained, weights_only=True)["model_spec"]
    cases = {"source": {"source": spec["source"] + "\nimport os  # added\n"},
             "name": {"name": spec["name"].replace(":TinyNet", ":Residual")},
             "kwargs": {"kwargs": {"width": 12}}}
    for what, change in cases.items():
        ckpt = tampered(trained, tmp_path / f"{what}.pt", **change)
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "-j", "0"]) == 2, what
        assert "--trust-code" in capsys.readouterr().err, what
    # the user read it and vouches for it
    assert main(["evaluate", "--checkpoint", str(tmp_path / "source.pt"), "--data", str(data), "-j", "0",
                 "--trust-code"]) == 0


def test_zoo_spec_with_file_reading_kwargs_is_refused(trained, tmp_path):
    ckpt = tampered(trained, tmp_path / "zoo.pt", name="timm:resnet18", source=None, source_file=None,
                    kwargs={"checkpoint_path": "/etc/passwd"})
    with pytest.raises(UserError, match="checkpoint_path"):
        checkpoint.load_model(ckpt)


def test_trust_list_lives_in_config_dir_not_cache(trained, monkeypatch, tmp_path):
    shared = tmp_path / "shared-cache"
    monkeypatch.setenv("WARMSTART_CACHE", str(shared))
    trust.trust({"name": "x.py:Net", "kwargs": {}, "source": "class Net: pass", "source_file": "x.py"})
    assert (Path(os.environ["XDG_CONFIG_HOME"]) / "warmstart" / "trusted-models.txt").is_file()
    assert not shared.exists() or not any(shared.rglob("trusted*"))


def test_embedded_source_dir_never_first_on_sys_path(tmp_path, monkeypatch):
    from warmstart.models import model_from_spec

    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    source = ("import os, sys\nos.environ['WS_TEST_PATH0'] = sys.path[0]\n"
              "import torch.nn as nn\nclass Net(nn.Linear):\n    def __init__(self, num_classes):\n"
              "        super().__init__(3, num_classes)\n")
    spec = {"name": f"{evil_dir}/net.py:Net", "kwargs": {}, "num_classes": 2, "source": source, "source_file": "net.py"}
    monkeypatch.delenv("WS_TEST_PATH0", raising=False)
    model_from_spec(spec, allow_code=True)
    assert os.environ["WS_TEST_PATH0"] != str(evil_dir)
    assert str(evil_dir) not in sys.path
    with pytest.raises(UserError, match="runs code"):  # nothing builds it without the trust check
        model_from_spec(spec)


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello, this is a text file\n" * 20, b""])
def test_not_a_checkpoint(content, tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a warmstart checkpoint"):
        checkpoint.load(path)


# ---------------------------------------------------------------- crashes and full disks

KILL_AT_SAVE = """
import os, signal, sys, torch
from warmstart import checkpoint
real, calls = torch.save, []
def save(obj, f, *a, **k):
    calls.append(str(f))
    if len(calls) == int(os.environ["KILL_AT"]):
        with open(f, "wb") as out:          # half a checkpoint on disk, then the process dies
            out.write(b"PK\\x03\\x04" + b"\\0" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
from warmstart.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_checkpoint_write_leaves_last_loadable(data, tmp_path):
    script = tmp_path / "kill_at_save.py"
    script.write_text(KILL_AT_SAVE)
    run = tmp_path / "run"
    argv = ["train", str(data), *TINY, "--out", str(run), "--epochs", "2", *QUICK, "--save-every-minutes", "100"]
    # writes: last.pt (epoch 1; best.pt is a hard link of it), last.pt (epoch 2): die during the second
    r = subprocess.run([sys.executable, str(script), *argv], env={**os.environ, "KILL_AT": "2"}, capture_output=True)
    assert r.returncode == -9, r.stderr[-500:]
    ckpts = run / "checkpoints"
    assert list(ckpts.glob(".*.tmp*")), "the killed save left its temp file"
    res = checkpoint.load_resumable(ckpts / "last.pt")
    assert res.train_state["position"]["epoch"] == 1
    assert main([*argv, "--resume", "auto"]) == 0
    assert not list(ckpts.glob(".*.tmp*")), "the next run removes temp files of killed saves"
    assert checkpoint.load_resumable(ckpts / "last.pt").train_state["position"]["epoch"] == 2


def _one_line_out_of_space(err: str, path_part: str):
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line or "Error" in line]
    assert len(lines) == 1 and "no space left" in lines[0] and path_part in lines[0], err
    assert "checkpoint" in lines[0] and "is intact" in lines[0] and "Traceback" not in err


def test_full_disk_during_save_is_one_line(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["train", str(data), *TINY, "--out", str(run), *QUICK]
    assert main([*argv, "--epochs", "1"]) == 0
    real = torch.save

    def full(obj, f, *a, **k):  # what torch's writer raises when the OS says ENOSPC mid-file
        with open(f, "wb") as out:
            out.write(b"\0" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 3975")

    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    assert main([*argv, "--epochs", "2", "--resume", "auto"]) == 2
    _one_line_out_of_space(capsys.readouterr().err, "checkpoints")
    assert not list((run / "checkpoints").glob(".*.tmp*"))
    monkeypatch.setattr(torch, "save", real)
    assert checkpoint.load_resumable(run / "checkpoints" / "last.pt").train_state["position"]["epoch"] == 1


def test_full_disk_on_a_real_small_file_system(data, tmp_path):
    """A 4 MB tmpfs that a 1-epoch run fits on, then filled up: the epoch-2 save meets a real ENOSPC from torch's
    writer. Needs root (mount); skipped otherwise."""
    with small_file_system(tmp_path / "small", "4m") as mnt:
        run = mnt / "run"
        argv = [sys.executable, "-m", "warmstart", "train", str(data), *TINY, "--out", str(run), *QUICK]
        subprocess.run([*argv, "--epochs", "1"], check=True, capture_output=True)
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 16 * 1024))
        r = subprocess.run([*argv, "--epochs", "2", "--resume", "auto"], capture_output=True, text=True)
        assert r.returncode == 2
        _one_line_out_of_space(r.stderr, str(run))  # the checkpoint, or whichever record of the run filled the disk
        assert not list(run.rglob(".*.tmp*"))
        assert checkpoint.load_resumable(run / "checkpoints" / "last.pt").train_state["position"]["epoch"] == 1


# ---------------------------------------------------------------- resume


def mid_epoch(src: Path, dst: Path, **layout) -> Path:
    """A copy of an end-of-epoch checkpoint that claims to have stopped 2 batches into its second epoch."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["train_state"]["position"]["batch_in_epoch"] = 2
    ckpt["train_state"]["layout"].update(layout)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


@pytest.mark.parametrize("flags,named", [(["-b", "8"], "batch-size 16 -> 8"), (["--accum-steps", "2"], "accum-steps"),
                                         ([], "world-size 2 -> 1")])
def test_mid_epoch_resume_with_other_batches_is_refused(flags, named, trained, data, tmp_path, capsys):
    layout = {"world_size": 2} if not flags else {}
    ckpt = mid_epoch(trained, tmp_path / "run" / "checkpoints" / "last.pt", **layout)
    capsys.readouterr()
    assert main(["train", str(data), *TINY, "--out", str(tmp_path / "run"), "--epochs", "2", *QUICK,
                 "--resume", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "twice" in err, err


def test_resume_at_epoch_boundary_with_new_batch_size_and_changed_lr(trained, data, tmp_path, capsys):
    import json
    import math

    run = tmp_path / "run"
    shutil.copytree(trained.parent.parent, run)
    capsys.readouterr()
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "3", *QUICK, "-b", "8",
                 "--lr-base", "0.2", "--resume", "auto"]) == 0
    log = (run / "log.txt").read_text()
    assert "batch-size 16 -> 8" in log and "continues at update" in log
    assert "--lr-base None -> 0.2" in log and "--epochs 1 -> 3" in log
    # what was done, not what was said: 96 images are 6 updates at batch 16, then 12 per epoch at batch 8; the
    # schedule is the new one (peak 0.2 x 8/256, cosine over 3 x 12 updates) at the update the run had reached
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["train_state"]["position"]["step"] == 36 and ckpt["train_state"]["position"]["epoch"] == 3
    peak = 0.2 * 8 / 256
    assert all(g["initial_lr"] == pytest.approx(peak) for g in ckpt["train_state"]["optimizer"]["param_groups"])
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 24 / 36)))  # after update 24


# ---------------------------------------------------------------- learning rates


@pytest.mark.parametrize("opt,batch,lr,rule", [("sgd", 1024, 1.6, "linear"), ("adamw", 1024, 1e-3, "sqrt"),
                                               ("lamb", 1024, 4e-3, "sqrt"), ("adamw", 256, 5e-4, "sqrt"),
                                               ("rmsprop", 1024, 1e-3, "sqrt"), ("lars", 1024, 1.6, "linear")])
def test_lr_follows_the_optimiser(opt, batch, lr, rule):
    cfg = config.TrainConfig(opt=opt)
    value, how = recipe.effective_lr(cfg, batch)
    assert value == pytest.approx(lr) and rule in how
    assert recipe.effective_lr(config.TrainConfig(opt=opt, lr=0.01), batch)[0] == 0.01
    ft, _ = recipe.effective_lr(cfg, batch, finetune=True)
    assert ft == pytest.approx(lr / 10)


def test_start_line_says_which_rule(data, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, "--out", str(run), "--epochs", "1", *QUICK, "--opt", "adamw"]) == 0
    assert "sqrt rule for adamw" in (run / "log.txt").read_text()


def test_train_warns_once_on_unverified_data(tmp_path, capsys):
    """Mini archives never match the official MD5s: prepare --partial accepts them and says so; train warns once."""
    from warmstart.prepare import fixtures

    classes = fixtures.pick_classes(3)
    fixtures.build_official(tmp_path / "archives", classes, 6, 6, bad_files=False)
    assert main(["prepare", "--archives", str(tmp_path / "archives"), "--out", str(tmp_path / "data"), "--partial"]) == 0
    capsys.readouterr()
    assert main(["train", str(tmp_path / "data"), *TINY, "--out", str(tmp_path / "run"), "--epochs", "1", *QUICK,
                 "-b", "4"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "unverified" in line]
    assert len(warnings) == 1 and "does not match its official MD5" in warnings[0], out


def test_recipe_sizes_follow_an_img_size_override():
    from warmstart.cli import build_parser

    argv = ["train", "d", "--config", str(REPO / "examples" / "recipes" / "fast.yaml"), "--img-size", "32"]
    cfg = config.resolve(build_parser(argv).parse_args(argv))
    assert (cfg.img_size, cfg.img_size_start, cfg.eval_size) == (32, 24, 40)  # 160->192 @224 scaled by 32/192
    argv = ["train", "d", "--img-size-start", "64", "--img-size", "32"]
    with pytest.raises(UserError, match="img-size-start 64 is above"):
        config.resolve(build_parser(argv).parse_args(argv))
