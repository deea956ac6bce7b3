"""`warmstart prepare` against the common shell recipe, on the same mini ILSVRC2012 archives.

    python benchmarks/prepare.py [--classes 1000] [--per-class 3] [--val 1300]

Builds mini archives in the official structure (real imagenet-sample JPEGs when shared data is
present), then times, in one run:
  shell:     mv the train tar in, `tar -xf` it, `tar -xf` each of the inner per-class tars (one
             process each, deleting each after), `tar -xf` the val tar, then valprep.sh's
             `mkdir -p` per class and one `mv` per validation file
  warmstart: `warmstart prepare --archives A --out OUT --partial` (MD5s, counts, repairs, manifest)
in --repeat rounds (the machine is shared: the best time of each counts), each after a sync and a
settle of --settle seconds (see SETTLE), and samples each output/working folder's disk usage in a
background thread for the peak. Needs about 2x the archives' size of free disk per round; takes
about --repeat x 6 minutes, mostly waiting.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from warmstart.prepare import facts, fixtures

BIN = Path(sys.executable).parent


def disk_usage(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:  # moved or deleted while we walked
                pass
    return total


def fs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize  # ext4 counts delayed-allocation blocks as used


def settle_then_read(seconds: float, inputs: list[Path]) -> None:
    """sync, pause, then read the inputs once so every contestant finds them in the page cache."""
    subprocess.run(["sync"])
    time.sleep(seconds)
    for path in inputs:
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass


def timed(cmd: list[str], cwd: Path, watch: Path, start_size: int, settle: float, inputs: list[Path]) -> tuple[float, int, float]:
    """Run cmd on `inputs`; -> (seconds, peak size of the `watch` folder, CPU seconds of cmd and its children).

    The peak is the folder's size at the start plus the file system's peak growth, sampled every
    10 ms (one statvfs call: walking the folder that often would slow the run it measures).
    Syncs, then waits `settle` seconds first (see SETTLE), then reads the inputs once: this VM's
    page cache is emptied from outside now and then (cached archives read back from disk made
    single runs 4-10x slower, with no more CPU time), so both contestants start with their
    archives in memory, and the comparison is of the work, not of the disk."""
    settle_then_read(settle, inputs)
    start, peak, stop = fs_used(cwd), [0], threading.Event()

    def sample():
        while not stop.wait(0.01):
            peak[0] = max(peak[0], fs_used(cwd) - start)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    stop.set()
    thread.join()
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    return seconds, start_size + max(peak[0], fs_used(cwd) - start), cpu


# ext4 without a journal (this VM's root) skips, on every file creation, each free inode of the
# group that was deleted in the last 60 s, or in the last 360 s once its inode-table block is dirty
# again, which the first new file in that block makes it (fs/ext4/ialloc.c, recently_deleted()).
# Creating thousands of files right after thousands of deletions therefore costs several times
# more. So the benchmark deletes nothing until it has finished, and waits this long before each
# round; within a round warmstart goes first, since the shell recipe deletes its own tars (that
# cost is the recipe's own) and would otherwise charge warmstart for them.
SETTLE = 361

SHELL = """set -e
mkdir train && mv ILSVRC2012_img_train.tar train/ && cd train
tar -xf ILSVRC2012_img_train.tar && rm -f ILSVRC2012_img_train.tar
find . -name "*.tar" | while read NAME ; do mkdir -p "${NAME%.tar}"; tar -xf "${NAME}" -C "${NAME%.tar}"; rm -f "${NAME}"; done
cd ..
mkdir val && mv ILSVRC2012_img_val.tar val/ && cd val && tar -xf ILSVRC2012_img_val.tar && rm -f ILSVRC2012_img_val.tar
bash ../valprep.sh
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000, help="classes in the mini archives")
    p.add_argument("--per-class", type=int, default=3, help="train images per class")
    p.add_argument("--val", type=int, default=1300, help="validation images")
    p.add_argument("--repeat", type=int, default=3, help="rounds, each timing warmstart then the shell recipe; the best time counts")
    p.add_argument("--settle", type=float, default=SETTLE, help=f"seconds to wait before each round (default {SETTLE}; see SETTLE)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "warmstart-bench",
                   help="scratch folder; a temporary folder inside it is deleted after (default: ~/.cache/warmstart-bench, "
                   "away from /tmp, where other users' deletions slow file creation: see SETTLE)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    try:
        t0 = time.perf_counter()
        archives = work / "archives"
        classes = fixtures.pick_classes(args.classes, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
        fixtures.build_official(archives, classes, args.per_class, args.val, devkit=True)
        (archives / "ILSVRC2012_img_test_v10102019.tar").unlink(missing_ok=True)
        print(f"built {args.classes} classes x {args.per_class} + {args.val} val in {time.perf_counter() - t0:.0f}s "
              f"({disk_usage(archives) / 1e6:.0f} MB of archives)")
        before = {p.name: (fixtures.md5sum(p), p.stat().st_mtime_ns) for p in archives.iterdir()}

        # valprep.sh as published: a mkdir -p per class, then one mv per validation file.
        labels = facts.val_labels()
        with tarfile.open(archives / facts.VAL_TAR) as tar:
            names = tar.getnames()
        lines = [f"mkdir -p {w}" for w in sorted({labels[n] for n in names})] + [f"mv {n} {labels[n]}/" for n in names]
        # Rounds of warmstart then the shell recipe, so load from other users hits both alike; nothing is
        # deleted before the end (see SETTLE), and both write into fresh folders of the same file system.
        runs = {"shell": [], "warmstart": []}  # (seconds, peak disk, final disk, CPU seconds) per repeat
        for r in range(args.repeat):
            shell_dir = work / f"shell{r}"
            shell_dir.mkdir()
            (shell_dir / "valprep.sh").write_text("\n".join(lines) + "\n")
            for name in (facts.TRAIN_TAR, facts.VAL_TAR):
                shutil.copyfile(archives / name, shell_dir / name)
            shell_start = disk_usage(shell_dir)

            out = work / f"warmstart{r}"
            t, peak, cpu = timed([str(BIN / "warmstart"), "prepare", "--archives", str(archives), "--out", str(out),
                                  "--partial"], work, out, 0, args.settle, sorted(archives.iterdir()))
            runs["warmstart"].append((t, peak, disk_usage(out), cpu))
            t, peak, cpu = timed(["bash", "-c", SHELL], shell_dir, shell_dir, shell_start, 1,
                                 [shell_dir / facts.TRAIN_TAR, shell_dir / facts.VAL_TAR])
            (shell_dir / "valprep.sh").unlink()
            runs["shell"].append((t, peak, disk_usage(shell_dir), cpu))
            # The prepared folder must be right, not only fast.
            doc = json.loads((out / "prepared.json").read_text())
            assert doc["splits"]["train"]["images"] == args.classes * args.per_class
            assert all((out / "val" / labels[n] / n).is_file() for n in names)
            repaired = {Path(x["file"]).name for x in doc["repairs"]}
            assert {facts.PNG_FILES[0], "n01739381_1309.JPEG"} <= repaired, repaired
        after = {p.name: (fixtures.md5sum(p), p.stat().st_mtime_ns) for p in archives.iterdir()}

        print(f"\n{'':10}{'best time':>10}  {'all runs, s (CPU s)':<38}{'peak disk':>12}{'final':>9}{'peak/final':>12}")
        best = {}
        for name, rs in runs.items():
            best[name] = min(r[0] for r in rs)
            peak, final = max(r[1] for r in rs), rs[-1][2]
            every = " ".join(f"{t:.1f} ({c:.1f})" for t, _, _, c in rs)
            print(f"{name:10}{best[name]:9.1f}s  {every:<38}{peak / 1e6:9.0f} MB"
                  f"{final / 1e6:6.0f} MB{max(r[1] / r[2] for r in rs):11.2f}x")
        median = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
        print(f"\nwarmstart is {best['shell'] / best['warmstart']:.1f}x faster (best of {args.repeat}; "
              f"{median['shell'] / median['warmstart']:.1f}x by median; "
              f"{args.classes} classes x {args.per_class} + {args.val} val, {os.cpu_count()} cores). "
              f"The shell's peak includes the archive copies it consumes ({shell_start / 1e6:.0f} MB at start).")
        print(f"archives untouched by warmstart: {before == after}; repairs: {len(doc['repairs'])}; "
              f"checksums verified: {all(c['ok'] for c in doc['checksums'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
