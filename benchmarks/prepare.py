"""`warmstart prepare` against the common shell recipe, on the same mini ILSVRC2012 archives.

    python benchmarks/prepare.py [--classes 1000] [--per-class 3] [--val 1300]

Builds mini archives in the official structure (real imagenet-sample JPEGs when shared data is
present), then times, in one run:
  shell:     mv the train tar in, `tar -xf` it, `tar -xf` each of the inner per-class tars (one
             process each, deleting each after), `tar -xf` the val tar, then valprep.sh's
             `mkdir -p` per class and one `mv` per validation file
  warmstart: `warmstart prepare --archives A --out OUT --partial` (MD5s, counts, repairs, manifest)
and samples each output/working folder's disk usage in a background thread for the peak.
"""

import argparse
import json
import os
import shutil
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


def timed(cmd: list[str], cwd: Path, watch: Path, start_size: int = 0) -> tuple[float, int]:
    """Run cmd; -> (seconds, peak disk usage of `watch` sampled every 0.2 s)."""
    peak, stop = [start_size], threading.Event()

    def sample():
        while not stop.wait(0.2):
            peak[0] = max(peak[0], disk_usage(watch))

    subprocess.run(["sync"])
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return seconds, max(peak[0], disk_usage(watch))


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
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, deleted after)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="warmstart-bench-", dir=args.work))
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
        shell_dir = work / "shell"
        shell_dir.mkdir()
        (shell_dir / "valprep.sh").write_text("\n".join(lines) + "\n")
        for name in (facts.TRAIN_TAR, facts.VAL_TAR):
            shutil.copyfile(archives / name, shell_dir / name)
        shell_start = disk_usage(shell_dir)
        t_shell, peak_shell = timed(["bash", "-c", SHELL], shell_dir, shell_dir, shell_start)
        (shell_dir / "valprep.sh").unlink()
        final_shell = disk_usage(shell_dir)

        out = work / "warmstart"
        t_ws, peak_ws = timed([str(BIN / "warmstart"), "prepare", "--archives", str(archives), "--out", str(out),
                               "--partial"], work, work / "warmstart")
        final_ws = disk_usage(out)
        after = {p.name: (fixtures.md5sum(p), p.stat().st_mtime_ns) for p in archives.iterdir()}

        # The prepared folder must be right, not only fast.
        doc = json.loads((out / "prepared.json").read_text())
        assert doc["splits"]["train"]["images"] == args.classes * args.per_class
        assert all((out / "val" / labels[n] / n).is_file() for n in names)
        repaired = {Path(r["file"]).name for r in doc["repairs"]}
        assert {facts.PNG_FILES[0], "n01739381_1309.JPEG"} <= repaired, repaired

        print(f"\n{'':10}{'time':>8}{'peak disk':>12}{'final':>10}{'peak/final':>12}")
        for name, t, peak, final in (("shell", t_shell, peak_shell, final_shell), ("warmstart", t_ws, peak_ws, final_ws)):
            print(f"{name:10}{t:7.1f}s{peak / 1e6:9.0f} MB{final / 1e6:7.0f} MB{peak / final:11.2f}x")
        print(f"\nwarmstart is {t_shell / t_ws:.1f}x faster ({args.classes} classes x {args.per_class} + {args.val} val, "
              f"{os.cpu_count()} cores); shell peak includes the archives it consumes "
              f"({shell_start / 1e6:.0f} MB at start)")
        print(f"archives untouched by warmstart: {before == after}; repairs: {len(doc['repairs'])}; "
              f"checksums verified: {all(c['ok'] for c in doc['checksums'])}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
