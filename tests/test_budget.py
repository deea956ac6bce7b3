"""--time-budget / --budget-images: the schedule follows progress through a budget (engine/budget.py)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from synth import QUICK, TINY, slow_model_source
from warmstart import checkpoint, options
from warmstart.cli import main
from warmstart.config import TrainConfig
from warmstart.engine import budget, recipe
from warmstart.errors import UserError


@pytest.mark.parametrize("text, seconds", [("45s", 45), ("90m", 5400), ("6h", 21600), ("1h30m", 5400),
                                           ("2m30s", 150), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert options.duration(text) == seconds


@pytest.mark.parametrize("text, said", [("0", "give a duration"), ("0s", "more than zero"), ("-5m", "give a duration"),
                                        ("soon", "give a duration"), ("", "give a duration"), ("5m5h", "give a duration")])
def test_bad_durations_are_one_line(text, said):
    with pytest.raises(UserError, match=said):
        options.duration(text)


def test_the_size_stays_low_then_ramps_to_the_final_size():
    sizes = [budget.size_at(p / 100, 48, 64) for p in range(101)]
    assert sizes[0] == sizes[70] == 48 and sizes[85] == sizes[100] == 64
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)


def test_the_recipes_sizes_are_three_quarters_and_four_thirds_halves_rounded_up():
    from warmstart.config import budget_sizes

    assert budget_sizes(64) == {"img_size_start": 48, "eval_img_size": 88}
    assert budget_sizes(192) == {"img_size_start": 144, "eval_img_size": 256}  # FFCV evaluates its 192 at 256
    assert budget_sizes(48)["img_size_start"] == 40  # 36 -> 40 (rounded to even it was 32)
    assert budget_sizes(8) == {"img_size_start": 8, "eval_img_size": 8}


def test_an_epoch_trains_at_the_size_of_its_middle_so_a_short_run_ends_at_the_final_size():
    """Sizes change at epoch starts only: taken at the progress an epoch starts from, a 5-epoch budget would train its
    last epoch (80-100%) at 56 px; at its middle (90%) it is 64. A resume mid-epoch keeps the epoch's size."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    b = budget.Budget("images", 5000.0)
    clock = budget.Clock(b, lambda w: recipe.build_scheduler(TrainConfig(sched="linear"), opt, 1, budget_warmup=w),
                         step=0, images_per_update=100, epoch_images=1000, warmup_images=0, start=48, final=64,
                         time_eval=lambda: 0.0)
    sizes, step = [], 0
    while not clock.done():
        sizes.append(clock.epoch_started())
        for _ in range(10):
            step += 1
            clock.step_update(step)
    assert sizes == [48, 48, 48, 48, 64]
    b.size, b.progress, b.images = 48, 0.9, 4500  # a checkpoint from half-way through an epoch begun at 48 px
    assert clock.epoch_started(resumed=True) == 48 and clock.epoch_started() == 64


def _lrs_through(b: budget.Budget, replans: dict, images_per_update: int = 10) -> list[float]:
    """The LR at every update of a budget run whose plan is changed to replans[update] on the way."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = recipe.build_scheduler(TrainConfig(sched="linear"), opt, 1, budget_warmup=b.warmup)
    lrs, update = [], 0
    while not b.done():
        update += 1
        if update in replans:
            b.total = max(replans[update], b.images + 1.0)
        b.advance(images_per_update)
        sched.step_update(b.unit)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_progress_never_goes_back_and_the_lr_never_rises_after_warmup_when_the_plan_changes():
    b = budget.Budget("time", 60.0)
    b.plan_images(1000, warmup_images=50)  # a 5% warmup
    lrs = _lrs_through(b, {20: 600, 40: 2000, 60: 900})  # estimates that shrink, grow, shrink
    peak = lrs.index(max(lrs))
    assert all(a >= c for a, c in zip(lrs[peak:], lrs[peak + 1:])), "the LR rose again after a re-plan"
    assert lrs[-1] == 0.0 and b.progress == 1.0 and b.images == 900  # decayed to zero exactly at the planned end


def test_an_image_budget_ends_at_its_images():
    b = budget.Budget("images", 500.0)
    b.plan_images(500, warmup_images=0)
    lrs = _lrs_through(b, {})
    assert len(lrs) == 50 and lrs[-1] == 0.0 and lrs[0] > lrs[-2] > 0


def test_replan_from_measured_rates_fits_the_time_left():
    b = budget.Budget("time", 100.0, rates={48: 100.0})  # 100 img/s at 48 px: 64 px is priced by pixels (56 img/s)
    total = b.replan(seconds_left=50.0, start=48, final=64, epoch_images=1000)
    # 70% of the images at 48 px, the ramp, then 64 px: between all-64 (2812) and all-48 (5000) images
    assert 2812 < total < 5000
    b.overhead, b.reserve = 10.0, 5.0  # an epoch end costs 10 s; 5 s kept for the last evaluation
    assert b.replan(50.0, 48, 64, epoch_images=1000) < total


def test_a_checkpoint_budget_is_checked(tmp_path):
    good = budget.Budget("time", 60.0, progress=0.5, images=100, total=200.0, rates={48: 10.0}, size=48).state()
    assert checkpoint._is_budget(good) and checkpoint._is_budget(None)
    for bad in ({**good, "kind": "forever"}, {**good, "progress": 2.0}, {**good, "used": float("nan")},
                {**good, "rates": {"48": 10.0}}, {**good, "rates": {48: -1.0}}, {**good, "code": "x"},
                {**good, "size": -8}, {**good, "size": 56.5}, {**good, "size": 48.0}, {**good, "size": 4},
                {**good, "size": 10**6}, {**good, "size": True}):
        assert not checkpoint._is_budget(bad), bad


@pytest.mark.parametrize("flags, said", [
    (["--time-budget", "soon"], "give a duration"),
    (["--time-budget", "0"], "give a duration"),
    (["--time-budget=-5m"], "give a duration"),  # (with a space argparse reads -5m as a flag)
    (["--time-budget", "5m", "--epochs", "3"], "a budget plans the epochs itself"),
    (["--time-budget", "5m", "--budget-images", "100"], "give one budget"),
    (["--time-budget", "1s"], "spent before training could start"),
])
def test_bad_budgets_are_one_line(flags, said, data, tmp_path, capsys):
    # in-process (cli.main prints what a user sees): a subprocess per case cost ~5 s of torch's import each
    assert main(["train", str(data), *TINY, *QUICK, "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and said in err, err


def test_an_image_budget_trains_its_images_and_ends_with_lr_zero(data, tmp_path):
    run = tmp_path / "run"
    # 96 training images, batch 16: 6 updates an epoch; 200 images = 13 updates (12.5, the last one whole)
    assert main(["train", str(data), *TINY, *QUICK, "--out", str(run), "--budget-images", "200"]) == 0
    ckpt = checkpoint.load(run / "checkpoints" / "last.pt")
    b = ckpt["train_state"]["budget"]
    assert b["kind"] == "images" and b["progress"] == 1.0 and b["images"] == 208 and ckpt["train_state"]["position"]["step"] == 13
    assert ckpt["train_state"]["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert ckpt["config"]["sched"] == "linear"  # the budget recipe, no --config given
    # its sizes: a start at 3/4 of --img-size 32, evaluation at 4/3 (42.7, rounded to 8) averaged with the mirror
    assert (ckpt["config"]["img_size_start"], ckpt["transform"]["size"], ckpt["config"]["tta"]) == (24, 40, "flip")
    lines = (run / "log.txt").read_text()
    assert "epoch 3 (budget 100% spent)" in lines and "val loss" in lines


def test_a_budget_run_killed_and_resumed_ends_as_the_uninterrupted_one(data, tmp_path):
    """SIGKILL mid-budget (data workers on), --resume auto: the same plan continues (the checkpoint carries it), the
    LR never rises again, and the end is bitwise the uninterrupted run's."""
    model = tmp_path / "slow.py"
    model.write_text(slow_model_source(0.1))
    env = {**os.environ, "WARMSTART_CACHE": str(tmp_path / "cache")}

    def cmd(run, *extra):
        return [sys.executable, "-m", "warmstart", "train", str(data), "--model", f"{model}:Slow", "--out", str(run),
                "--budget-images", "300", "--save-every-minutes", "0", *QUICK, "-j", "2", *extra]

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd(full), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd(killed), env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last, deadline, progress = killed / "checkpoints" / "last.pt", time.time() + 120, 0.0
    try:
        while time.time() < deadline and not 0.3 < progress < 0.8:
            with contextlib.suppress(Exception):  # a file being replaced
                progress = torch.load(last, weights_only=True)["train_state"]["budget"]["progress"]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0.3 < progress < 0.8, progress
    r = subprocess.run(cmd(killed, "--resume", "auto"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (full, killed))
    assert a["train_state"]["position"]["step"] == b["train_state"]["position"]["step"] == 19  # 300 / 16, whole
    assert b["train_state"]["budget"]["progress"] == 1.0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    lrs = [json.loads(line)["lr"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0  # after the 1-epoch warmup: only down
    for run in (full, killed):  # evaluated once, at the end: the resumed run too (its config.yaml says so)
        evaluated = ["val_top1" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert evaluated == [False] * (len(evaluated) - 1) + [True], (run, evaluated)


def test_flip_tta_averages_each_image_with_its_mirror(trained, data, capsys):
    from warmstart.engine import loop

    class LeftMinusRight(torch.nn.Module):  # logits that change sign when the image is mirrored
        def forward(self, x):
            d = x[..., : x.shape[-1] // 2].mean((1, 2, 3)) - x[..., x.shape[-1] // 2:].mean((1, 2, 3))
            return torch.stack([d, -d, torch.zeros_like(d)], 1)

    x = torch.rand(6, 3, 8, 8)
    batches = [(x, torch.zeros(6, dtype=torch.long), 0)]
    plain = loop.evaluate(LeftMinusRight(), batches, torch.nn.Identity(), torch.device("cpu"), show_progress=False)
    flip = loop.evaluate(LeftMinusRight(), batches, torch.nn.Identity(), torch.device("cpu"), show_progress=False,
                         tta="flip")
    assert flip["loss"] == pytest.approx(torch.log(torch.tensor(3.0)).item())  # the mirror cancels: uniform logits
    assert plain["loss"] != pytest.approx(flip["loss"])
    ckpt = str(trained / "checkpoints" / "best.pt")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(data), "-j", "0", "--tta", "flip", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 32


def test_fast_yaml_is_the_budget_recipe_at_imagenet_sizes():
    from pathlib import Path

    from warmstart import config

    recipe = config.load_yaml(str(Path(__file__).resolve().parents[1] / "examples" / "recipes" / "fast.yaml"))
    # but label smoothing: it pays over fast.yaml's 16 ImageNet epochs (FFCV) and costs at budgets of a few
    same = [k for k in config.BUDGET_DEFAULTS if k != "label_smoothing"]
    assert {k: recipe[k] for k in same} == {k: config.BUDGET_DEFAULTS[k] for k in same}
    sizes = config.budget_sizes(recipe["img_size"])  # 144 of 192, evaluated at 256
    assert recipe["img_size_start"] == sizes["img_size_start"] and recipe["eval_img_size"] == sizes["eval_img_size"]


def test_plan_measures_prints_the_schedule_and_trains_nothing(data, tmp_path, capsys, monkeypatch):
    from warmstart.engine import plan

    monkeypatch.setattr(plan, "SECONDS", 0.3)  # a short look at each size
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, *QUICK, "--out", str(run), "--budget-images", "480",
                 "--img-size-start", "24", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "size  epochs" in out and "LR by progress: 0% " in out and "expected wall time" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2] in ("24", "32")]
    assert [r[0] for r in rows] == ["24", "32"]  # the low size, then the final one (the ramp's steps in between)
    assert sum(float(r[1]) for r in rows) == pytest.approx(480 / 96, rel=0.05)  # 5 epochs of 96 images
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


SKEWED = """
import os, sys, time
if os.environ.get("RANK") == "1":  # this rank's clocks run twice as fast: alone, it would plan to stop much earlier
    for name in ("time", "perf_counter", "monotonic"):
        real = getattr(time, name)
        t0 = real()
        setattr(time, name, lambda real=real, t0=t0: t0 + 2 * (real() - t0))
from warmstart.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_two_ranks_whose_clocks_disagree_stop_at_the_same_update(data, tmp_path):
    """A time budget under torchrun x2: each rank measures its own speed, but rank 0's plan binds both, so both stop
    at the same update (a rank that stopped on its own would leave the other waiting in an all-reduce: a hang)."""
    model, skewed, run = tmp_path / "slow.py", tmp_path / "skewed.py", tmp_path / "run"
    model.write_text(slow_model_source(0.05))
    skewed.write_text(SKEWED)
    env = {**os.environ, "WARMSTART_CACHE": str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    t0 = time.time()
    r = subprocess.run([*torchrun, str(skewed), "train", str(data), "--model", f"{model}:Slow", "--out", str(run),
                        "--time-budget", "40s", *QUICK, "-b", "8"], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t0 < 40 * 1.05 + 10  # the budget, plus torchrun's own start and exit
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["train_state"]["budget"]["progress"] == 1.0
    assert ckpt["train_state"]["optimizer"]["param_groups"][0]["lr"] == 0.0


def test_finetune_under_a_budget_ramps_to_the_checkpoints_own_size(trained, data, tmp_path):
    """finetune takes its training size from the checkpoint (32 px here) after the budget recipe derived the first
    size from the default 224: that start (168 px) must follow the checkpoint's size, not ramp down to it."""
    run = tmp_path / "ft"
    assert main(["finetune", "--from", str(trained / "checkpoints" / "last.pt"), "--data", str(data), "--out", str(run),
                 "-b", "16", "-j", "0", "--budget-images", "100"]) == 0
    cfg = checkpoint.load(run / "checkpoints" / "last.pt")["config"]
    assert cfg["img_size"] == 32 and cfg["img_size_start"] == 24  # 3/4 of 32
    sizes = [json.loads(line)["img_size"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sizes == sorted(sizes) and max(sizes) <= 32, sizes


def test_a_plan_with_less_than_half_an_update_left_ends_now():
    """Re-planned at an epoch's end with 2 images to go (of 64 an update): the run ends there instead of starting an
    epoch for one update (what overran a 87 s budget by 3%)."""
    b = budget.Budget("time", 100.0, progress=0.99, images=9216, total=9300.0, rates={64: 100.0})
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    clock = budget.Clock(b, lambda w: recipe.build_scheduler(TrainConfig(sched="linear"), opt, 1, budget_warmup=w),
                         step=144, images_per_update=64, epoch_images=1152, warmup_images=0, start=48, final=64,
                         time_eval=lambda: 0.0)
    clock.budget.replan = lambda *a: 9218.0  # what the measured rates said
    assert clock.epoch_ending() and clock.done() and b.progress == 1.0 and b.images == 9216
    b.total = 9400.0
    clock.budget.replan = lambda *a: 9250.0  # half an update or more: one more update
    assert not clock.epoch_ending() and b.total == 9250.0


def test_a_budget_that_ends_at_an_epochs_end_evaluates_there(data, tmp_path, monkeypatch):
    """The re-plan at an epoch's end may find less than half an update left: the run ends there, and that epoch end
    is the last one, with the final evaluation and best.pt (it once re-planned after deciding not to evaluate)."""
    epoch = 6 * 16  # 96 images, batch 16; re-plans every 10 updates and at epoch ends (6, 12, 18)
    monkeypatch.setattr(budget.Budget, "replan",
                        lambda self, *a: self.images + 2.0 if self.images >= 3 * epoch else 10_000.0)
    run = tmp_path / "run"
    assert main(["train", str(data), *TINY, *QUICK, "--out", str(run), "--time-budget", "5m"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and "val_top1" in rows[-1] and "val_top1" not in rows[0]
    assert (run / "checkpoints" / "best.pt").is_file()
