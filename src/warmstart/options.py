"""Command-line options that several commands share, declared once.

`add(parser, "checkpoint", "device", ...)` adds those options with the same flags, help and checks everywhere;
TrainConfig takes its help text for the same settings from HELP so train's flags read the same.
"""

import argparse
import math
import os
import re
from typing import NamedTuple

from warmstart import launch
from warmstart.data.decode import DECODERS, DEFAULT as DEFAULT_DECODER, DEFAULT_MAX_PIXELS
from warmstart.data.shard_store import DEFAULT_CACHE_LIMIT
from warmstart.errors import UserError

PER_WORKER_BYTES = 512 * 2**20  # what one loader worker may hold at ImageNet scale (see default_workers)


class CpuShare(NamedTuple):
    cpus: int  # the CPUs this process may run on (its affinity)
    share: int  # this process's share of them: its math threads and loader workers together
    local: int  # the processes on this node that share its CPUs and memory (the memory cap divides by it)
    source: str  # where the share came from, for the start-up line


CGROUP = "/sys/fs/cgroup"  # where a container's or a job's limits are read (v2 files, else v1's)


def _cgroup_file(*names: str) -> str | None:
    """The first of these files under CGROUP that reads, stripped; None if none does."""
    for name in names:
        try:
            with open(os.path.join(CGROUP, name)) as f:
                return f.read().strip()
        except OSError:
            continue
    return None


def _cgroup_cpus() -> int | None:
    """The CPUs a cgroup's quota allows (docker --cpus, Kubernetes limits), rounded up; None without one. The
    affinity still shows every CPU of the host there: 63 workers in a 2-CPU container."""
    text = _cgroup_file("cpu.max")  # v2: "QUOTA PERIOD" or "max PERIOD"
    if text is None:
        quota, period = _cgroup_file("cpu/cpu.cfs_quota_us", "cpu,cpuacct/cpu.cfs_quota_us"), \
            _cgroup_file("cpu/cpu.cfs_period_us", "cpu,cpuacct/cpu.cfs_period_us")
        text = f"{quota} {period}" if quota and period else None
    try:
        quota, period = (int(v) for v in (text or "").split()[:2])
    except ValueError:  # "max", missing, malformed: no quota
        return None
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


def _cgroup_memory() -> int | None:
    """Bytes this cgroup may still allocate (limit - usage); None without a limit."""
    for limit_name, usage_name in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _cgroup_file(limit_name), _cgroup_file(usage_name)
        if limit is None:
            continue
        try:
            limit_n, usage_n = int(limit), int(usage or 0)
        except ValueError:  # "max": no limit
            return None
        return max(0, limit_n - usage_n) if limit_n < 2**60 else None  # v1 says "none" with ~2^63
    return None


def _affinity(pid: int = 0) -> int | None:
    """How many CPUs process `pid` (0: this one) may run on, held to a cgroup CPU quota; None where that cannot be
    read."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    try:
        n = len(os.sched_getaffinity(pid)) or None
    except OSError:  # the process is gone (a reparented orphan's launcher), or not ours to read
        return None
    quota = _cgroup_cpus()
    return min(n, quota) if n and quota else n


def _count(env, name: str) -> int | None:
    """A positive whole number from the environment, else None (a malformed one is setup()'s to report)."""
    try:
        value = int(env.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def cpu_share(processes: int | None = None) -> CpuShare:
    """This process's share of the CPUs, and where the number came from. Division comes before any cap.

    - srun (launch.detect() says srun, or one task of an srun step, SLURM_STEP_ID / SLURM_PROCID set) with
      SLURM_CPUS_PER_TASK=C: when the affinity is at most C, SLURM's binding already narrowed it to this task's
      CPUs and the share is the affinity (dividing by the node's tasks again gave 12 // 8 = 1); otherwise srun did
      not bind (--cpu-bind=none) and the share is min(C, affinity // tasks on the node).
    - Another launcher that puts several processes on the node (torchrun's LOCAL_WORLD_SIZE, the classic
      --multiprocessing-distributed spawn, MPI's local size): min(affinity, the launcher's CPUs // local processes),
      the launcher's CPUs being the parent process's affinity (torchrun's agent, MPI's daemon or the spawning
      process). Unbound, the affinity is the launcher's and is divided; a launcher that bound each process
      (numactl / taskset per rank, mpirun --bind-to core) narrowed its affinity, and then it is this process's own;
      bound to CPUs shared with others (mpirun --bind-to socket: 8 ranks on 2 sockets of 48) the fair share is the
      smaller. The parent is the measure, not os.cpu_count(): in a container, a SLURM job's cgroup or under
      `taskset torchrun`, the node has more CPUs than anyone here may use (16 of 128: "affinity x processes <= the
      node's CPUs" would read two unbound torchrun processes as bound and give each all 16). Parent unreadable: the
      affinity is divided (too few threads at worst, never too many). SLURM_CPUS_PER_TASK is not read here: under
      torchrun it describes the srun task that holds all the agent's processes (its affinity, the agent's, says
      that already); under mpirun the ranks inherit the variables of the step that started the daemons.
    - Alone: the affinity.
    `processes` (the classic launch's parent, before it spawns them): the affinity its processes inherit, divided by
    that many, which is what each of them reads here once spawned. A malformed launcher variable counts as alone:
    setup() reports it in one line; a default is no place to fail."""
    env = os.environ
    cpus = _affinity() or os.cpu_count() or 1
    if processes is not None:
        local = max(1, processes)
        return CpuShare(cpus, max(1, cpus // local), local,
                        f"{cpus} CPUs / {local} processes spawned by --multiprocessing-distributed")
    try:
        found = launch.detect()
    except UserError:
        return CpuShare(cpus, cpus, 1, "its CPU affinity; the launcher's variables do not read, counted alone")
    per_task = _count(env, "SLURM_CPUS_PER_TASK")
    in_step = found.name == "srun" or (found.name == "single" and any(env.get(k) for k in ("SLURM_STEP_ID",
                                                                                           "SLURM_PROCID")))
    if per_task is not None and in_step:
        local = found.local_world_size
        if cpus <= per_task:
            by = "srun" if found.name == "srun" else "SLURM"
            return CpuShare(cpus, cpus, local, f"SLURM_CPUS_PER_TASK={per_task}, bound by {by}")
        share = max(1, min(per_task, cpus // local))
        return CpuShare(cpus, share, local, f"SLURM_CPUS_PER_TASK={per_task}; srun did not bind: {cpus} CPUs / "
                                            f"{local} task{'s' if local != 1 else ''} on the node")
    local = found.local_world_size
    if local <= 1:
        return CpuShare(cpus, cpus, 1, "its CPU affinity, one process on the node")
    parent = _affinity(os.getppid()) or cpus
    share = max(1, min(cpus, parent // local))
    variable = f"{launch.VARIABLES[found.name][3]}={local}" if found.name in launch.VARIABLES else f"{local} processes"
    if share == cpus and cpus * local <= parent:
        return CpuShare(cpus, share, local, f"bound by the launcher: its own {cpus} of {parent} CPUs ({variable})")
    return CpuShare(cpus, share, local, f"{parent} CPUs / {local} processes on the node ({variable})")


def cpus_per_process() -> tuple[int, int]:
    """(the CPUs this process may use, their share for this process): cpu_share()'s numbers."""
    found = cpu_share()
    return found.cpus, found.share


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, held to what a cgroup memory limit leaves (a container's
    /proc/meminfo shows the host's); None where neither reads."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_memory()
    return min(v for v in (available, limit) if v is not None) if available or limit is not None else None


def default_workers(processes: int | None = None) -> int:
    """Data workers per process by default: this process's CPU share minus one (the main process feeds the step),
    at least 1; capped only by memory, never below 1: MemAvailable shared among the node's processes, at
    PER_WORKER_BYTES (512 MiB) a worker. That estimate is a worker's own pages (torch and the dataset's copy-on-write
    pages that it touches, ~200-300 MB) plus its prefetch (4 batches: 4 x 128 x 224 x 224 x 3 uint8 is ~80 MB,
    more at larger sizes). No fixed cap: the old 8 starved a 12-CPU GPU process. `processes`: see cpu_share."""
    found = cpu_share(processes)
    workers = max(1, found.share - 1)
    memory = _mem_available()
    if memory is not None:
        workers = min(workers, max(1, memory // (found.local * PER_WORKER_BYTES)))
    return workers


DEFAULT_WORKERS = default_workers()
AMP = ["auto", "bf16", "fp16", "fp32"]  # engine/loop.py's choose_precision reads them

HELP = {
    "device": "cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    "amp": "mixed precision (bf16 runs fast on GPUs from Ampere on and CPUs with AMX; fp16 on a CPU runs far "
           "slower than bf16)",
    "batch_size": "images per batch per process",
    "workers": f"data-loading processes per process (0 = load in the main process; default, {DEFAULT_WORKERS} here: "
               f"this process's CPUs minus one, at least 1; its CPUs: alone, its CPU affinity; under srun, "
               f"SLURM_CPUS_PER_TASK or what srun bound it to; under torchrun, MPI or --multiprocessing-distributed, "
               f"the launcher's CPUs / its processes on the node (or this process's own, where the launcher bound "
               f"each); fewer where MemAvailable holds less than {PER_WORKER_BYTES // 2**20} MiB a worker)",
    "trust_code": "build a model whose code (embedded source or an importable module:callable) is named by a "
                  "checkpoint that was not trained here; read the code first (warmstart refuses otherwise)",
    "json": "make the last line of stdout one JSON object",
    "checkpoint": "a .pt file written by warmstart (e.g. RUN/checkpoints/best.pt)",
    "weights": "which weights: the raw model, its EMA, or whichever scored higher in training (default: auto)",
    "decoder": "image decoder: " + ", ".join(f"{name} ({'default: ' if name == DEFAULT_DECODER else ''}{cls.about})"
                                              for name, cls in DECODERS.items()),
    "max_image_pixels": f"refuse (skip and count) an image whose header declares more pixels than this, before any "
                        f"decode (a few bytes may declare 20000x20000), or whose evaluation resize would make more "
                        f"(default: {DEFAULT_MAX_PIXELS:,}, PIL's limit)",
    "cache_dir": "with s3:// shards: where downloaded chunks are kept (default: a folder per URL under "
                 "$WARMSTART_CACHE or ~/.cache/warmstart/shards)",
    "cache_limit": f"with s3:// shards: the most the chunk cache may hold, e.g. 20GB (default: {DEFAULT_CACHE_LIMIT})",
}


def in_range(kind: type, lo, hi=None):
    """An argparse type: `kind` (int or float) from lo to hi inclusive (hi None: any finite value); NaN, infinity and
    everything outside are refused as the flag is parsed."""
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and lo <= value and (hi is None or value <= hi)):
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi if hi is not None else 'any finite value'}, "
                                             f"got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add(parser: argparse.ArgumentParser, *names: str, batch_size: int = 128, amp: str = "fp32") -> None:
    """Add the named shared options (keys of HELP) to a command's parser. Scoring commands default to fp32 (exact
    figures); timing ones pass amp="auto", training's default."""
    for name in names:
        if name == "checkpoint":
            parser.add_argument("--checkpoint", required=True, metavar="CKPT", help=HELP[name])
        elif name == "device":
            parser.add_argument("--device", default=None, help=HELP[name])
        elif name == "amp":
            parser.add_argument("--amp", choices=AMP, default=amp, help=HELP[name] + "; auto: bf16 where the "
                                f"device computes it natively, else fp32 (default: {amp})")
        elif name == "batch_size":
            parser.add_argument("-b", "--batch-size", type=_positive, default=batch_size,
                                help=f"{HELP[name]} (default: {batch_size})")
        elif name == "workers":
            parser.add_argument("-j", "--workers", type=_non_negative, default=DEFAULT_WORKERS, help=HELP[name])
        elif name == "trust_code":
            parser.add_argument("--trust-code", action="store_true", help=HELP[name])
        elif name == "json":
            parser.add_argument("--json", action="store_true", help=HELP[name])
        elif name == "weights":
            parser.add_argument("--weights", choices=["auto", "model", "ema"], default="auto", help=HELP[name])
        elif name == "decoder":
            parser.add_argument("--decoder", default=None, metavar="NAME", help=HELP[name])
        elif name == "max_image_pixels":
            parser.add_argument("--max-image-pixels", type=_positive, default=DEFAULT_MAX_PIXELS, metavar="N",
                                help=HELP[name])
        elif name == "cache":
            parser.add_argument("--cache-dir", default=None, metavar="DIR", help=HELP["cache_dir"])
            parser.add_argument("--cache-limit", default=DEFAULT_CACHE_LIMIT, metavar="SIZE", help=HELP["cache_limit"])
        else:
            raise KeyError(name)


def ema_choice(weights: str) -> bool | None:
    """--weights auto|model|ema -> the `ema` argument of checkpoint.load_model."""
    return {"auto": None, "model": False, "ema": True}[weights]


THREADS_HELP = ("torch's math (intra-op) threads per process (default on a GPU: this process's CPUs minus its data "
                "workers, at least 1; on the CPU: all of this process's CPUs; OMP_NUM_THREADS, when set, decides "
                "instead)")


def thread_split(workers: int, threads: int | None = None, device: str = "cuda") -> tuple[int | None, str]:
    """(torch intra-op threads to set, or None to leave them; the line that says the split).

    On a GPU (device "cuda"): math threads + loader workers = this process's share of the CPUs (cpu_share(), the
    share the default workers come from; the line names its source), at least 1 math thread. There the math threads
    only launch kernels, and torch's default (one per CPU) made them fight the workers that feed the GPU (on 2 cores
    ~30 vs 100+ img/s).
    On the CPU (device "cpu") the step is the work: the math threads get every CPU of the share and the workers come
    on top; they sleep while the step runs. Measured on 2 cores (benchmarks/RESULTS.md), leaving the workers their
    CPUs made TinyNet train 1.3-1.7x slower, even at 224 px with one worker (the step waited on data 1-2%).
    --threads N, else OMP_NUM_THREADS, wins."""
    found = cpu_share()
    share = found.share
    detail = f"{workers} loader worker{'s' if workers != 1 else ''} of {share} CPU{'s' if share != 1 else ''}"
    if check_threads(threads) is not None:
        return threads, f"cpu threads: {threads} math (--threads) + {detail} ({found.source})"
    if os.environ.get("OMP_NUM_THREADS"):  # torch read it at start-up: leave its choice alone
        return None, f"cpu threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} math + {detail} ({found.source})"
    if device == "cpu":
        return share, f"cpu threads: {share} math + {detail} ({found.source}; on the CPU the math gets every CPU)"
    n = max(1, share - workers)
    return n, f"cpu threads: {n} math + {detail} ({found.source})"


def check_threads(threads: int | None) -> int | None:
    """--threads as given, or one line; checked before a process group forms (the split is set after it)."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    return threads


def set_threads(workers: int, threads: int | None = None, device: str = "cuda") -> str:
    """Apply thread_split's rule to torch; returns its line for the start-up log."""
    import torch  # not at module level: `warmstart prepare` never imports torch

    n, line = thread_split(workers, threads, device)
    if n is not None:
        torch.set_num_threads(n)
    return line


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration(text: str) -> float:
    """'45s', '90m', '6h', '1h30m' -> seconds, or one line saying what is wrong."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or not match or not any(match.groups()):
        raise UserError(f"--time-budget {text!r}: give a duration such as 45s, 90m, 6h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise UserError(f"--time-budget {text}: must be more than zero")
    return seconds
