"""warmstart train / evaluate end to end on generated data (and on Imagenette when ../shared/data is present)."""

import contextlib
import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from synth import make_image_folder, slow_model_source
from warmstart.cli import main
from warmstart.prepare.fixtures import shared_data

REPO = Path(__file__).resolve().parents[1]
TINYNET = str(REPO / "examples" / "tinynet.py") + ":TinyNet"
SHARED = shared_data() or REPO.parent / "shared" / "data"  # same lookup as the fixtures ($WARMSTART_SHARED_DATA)
QUICK = ["--img-size", "32", "-b", "16", "-j", "0", "--warmup-epochs", "0.5", "--lr-base", "0.4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("synth"))


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_tinynet_learns_and_writes_run_dir(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), "--model", TINYNET, "--model-kwargs", '{"width": 16}', "--out", str(run),
                 "--epochs", "6", "--ema", "--ema-decay", "0.9", *QUICK]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert max(r["val_top1"] for r in rows) >= 75.0, rows  # 4 classes: chance is 25%
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "curves.png", "log.txt"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert "class TinyNet" in ckpt["model_spec"]["source"]
    assert ckpt["classes"]["names"] == ["c00", "c01", "c02", "c03"]
    assert ckpt["transform"]["size"] == 40 and ckpt["ema"] is not None  # evaluated at 1.25 x 32

    # evaluate with the checkpoint's own preprocessing reproduces the training-time figure
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--data", str(data),
                 "-j", "0", "--json"]) == 0
    m = last_json(capsys.readouterr().out)
    assert m["count"] == 32 and set(m) >= {"count", "top1", "top5", "loss"}
    best_key = "ema_val_top1" if ckpt["prefer_ema"] else "val_top1"
    assert m["top1"] == pytest.approx(ckpt["metrics"][best_key])
    # the classic example's -e --resume form does the same
    assert main(["train", "-e", "--resume", str(run / "checkpoints" / "best.pt"), str(data), "-j", "0"]) == 0
    assert f"top-1 {m['top1']:.2f}%" in capsys.readouterr().out


SLOW_MODEL = slow_model_source(0.15)


def _train_cmd(data, model_file, run, *extra):
    return [sys.executable, "-m", "warmstart", "train", str(data), "--model", f"{model_file}:Slow", "--out", str(run),
            "--epochs", "2", "--seed", "7", "--mixup", "0.2", "--save-every-minutes", "0", *QUICK, "-j", "1", *extra]


def test_sigkill_mid_epoch_then_resume_at_once_is_bitwise_identical(data, tmp_path):
    """The main process alone is killed (its two data workers live on for seconds) and the same command with
    --resume auto runs at once, as a requeue or a retry wrapper would: the workers must not hold the run's lock."""
    model_file = tmp_path / "slow.py"
    model_file.write_text(SLOW_MODEL)
    env = {**os.environ, "WARMSTART_CACHE": str(tmp_path / "cache")}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(data, model_file, full, "-j", "2"), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(data, model_file, killed, "-j", "2"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline, position = killed / "checkpoints" / "last.pt", time.time() + 120, None
    while time.time() < deadline:
        if last.exists():
            position = torch.load(last, weights_only=True)["train_state"]["position"]
            if position["epoch"] == 1 and position["batch_in_epoch"] >= 2:
                break
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the data workers notice their parent's death only at their next queue poll (up to 5 s): meanwhile the lock
    # must already be free, which it is only if they never held it
    with open(killed / ".lock") as lock:
        alive = [w for w in workers if os.path.exists(f"/proc/{w}")]
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a worker holds the run's lock
    assert len(workers) >= 2 and alive, (workers, alive)  # the check above was made while they lived
    assert position and position["epoch"] == 1 and 0 < position["batch_in_epoch"] < 6, position
    try:
        r = subprocess.run(_train_cmd(data, model_file, killed, "-j", "2", "--resume", "auto"), env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the first run's orphaned workers, if any are left

    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["train_state"]["position"] == b["train_state"]["position"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"]["val_top1"] == b["metrics"]["val_top1"]
    # the resumed epoch's train loss averages all of its batches, those before the kill included
    rows = [{r["epoch"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}[2]
            for run in (full, killed)]
    assert rows[1]["train_images"] == rows[0]["train_images"]
    assert rows[1]["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-5)


def test_pickled_code_in_checkpoint_is_refused(data, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": Evil(), "model_spec": {}}, f)
    assert main(["evaluate", "--checkpoint", str(bad), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to load" in err and len(err.splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("arch", ["resnet18", "timm:resnet18"])
def test_zoo_models_train(arch, data, tmp_path):
    assert main(["train", str(data), "-a", arch, "--out", str(tmp_path / "run"), "--epochs", "1", *QUICK]) == 0
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


def test_user_errors_are_one_line(data, tmp_path, capsys):
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from torch import nn\n\ndef Wrong(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(3))\n")
    cases = [
        ["-a", "resnet5O"],
        ["--model", str(tmp_path / "missing.py") + ":Net"],
        ["--model", f"{wrong}:Wrong"],
        ["--model", "resnet18", "--config", str(tmp_path / "nope.yaml")],
    ]
    for extra in cases:
        rc = main(["train", str(data), "--out", str(tmp_path / "r"), "--epochs", "1", *QUICK, *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("warmstart train: error:"), (extra, err)
    assert main(["train", str(tmp_path / "no-such-dir"), "-a", "resnet18"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recipes_parse_and_flags_override(tmp_path):
    from warmstart.cli import build_parser
    from warmstart.config import resolve

    recipes = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for r in recipes:
        argv = ["train", "d", "--config", str(r), "--epochs", "3"]
        cfg = resolve(build_parser(argv).parse_args(argv))
        assert cfg.epochs == 3 and cfg.data == "d"
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    argv = ["train", "d", "--config", str(bad)]
    with pytest.raises(Exception, match="unknown option"):
        resolve(build_parser(argv).parse_args(argv))


@pytest.mark.skipif(not (SHARED / "imagenette-dev").is_dir(), reason=f"real images not found at {SHARED} (CI has them)")
def test_tinynet_learns_imagenette_quickly(tmp_path):
    """A short real-image run must clearly learn (10 classes: chance is 10%)."""
    run = tmp_path / "run"
    t0 = time.time()
    assert main(["train", str(SHARED / "imagenette-dev"), "--model", TINYNET, "--img-size", "48", "--epochs", "4",
                 "--out", str(run)]) == 0
    assert time.time() - t0 < 120
    best = max(json.loads(line)["val_top1"] for line in (run / "metrics.jsonl").read_text().splitlines())
    assert best >= 35.0


UNUSED_PARAM_MODEL = '''
from torch import nn

class WithSpare(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, num_classes))
        self.spare = nn.Linear(4, 4)  # never used: DDP must be told, or it hangs
    def forward(self, x):
        return self.net(x)
'''


def test_torchrun_two_cpu_processes_count_every_val_image_once(data, tmp_path):
    """DDP over Gloo, the same code path as many GPUs: sharded data, reduced metrics, rank-0 writes,
    a parameter that gets no gradient."""
    run = tmp_path / "ddp"
    model_file = tmp_path / "spare.py"
    model_file.write_text(UNUSED_PARAM_MODEL)
    env = {**os.environ, "WARMSTART_CACHE": str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"]
    subprocess.run([*torchrun, "-m", "warmstart", "train", str(data), "--model", f"{model_file}:WithSpare",
                    "--out", str(run), "--epochs", "2", "--accum-steps", "2", *QUICK, "-b", "8"],
                   check=True, env=env, capture_output=True, timeout=300)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_count"] for r in rows] == [32, 32] and rows[-1]["train_images"] == 96  # 2 x 48: whole updates
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    out = subprocess.run([sys.executable, "-m", "warmstart", "evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                          "--data", str(data), "-j", "0", "--weights", "model", "--json"],
                         check=True, env=env, capture_output=True, text=True).stdout
    assert last_json(out)["top1"] == pytest.approx(rows[-1]["val_top1"])


def test_resume_between_epochs_with_partial_accumulation_is_exact(data, tmp_path):
    """96 images at -b 8 x --accum-steps 5: the epoch is trimmed to whole updates, so nothing leaks across it."""
    args = [str(data), "--model", TINYNET, "--model-kwargs", '{"width": 8}', *QUICK, "-b", "8", "--accum-steps", "5",
            "--ema", "--sched", "step", "--decay-epochs", "1"]
    assert main(["train", *args, "--out", str(tmp_path / "a"), "--epochs", "2"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--epochs", "1"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--epochs", "2", "--resume", "auto"]) == 0
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True) for r in "ab")
    assert a["train_state"]["position"]["step"] == 4  # 80 of 96 images per epoch: 2 updates of 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k


def test_checkpoint_code_from_elsewhere_needs_trust_code(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), "--model", TINYNET, "--model-kwargs", '{"width": 8}', "--out", str(run),
                 "--epochs", "1", "--sched", "constant", *QUICK]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    marker = tmp_path / "ran"
    ckpt["model_spec"]["source"] += f"\nimport pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    torch.save(ckpt, tmp_path / "tampered.pt")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "tampered.pt"), "--data", str(data), "-j", "0"]) == 2
    assert "--trust-code" in capsys.readouterr().err and not marker.exists()
    assert main(["evaluate", "--checkpoint", str(tmp_path / "tampered.pt"), "--data", str(data), "-j", "0",
                 "--trust-code"]) == 0
    assert marker.exists()  # the user asked for it, on purpose
