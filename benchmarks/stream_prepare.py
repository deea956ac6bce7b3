"""`warmstart prepare --archives URL` streamed from a slow server, against downloading the same files alone (issue 25).

    python benchmarks/stream_prepare.py [--rounds 3] [--bandwidth 25e6] [--latency 0.02] [--json PATH]

Builds mini ILSVRC2012 archives twice (real imagenet-sample JPEGs when shared data is present, else drawn
stand-ins): the official layout and the Hugging Face tar.gz layout of ILSVRC/imagenet-1k, same images. Serves them
from tests/httpserver.py in a child process on 127.0.0.1 with --latency seconds before each response and a
--bandwidth cap (bytes/s) on each response, the Hub emulation included. Then, per round and per route (an http folder
URL of the official layout; hf://datasets/ILSVRC/imagenet-1k through HF_ENDPOINT), alternating which goes first:
  download: one `curl -s -S --fail -o /dev/null URL ...` fetching the files prepare reads, one after the other, in
            prepare's order (official: MD5SUMS, devkit, val tar, train tar; hf: val_images, train_images_0..4)
  prepare:  the whole `warmstart prepare --archives URL --out OUT --partial` command, start-up included, while a
            thread samples the file system's used space (statvfs) every --interval s and walks the output folder
            (.partial/ included) as often as half of one core allows (a handicap prepare alone bears), and reads
            /proc/PID/io for the bytes prepare wrote anywhere (wchar)
Bars (issue 25): prepare <= 1.15x the download alone (judged by the median round, every round printed); peak disk
<= 1.05x the output's final size: the output folder's peak in every round, the file system's peak growth by the
median round (other users write to this disk too: the same statvfs sampling during each download, when nothing of
ours writes, is printed as the noise floor); and no archive copy (no *.tar* file in the output or HF_HOME, and wchar
below the output's size). Each contestant starts after a sync, a --settle pause and a read of the served files (so
both find them in the page cache: this VM's cache is emptied from outside now and then). Start-up (`warmstart prepare
--help`; the imports of the hf route) is timed once and printed; prepare's own `time:` line is printed per round.
Outputs are kept until the end (deleting thousands of files slows the next creations: see benchmarks/prepare.py,
SETTLE) and the scratch folder is deleted after. About 2.5 minutes with the defaults, mostly transfer.
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from warmstart.prepare import facts, fixtures

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare import fs_used, settle_then_read as settle  # noqa: E402  (benchmarks/prepare.py's)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
HF_REPO = "ILSVRC/imagenet-1k"
RATIO_BAR, DISK_BAR = 1.15, 1.05
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip", ".parquet")

# The server runs in its own process: in this one, its threads would share the GIL with the disk sampler.
SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from httpserver import serve
with serve(sys.argv[2], latency=float(sys.argv[3]), bandwidth=float(sys.argv[4]), hf={%r: {"main": "hf-tars"}}) as s:
    print(s.url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
""" % HF_REPO


def folder_usage(root: Path) -> int:
    """Bytes allocated under root (files and folders, st_blocks). The top-level entries other than .partial/ are walked
    first and .partial/ last: prepare only moves files out of .partial/ into place, so a move during the walk can
    make a file missed, never counted twice."""
    total, top = 0, []
    try:
        with os.scandir(root) as it:
            top = sorted(it, key=lambda e: e.name == ".partial")
    except FileNotFoundError:
        return 0
    stack = list(reversed(top))  # popped from the end: .partial last
    while stack:
        e = stack.pop()
        try:
            total += e.stat(follow_symlinks=False).st_blocks * 512
            if e.is_dir(follow_symlinks=False):
                with os.scandir(e.path) as it:
                    stack.extend(it)
        except FileNotFoundError:  # moved or removed while we walked
            pass
    return total


class Sampler:
    """A thread: the file system's used bytes every `interval` s (one statvfs), and the output folder's usage by a walk
    as often as that allows while keeping the walks under half of one core (after a walk of t s, the next one waits
    max(interval, t))."""

    def __init__(self, out: Path | None, fs: Path, interval: float):
        self.out, self.fs, self.interval = out, fs, interval
        self.pid, self.wchar = None, 0  # the process whose writes /proc/PID/io counts (wchar: bytes passed to write())
        self.fs_start = fs_used(fs)
        self.fs_peak = self.out_peak = 0
        self.statvfs_samples = self.walks = 0
        self.cpu = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sample_fs()

    def sample_fs(self) -> None:
        self.fs_peak = max(self.fs_peak, fs_used(self.fs) - self.fs_start)
        self.statvfs_samples += 1
        if self.pid is not None:
            try:
                with open(f"/proc/{self.pid}/io") as f:
                    self.wchar = max(self.wchar, int(re.search(r"wchar: (\d+)", f.read())[1]))
            except (OSError, TypeError):  # exited (a zombie has no io file to read)
                pass

    def _run(self) -> None:
        c0, next_walk = time.thread_time(), 0.0
        while not self.stop.is_set():
            self.sample_fs()
            now = time.perf_counter()
            if self.out is not None and now >= next_walk:
                self.out_peak = max(self.out_peak, folder_usage(self.out))
                self.walks += 1
                took = time.perf_counter() - now
                next_walk = now + took + max(self.interval, took)
                self.sample_fs()
            self.stop.wait(self.interval)
        self.cpu = time.thread_time() - c0


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_curl(urls: list[str], fs: Path, interval: float) -> dict:
    """One curl fetching the URLs one after the other into /dev/null, while the file system's used space is sampled
    as for prepare: nothing of ours writes then, so its growth is the noise floor of other users' writes."""
    cmd = ["curl", "-s", "-S", "--fail"] + [a for u in urls for a in ("-o", "/dev/null", u)]
    with Sampler(None, fs, interval) as sampler:
        c0, t0 = children_cpu(), time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds, cpu = time.perf_counter() - t0, children_cpu() - c0
    return {"download_s": seconds, "download_cpu_s": cpu, "fs_peak_growth_during_download": sampler.fs_peak}


def run_prepare(archives: str, out: Path, env: dict, interval: float) -> dict:
    cmd = [str(BIN / "warmstart"), "prepare", "--archives", archives, "--out", str(out), "--partial"]
    with Sampler(out, out.parent, interval) as sampler:
        c0, t0 = children_cpu(), time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler.pid = proc.pid
        stdout, stderr = proc.communicate()
        seconds, cpu = time.perf_counter() - t0, children_cpu() - c0
    if proc.returncode != 0:
        sys.exit(f"prepare failed ({proc.returncode}):\n{stdout}\n{stderr}")
    final = folder_usage(out)
    time_line = next((line.strip() for line in stdout.splitlines() if line.startswith("time:")), "")
    reading = re.match(r"time: ([\d.]+) s reading", time_line)
    return {"prepare_s": seconds, "prepare_cpu_s": cpu, "time_line": time_line,
            "outside_reading_s": seconds - float(reading[1]) if reading else None,
            "out_peak": max(sampler.out_peak, final), "out_final": final,
            "fs_peak_growth": sampler.fs_peak, "fs_end_growth": fs_used(out.parent) - sampler.fs_start,
            "prepare_wchar": sampler.wchar, "statvfs_samples": sampler.statvfs_samples, "walks": sampler.walks, "sampler_cpu_s": sampler.cpu}


def archive_copies(*roots: Path) -> list[str]:
    """Files under roots that look like an archive (prepare must keep no copy of what it streams)."""
    return [str(p) for root in roots if root.exists() for p in root.rglob("*")
            if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)]


def check_output(out: Path, args) -> None:
    doc = json.loads((out / "prepared.json").read_text())
    train, val = doc["splits"]["train"]["images"], doc["splits"]["val"]["images"]
    assert (train, val) == (args.classes * args.per_class, args.val), (train, val)


def startup_seconds(env: dict, code: list[str], tries: int = 3) -> float:
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        subprocess.run(code, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=100, help="classes in the mini archives (default 100)")
    p.add_argument("--per-class", type=int, default=16, help="train images per class (default 16)")
    p.add_argument("--val", type=int, default=400, help="validation images (default 400)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each times both routes, download and prepare")
    p.add_argument("--bandwidth", type=float, default=25e6, help="the server's cap per response, bytes/s (default 25e6)")
    p.add_argument("--latency", type=float, default=0.02, help="the server's delay before each response, s (default 0.02)")
    p.add_argument("--settle", type=float, default=2.0, help="pause after the sync before each contestant, s (default 2)")
    p.add_argument("--interval", type=float, default=0.02, help="disk sampling interval, s (default 0.02)")
    p.add_argument("--routes", nargs="+", choices=["http", "hf"], default=["http", "hf"])
    p.add_argument("--work", type=Path, default=None, help="scratch folder: a temporary folder inside it is deleted "
                   "after (default: the system's, /tmp)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the settings and every round here")
    args = p.parse_args()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stream-prepare-", dir=args.work))
    server = None
    try:
        t0 = time.perf_counter()
        src = work / "served"
        classes = fixtures.pick_classes(args.classes, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
        fixtures.build_official(src / "official", classes, args.per_class, args.val, devkit=True)
        fixtures.build_hf_tars(src / "hf-tars", classes, args.per_class, args.val)
        files = {
            "http": [src / "official" / n for n in ("MD5SUMS", facts.DEVKIT, facts.VAL_TAR, facts.TRAIN_TAR)],
            "hf": [src / "hf-tars" / "data" / n for n in ["val_images.tar.gz"] + [f"train_images_{k}.tar.gz" for k in range(5)]],
        }
        sizes = {route: sum(f.stat().st_size for f in fs) for route, fs in files.items()}
        print(f"built {args.classes} classes x {args.per_class} + {args.val} val in {time.perf_counter() - t0:.0f} s: "
              f"official {mb(sizes['http'])}, hf-tars {mb(sizes['hf'])} (the files each route reads)")

        server = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO / "tests"), str(src), str(args.latency),
                                   str(args.bandwidth)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        base = server.stdout.readline().strip()
        hf_base = f"{base}datasets/{HF_REPO}/resolve/main/"
        urls = {"http": [f"{base}official/{f.name}" for f in files["http"]],
                "hf": [f"{hf_base}data/{f.name}" for f in files["hf"]]}
        archives = {"http": f"{base}official/", "hf": f"hf://datasets/{HF_REPO}"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no token or endpoint of the machine's
        env |= {"HF_ENDPOINT": base.rstrip("/"), "HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        # the emulated Hub hashes its LFS files on the first listing: let that happen before anything is timed
        urllib.request.urlopen(f"{base}api/datasets/{HF_REPO}/tree/main?recursive=True").read()

        startup = {
            "warmstart prepare --help": startup_seconds(env, [str(BIN / "warmstart"), "prepare", "--help"]),
            "import warmstart.prepare.command, huggingface_hub.hf_api":
                startup_seconds(env, [sys.executable, "-c", "import warmstart.cli, warmstart.prepare.command, "
                                      "warmstart.prepare.layouts, huggingface_hub.hf_api"]),
        }
        start = {"http": startup["warmstart prepare --help"],
                 "hf": startup["import warmstart.prepare.command, huggingface_hub.hf_api"]}
        for what, s in startup.items():
            print(f"start-up (best of 3): {what}: {s:.2f} s")
        print(f"server: {base} latency {args.latency * 1e3:.0f} ms/response, {args.bandwidth / 1e6:.1f} MB/s per "
              f"response; in this VM ({os.cpu_count()} cores shared by server, prepare and curl)\n")

        rounds = []
        for r in range(args.rounds):
            for i, route in enumerate(args.routes):
                first = "download" if (r + i) % 2 == 0 else "prepare"
                out = work / f"out-{route}-{r}"
                row = {"round": r + 1, "route": route, "first": first, "archives": archives[route],
                       "bytes": sizes[route]}
                for contestant in (["download", "prepare"] if first == "download" else ["prepare", "download"]):
                    settle(args.settle, files[route])
                    if contestant == "download":
                        row |= run_curl(urls[route], work, args.interval)
                    else:
                        row |= run_prepare(archives[route], out, env, args.interval)
                check_output(out, args)
                row["archive_copies"] = archive_copies(out, work / "hf-home")
                row["ratio"] = row["prepare_s"] / row["download_s"]
                row["ratio_less_startup"] = (row["prepare_s"] - start[route]) / row["download_s"]
                row["out_peak_over_final"] = row["out_peak"] / row["out_final"]
                row["fs_peak_over_final"] = row["fs_peak_growth"] / row["out_final"]
                rounds.append(row)
                print(f"round {r + 1} {route:4} ({first} first): download {row['download_s']:.2f} s "
                      f"({sizes[route] / row['download_s'] / 1e6:.1f} MB/s), prepare {row['prepare_s']:.2f} s "
                      f"(CPU {row['prepare_cpu_s']:.1f} s), ratio {row['ratio']:.3f} "
                      f"({row['ratio_less_startup']:.3f} less start-up); output peak {mb(row['out_peak'])} / final "
                      f"{mb(row['out_final'])}, file system peak growth {mb(row['fs_peak_growth'])} "
                      f"({row['fs_peak_over_final']:.3f}x final; during the download alone "
                      f"{mb(row['fs_peak_growth_during_download'])}), prepare wrote {mb(row['prepare_wchar'])}; {row['walks']} walks, "
                      f"{row['statvfs_samples']} statvfs samples, sampler CPU {row['sampler_cpu_s']:.1f} s")
                print(f"    prepare's {row['time_line']}; outside reading (start-up, listing, between files, "
                      f"the end): {row['outside_reading_s']:.2f} s")
                if row["archive_copies"]:
                    print(f"    ARCHIVE COPIES LEFT: {row['archive_copies']}")

        print(f"\n{'route':6}{'round':>6}{'first':>10}{'download s':>12}{'prepare s':>11}{'ratio':>8}{'-start-up':>10}"
              f"{'out peak':>12}{'out final':>12}{'fs peak+':>12}{'peak/final':>12}")
        for row in sorted(rounds, key=lambda x: (x["route"] != "http", x["round"])):
            print(f"{row['route']:6}{row['round']:>6}{row['first']:>10}{row['download_s']:12.2f}{row['prepare_s']:11.2f}"
                  f"{row['ratio']:8.3f}{row['ratio_less_startup']:10.3f}{mb(row['out_peak']):>12}{mb(row['out_final']):>12}"
                  f"{mb(row['fs_peak_growth']):>12}{max(row['out_peak_over_final'], row['fs_peak_over_final']):12.3f}")
        verdicts = {}
        for route in args.routes:
            rs = [x for x in rounds if x["route"] == route]
            ratios = [x["ratio"] for x in rs]
            within = sum(x <= RATIO_BAR for x in ratios)
            med = statistics.median(ratios)
            ok = med <= RATIO_BAR
            verdicts[f"overlap_{route}"] = {"pass": ok, "median": med, "worst": max(ratios), "within": within, "rounds": len(rs)}
            print(f"overlap {route:4}: prepare / download alone = {', '.join(f'{x:.3f}' for x in ratios)} (median "
                  f"{med:.3f}; {within}/{len(rs)} rounds <= {RATIO_BAR}) -> {'PASS' if ok else 'FAIL'} "
                  f"(bar <= {RATIO_BAR}x by the median; start-up ~{start[route]:.2f} s of each prepare)")
        # The output folder's peak is ours alone; the file system's is shared with other users, whose writes during
        # the downloads alone (nothing of ours writing) are printed as the noise floor: it is judged by the median.
        out_worst = max(x["out_peak_over_final"] for x in rounds)
        fs_all = [x["fs_peak_over_final"] for x in rounds]
        copies = [c for x in rounds for c in x["archive_copies"]]
        noise = max(x["fs_peak_growth_during_download"] for x in rounds)
        written = max(x["prepare_wchar"] / x["out_final"] for x in rounds)
        ok = out_worst <= DISK_BAR and statistics.median(fs_all) <= DISK_BAR and not copies
        print(f"peak disk: output folder peak / final {out_worst:.3f}x at worst; file system peak growth / output final "
              f"{', '.join(f'{x:.3f}' for x in fs_all)}x (median {statistics.median(fs_all):.3f}x, worst {max(fs_all):.3f}x; "
              f"other users' writes count too: up to {mb(noise)} during the downloads alone); prepare wrote (wchar) at "
              f"most {written:.3f}x the output's size; archive copies: {len(copies)} -> {'PASS' if ok else 'FAIL'} "
              f"(bar <= {DISK_BAR}x: the folder in every round, the file system by the median; no copy)")
        verdicts["disk"] = {"pass": ok, "out_peak_over_final_worst": out_worst, "fs_peak_over_final": fs_all,
                            "fs_noise_during_download": noise, "written_over_final": written, "archive_copies": copies}
        if args.json:
            args.json.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                             "cores": os.cpu_count(), "sizes": sizes, "startup_s": startup,
                                             "rounds": rounds, "verdicts": verdicts}, indent=1) + "\n")
    finally:
        if server is not None:
            server.stdin.close()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
