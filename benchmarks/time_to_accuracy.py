"""Time to accuracy: `warmstart train --time-budget` against timm's train.py, same model, data and machine.

    python benchmarks/time_to_accuracy.py --timm /path/to/timm-checkout --data ../shared/data/imagenette-dev
        [--rounds 2] [--model resnet18 --img-size 64 --epochs 10 -b 64 --workers 2] [--budget auto|DURATION]
        [--holdout 0.2] [--curve] [--fixed] [--out DIR] [--json]

Rounds alternate the sides (timm first in odd rounds, warmstart first in even ones); each command starts after a
`sync`, a pause of --settle seconds and an untimed read of the dataset's files, as benchmarks/prepare.py does (this
VM's page cache is emptied from outside, so each side starts with the images in memory; nothing is deleted while
the benchmark runs, so prepare.py's 361 s ext4 wait does not apply). Commands:

  timm       python TIMM/train.py --data-dir D --train-split train --val-split val --model M --num-classes N
             --img-size S --epochs E -b B --workers W --device cpu --no-prefetcher --warmup-epochs 2 --lr-base 0.4
             --weight-decay 5e-4 --opt sgd --smoothing 0.1 --seed 0 --output OUT --experiment timm, plus
             --amp --amp-dtype bfloat16 / --channels-last where warmstart chooses bf16 / channels_last: predicted
             before round 1 with warmstart's own test (engine.loop.native_bf16), checked against the `precision:`
             line of every warmstart run.
  warmstart  python -m warmstart train D -a M --img-size S --time-budget T -b B -j W --seed 0 --device cpu
             --out OUT, no recipe flags. T: half of timm's wall time in the round (--budget auto; round 1's when
             warmstart goes first), or --budget DURATION. --curve adds --eval-every 1: an evaluation per epoch,
             paid from the budget (without it warmstart evaluates only at the end: its curve is one point, and
             the first time it reached timm's final top-1 is not known, only whether it did). timm evaluates
             every epoch (its default), inside its measured time.
  --fixed    also warmstart's fixed-epoch default: ... --epochs E --eval-every 1 instead of --time-budget.

Wall time: each whole command, process start to exit. Per epoch, the time (from the command's start) at which the
line reporting that epoch's evaluation came down the pipe (timm: its last `Test: [n/n]` line; warmstart: its
`epoch N ... | val ...` line), with top-1 from timm's summary.csv (eval_top1) and warmstart's metrics.csv (val_top1).
--holdout F keeps F of each class of D/train out of training (seeded, stratified, symlinks under OUT/data; val/ is
D/val) and scores the final checkpoints on it: timm's last.pth.tar with TIMM/validate.py (its default preprocessing
at S), warmstart's checkpoints/last.pt with `warmstart evaluate --json` (its own preprocessing, and --tta flip where
its run evaluated so: the budget recipe does); both in fp32. Everything stays in OUT.
"""

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from warmstart.engine.loop import native_bf16
from warmstart.errors import UserError
from warmstart.options import duration

REPO = Path(__file__).resolve().parents[1]
TIMM_TEST_END = re.compile(r"^Test: \[\s*(\d+)/(\d+)\]")  # timm's validate(): the line of the last eval batch
WS_EPOCH = re.compile(r"epoch \d+.* @\d+px: (train loss|trained before).*\| val ")  # an epoch that evaluated
PRECISION = re.compile(r"precision: (\w+)(?: autocast)?, (channels_last|NCHW)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", type=Path, required=True, help="a timm checkout holding train.py and validate.py")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder dataset with train/ and val/")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="resnet18", help="a name both timm and torchvision know")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10, help="timm's epochs (and --fixed's)")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="for both sides (default: cpu)")
    p.add_argument("--budget", default="auto", help="warmstart's --time-budget: auto (half of timm's wall time) or "
                   "a duration (45s, 2m)")
    p.add_argument("--holdout", type=float, default=0.0, metavar="F", help="hold out F of each train class")
    p.add_argument("--curve", action="store_true", help="warmstart evaluates every epoch (costs budget time)")
    p.add_argument("--fixed", action="store_true", help="also warmstart --epochs E --eval-every 1")
    p.add_argument("--settle", type=float, default=5.0, metavar="S", help="pause before each command (default 5)")
    p.add_argument("--out", type=Path, help="new folder for everything (default: benchmarks/runs/tta-<time>)")
    p.add_argument("--json", action="store_true", help="make the last line of stdout one JSON object")
    args = p.parse_args()
    if not (args.timm / "train.py").is_file() or not (args.timm / "validate.py").is_file():
        p.error(f"--timm {args.timm}: no train.py and validate.py there")
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        p.error(f"--data {args.data}: needs train/ and val/")
    if args.budget != "auto":
        try:
            duration(args.budget)  # warmstart's own parser: refused now, not after timm's run
        except UserError as e:
            p.error(str(e))
    if not 0 <= args.holdout < 1:
        p.error("--holdout: a fraction in [0, 1)")
    args.out = args.out or REPO / "benchmarks" / "runs" / time.strftime("tta-%Y%m%d-%H%M%S")
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} is not empty")
    args.classes = sorted(d.name for d in (args.data / "train").iterdir() if d.is_dir())
    return args


def link_all(folder: Path, files: list[Path]) -> None:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())


def holdout_split(data: Path, out: Path, fraction: float, classes: list[str], seed: int = 0) -> Path:
    """OUT/data: train/ = 1 - fraction of each class of data/train, holdout/ = the rest (at least one image a
    class), val/ = data/val; symlinks to the files, drawn with a seeded shuffle per class."""
    root, rng = out / "data", random.Random(seed)
    for cls in classes:
        files = sorted(f for f in (data / "train" / cls).iterdir() if f.is_file())
        rng.shuffle(files)
        k = max(1, round(fraction * len(files)))
        link_all(root / "holdout" / cls, files[:k])
        link_all(root / "train" / cls, files[k:])
    for cls in sorted(d.name for d in (data / "val").iterdir() if d.is_dir()):
        link_all(root / "val" / cls, sorted(f for f in (data / "val" / cls).iterdir() if f.is_file()))
    return root


def settle(data: Path, seconds: float) -> None:
    """Sync, pause, then read the dataset's files once, untimed (benchmarks/prepare.py's `timed`, which cannot be
    reused as is: it discards the output this benchmark reads). Skipped if they would not fit in half the free
    memory: then they could not stay cached anyway."""
    subprocess.run(["sync"])
    time.sleep(seconds)
    files = [Path(d) / f for d, _, names in os.walk(data, followlinks=True) for f in names]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if sum(f.stat().st_size for f in files) < free / 2:
        for f in files:
            f.read_bytes()


def run_logged(cmd: list[str], log: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run cmd, stderr merged into stdout; -> (wall seconds, [(seconds since start, line)]), the output also in
    `log`. A failing command ends the benchmark with the command and its last lines."""
    lines, env = [], {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                               env=env) as proc:  # text mode: a tqdm '\r' ends a line too
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            f.write(line)
        proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        sys.exit(f"FAILED ({proc.returncode}): {' '.join(cmd)}\n{tail}\n(full output: {log})")
    return wall, lines


def timm_run(args, data: Path, out: Path, precision: tuple[str | None, bool]) -> dict:
    """timm's train.py with the issue's hyperparameters and warmstart's precision and layout, into OUT/timm."""
    cmd = [sys.executable, str(args.timm / "train.py"), "--data-dir", str(data), "--train-split", "train",
           "--val-split", "val", "--model", args.model, "--num-classes", str(len(args.classes)),
           "--img-size", str(args.img_size), "--epochs", str(args.epochs), "-b", str(args.batch_size),
           "--workers", str(args.workers), "--device", args.device, "--no-prefetcher", "--warmup-epochs", "2",
           "--lr-base", "0.4", "--weight-decay", "5e-4", "--opt", "sgd", "--smoothing", "0.1", "--seed", "0",
           "--output", str(out.parent), "--experiment", out.name]
    amp, channels_last = precision
    if amp:
        cmd += ["--amp", "--amp-dtype", {"bf16": "bfloat16", "fp16": "float16"}[amp]]
    if channels_last:
        cmd += ["--channels-last"]
    out.parent.mkdir(parents=True, exist_ok=True)
    wall, lines = run_logged(cmd, out.with_suffix(".log"))
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    ends = [t for t, line in lines if (m := TIMM_TEST_END.match(line)) and m[1] == m[2]]
    if len(ends) != len(rows):
        sys.exit(f"timm: {len(rows)} rows in summary.csv but {len(ends)} evaluations in {out.with_suffix('.log')}")
    curve = [(round(t, 1), float(r["eval_top1"])) for t, r in zip(ends, rows)]
    return {"cmd": cmd, "wall_s": round(wall, 1), "curve": curve, "top1": curve[-1][1],
            "checkpoint": str(out / "last.pth.tar")}


def warmstart_run(args, data: Path, out: Path, budget: str | None, eval_every: bool) -> dict:
    """`warmstart train` under --time-budget (budget given) or its fixed-epoch default (--epochs E)."""
    cmd = [sys.executable, "-m", "warmstart", "train", str(data), "-a", args.model, "--img-size", str(args.img_size),
           *(["--time-budget", budget] if budget else ["--epochs", str(args.epochs)]), "-b", str(args.batch_size),
           "-j", str(args.workers), "--seed", "0", "--device", args.device, "--out", str(out)]
    if eval_every:
        cmd += ["--eval-every", "1"]
    out.parent.mkdir(parents=True, exist_ok=True)
    wall, lines = run_logged(cmd, out.with_suffix(".log"))
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_top1")]
    ends = [t for t, line in lines if WS_EPOCH.search(line)]
    if len(ends) != len(rows):
        sys.exit(f"warmstart: {len(rows)} evaluated rows in metrics.csv but {len(ends)} in {out.with_suffix('.log')}")
    said = next((PRECISION.search(line) for _, line in lines if PRECISION.search(line)), None)
    precision = (None if said[1] == "fp32" else said[1], said[2] == "channels_last") if said else None
    # the EMA's top-1 where the run kept one and it scored higher: the weights `evaluate --weights auto` scores
    curve = [(round(t, 1), max(float(r["val_top1"]), float(r.get("ema_val_top1") or 0))) for t, r in zip(ends, rows)]
    return {"cmd": cmd, "wall_s": round(wall, 1), "curve": curve, "top1": curve[-1][1], "precision": precision,
            "budget_s": duration(budget) if budget else None, "checkpoint": str(out / "checkpoints" / "last.pt")}


def score_holdout(args, name: str, side: dict, data: Path, log: Path) -> None:
    """Top-1 of the side's final checkpoint on data/holdout, with that side's own evaluation, in fp32."""
    if name == "timm":
        result = log.with_suffix(".json")
        cmd = [sys.executable, str(args.timm / "validate.py"), "--data-dir", str(data), "--split", "holdout",
               "--model", args.model, "--num-classes", str(len(args.classes)), "--img-size", str(args.img_size),
               "--checkpoint", side["checkpoint"], "--device", args.device, "--no-prefetcher",
               "-b", str(args.batch_size), "-j", str(args.workers), "--results-file", str(result),
               "--results-format", "json"]
        run_logged(cmd, log)
        side["holdout_top1"] = round(float(json.loads(result.read_text())["top1"]), 2)
    else:
        # as its run evaluated: the budget recipe averages each image with its mirror (config tta), which
        # `evaluate` applies only when asked
        tta = torch.load(side["checkpoint"], map_location="cpu", weights_only=True)["config"].get("tta")
        cmd = [sys.executable, "-m", "warmstart", "evaluate", "--checkpoint", side["checkpoint"],
               "--data", str(data / "holdout"), "-b", str(args.batch_size), "-j", str(args.workers),
               "--device", args.device, "--json", *(["--tta", tta] if tta else [])]
        _, lines = run_logged(cmd, log)
        side["holdout_top1"] = round(json.loads(lines[-1][1])["top1"], 2)
    side["holdout_cmd"] = cmd


def compare(timm: dict, ws: dict, curve: bool) -> dict:
    """warmstart's time as a ratio of timm's; whether (and, with a curve, first when) it reached timm's final top-1;
    timm's top-1 at warmstart's end (its last evaluation by then)."""
    target = timm["top1"]
    first = next((t for t, top1 in ws["curve"] if top1 >= target), None) if curve else None
    by_then = [top1 for t, top1 in timm["curve"] if t <= ws["wall_s"]]
    return {"ratio": round(ws["wall_s"] / timm["wall_s"], 3), "reached": ws["top1"] >= target,
            "first_reach_s": first, "timm_top1_at_ws_end": by_then[-1] if by_then else None,
            "within_budget": ws["wall_s"] <= ws["budget_s"] if ws["budget_s"] else None}


def one_round(args, r: int, data: Path, precision, first_timm_s: float | None) -> dict:
    """Round r (1-based): timm and warmstart (and --fixed) alternated; the budget from this round's timm time,
    or round 1's when warmstart goes first."""
    out, got = args.out / f"round{r}", {}
    sides = ["timm", "warmstart"] + (["fixed"] if args.fixed else [])
    order = sides if r % 2 else sides[::-1]
    for name in order:
        settle(data, args.settle)
        if name == "timm":
            got[name] = timm_run(args, data, out / "timm", precision)
        elif name == "fixed":
            got[name] = warmstart_run(args, data, out / "warmstart-fixed", None, True)
        else:
            timm_s = got["timm"]["wall_s"] if "timm" in got else first_timm_s
            budget = f"{max(1, round(timm_s / 2))}s" if args.budget == "auto" else args.budget
            got[name] = warmstart_run(args, data, out / "warmstart", budget, args.curve)
        print(f"round {r} {name}: {got[name]['wall_s']:.1f} s, final val top-1 {got[name]['top1']:.2f}%", flush=True)
    if args.holdout:
        for name, side in got.items():
            score_holdout(args, name, side, data, out / f"holdout-{name}.log")
    for name in sides[1:]:
        if got[name].get("precision") not in (None, precision):
            print(f"WARNING round {r}: {name} trained in {got[name]['precision']} (amp, channels_last), timm was "
                  f"given {precision}: not like for like")
    return {"round": r, "order": order, **got, "vs_timm": compare(got["timm"], got["warmstart"], args.curve)}


def pct(x) -> str:
    return "-" if x is None else f"{x:.2f}%"


def report(args, rounds: list[dict]) -> None:
    """Every round in words."""
    for rd in rounds:
        t, w, c = rd["timm"], rd["warmstart"], rd["vs_timm"]
        first = f", first at {c['first_reach_s']:.0f} s" if c["first_reach_s"] is not None else ""
        print(f"\nround {rd['round']} ({' then '.join(rd['order'])}):\n"
              f"  timm      {t['wall_s']:7.1f} s  val {pct(t['top1'])}  held-out {pct(t.get('holdout_top1'))}\n"
              f"  warmstart {w['wall_s']:7.1f} s  val {pct(w['top1'])}  held-out {pct(w.get('holdout_top1'))}  "
              f"(budget {w['budget_s']:.0f} s, {100 * w['wall_s'] / w['budget_s']:.0f}% of it used)\n"
              f"  warmstart/timm time {c['ratio']:.2f}x; reached timm's final {pct(t['top1'])}: "
              f"{'yes' if c['reached'] else 'no'}{first}; at warmstart's end ({w['wall_s']:.0f} s) timm had "
              f"{pct(c['timm_top1_at_ws_end'])}")
        if "fixed" in rd:
            f = rd["fixed"]
            print(f"  warmstart --epochs {args.epochs}: {f['wall_s']:.1f} s  val {pct(f['top1'])}  "
                  f"held-out {pct(f.get('holdout_top1'))}")


def markdown(args, rounds: list[dict]) -> None:
    """The rounds as a Markdown table for benchmarks/RESULTS.md."""
    fixed = f" warmstart --epochs {args.epochs}: wall, top-1 val / held-out |" if args.fixed else ""
    print(f"\n| round | timm wall | timm top-1 val / held-out | warmstart budget | warmstart wall | warmstart / timm | "
          f"warmstart top-1 val / held-out | reached timm's final | timm top-1 at warmstart's end |{fixed}\n"
          f"|---|---|---|---|---|---|---|---|---|{'---|' if fixed else ''}")
    for rd in rounds:
        t, w, c, f = rd["timm"], rd["warmstart"], rd["vs_timm"], rd.get("fixed")
        first = "timm" if rd["order"][0] == "timm" else "warmstart"
        when = f" (at {c['first_reach_s']:.0f} s)" if c["first_reach_s"] is not None else ""
        print(f"| {rd['round']} ({first} first) | {t['wall_s']:.1f} s | {pct(t['top1'])} / "
              f"{pct(t.get('holdout_top1'))} | {w['budget_s']:.0f} s | {w['wall_s']:.1f} s | {c['ratio']:.2f}x | "
              f"{pct(w['top1'])} / {pct(w.get('holdout_top1'))} | {'yes' if c['reached'] else 'no'}{when} | "
              f"{pct(c['timm_top1_at_ws_end'])} |"
              + (f" {f['wall_s']:.1f} s, {pct(f['top1'])} / {pct(f.get('holdout_top1'))} |" if f else ""))


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = holdout_split(args.data, args.out, args.holdout, args.classes) if args.holdout else args.data
    device = torch.device(args.device)
    # what warmstart's --amp auto will choose (engine.loop.choose_precision); each run's own line is checked
    precision = ("bf16", True) if native_bf16(device) else ("fp16", True) if device.type == "cuda" else (None, False)
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    print(f"warmstart {commit}, torch {torch.__version__}, {os.cpu_count()} CPUs, data {data}, out {args.out}; "
          f"timm given amp={precision[0] or 'fp32'}, channels_last={precision[1]}", flush=True)
    rounds = []
    for r in range(1, args.rounds + 1):
        rounds.append(one_round(args, r, data, precision, rounds[0]["timm"]["wall_s"] if rounds else None))
    report(args, rounds)
    markdown(args, rounds)
    doc = {"commit": commit, "args": {k: str(v) for k, v in vars(args).items() if k != "classes"}, "rounds": rounds}
    (args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(f"\nall figures: {args.out / 'results.json'}")
    if args.json:
        print(json.dumps(doc))


if __name__ == "__main__":
    main()
