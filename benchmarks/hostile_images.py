"""Peak memory of train, evaluate and predict with and without hostile images (issue 23).

    python benchmarks/hostile_images.py [--cap-gb 6] [--workers 2]

Builds the files of tests/test_hostile_images.py (a valid 110-byte arithmetic-coded JPEG of 20000 x 20000, truncated
JPEGs declaring 60000^2 and 65500^2, a 1 x 2,000,000 PNG, a 16-bit 13000^2 PNG) into a copy of a small synthetic
dataset, then runs each command on the clean and the hostile copy (train: TinyNet, 1 epoch at 32 px, -j WORKERS;
evaluate and predict: the clean run's checkpoint). Every process runs under an address-space cap (--cap-gb, as the
test's), so a file that costs gigabytes fails its allocation instead of the machine.

For each run it prints the peak resident memory (VmHWM, from /proc every 50 ms) of the main process and of each of
its data workers, and the tree's largest (wait4's ru_maxrss), with and without the files; the issue's bound is each
process within 300 MB of the same run without them. The exit status is 1 when a run fails or a bound is broken.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synth import TINY, make_image_folder  # noqa: E402
from test_hostile_images import add_hostile, hostile  # noqa: E402

MB = 1 << 20
BOUND = 300 * MB


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren ... from /proc (the data workers of a command; `timeout`'s child)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # ended while read
                pass
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        todo += kids
    return found


def vmhwm(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None


def run(cmd: list[str], cap: int) -> dict:
    """cmd under the cap -> {"rc", "main", "workers" (peaks in bytes), "tree" (the largest process), "err"}."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MALLOC_ARENA_MAX": "2"}  # as the test: see capped()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, preexec_fn=limit, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err, cwd=REPO)
        peaks, done = {}, threading.Event()

        def watch():  # VmHWM is each process's own high-water mark: a sample before it ends is its peak so far
            while not done.is_set():
                for pid in [p.pid] + descendants(p.pid):
                    peaks[pid] = max(peaks.get(pid, 0), vmhwm(pid) or 0)
                time.sleep(0.05)
        t = threading.Thread(target=watch)
        t.start()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        done.set()
        t.join()
        err.seek(0)
        return {"rc": p.returncode, "main": peaks.pop(p.pid, 0), "workers": sorted(peaks.values(), reverse=True),
                "tree": usage.ru_maxrss * 1024, "err": err.read()}


def show(r: dict) -> str:
    workers = ", ".join(f"{w / MB:.0f}" for w in r["workers"]) or "-"
    return f"main {r['main'] / MB:6.0f} MB, workers [{workers}] MB, largest {r['tree'] / MB:6.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gb", type=float, default=6.0, help="address-space cap of every process (default: 6)")
    ap.add_argument("--workers", type=int, default=2, help="data workers of train and evaluate (default: 2)")
    args = ap.parse_args()
    cap = int(args.cap_gb * (1 << 30))
    tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        clean = make_image_folder(tmp / "clean", classes=3, train_per_class=9, val_per_class=3)
        shutil.copytree(clean, tmp / "hostile")
        add_hostile(tmp / "hostile", "c02")
        print(f"hostile files: {', '.join(f'{n} ({len(d):,} bytes)' for n, d in hostile().items())}")
        ws = [sys.executable, "-m", "warmstart"]
        train = [*TINY, "--img-size", "32", "-b", "16", "--epochs", "1", "--warmup-epochs", "0",
                 "-j", str(args.workers)]
        ckpt = tmp / "run-clean" / "checkpoints" / "best.pt"
        commands = {
            "train": lambda data: [*ws, "train", str(tmp / data), *train, "--out", str(tmp / f"run-{data}")],
            "evaluate": lambda data: [*ws, "evaluate", "--checkpoint", str(ckpt), "--data", str(tmp / data), "-j",
                                      str(args.workers)],
            "predict": lambda data: [*ws, "predict", "--checkpoint", str(ckpt), str(tmp / data / "val")],
        }
        broken = False
        for name, cmd in commands.items():
            got = {data: run(cmd(data), cap) for data in ("clean", "hostile")}
            for data, r in got.items():
                print(f"{name:8} {data:7}: rc {r['rc']}, {show(r)}")
                if r["rc"]:
                    print(r["err"][-2000:])
                    broken = True
            a, b = got["clean"], got["hostile"]
            worse = max([b["main"] - a["main"], b["tree"] - a["tree"]]
                        + [w - (a["workers"] or [0])[0] for w in b["workers"]])
            ok = worse <= BOUND
            broken |= not ok
            print(f"{name:8} each process's peak with the files - without: at most {worse / MB:+.0f} MB "
                  f"({'within' if ok else 'OVER'} the 300 MB bound)")
        return 1 if broken else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
