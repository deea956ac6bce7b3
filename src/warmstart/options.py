"""Command-line options that several commands share, declared once.

`add(parser, "checkpoint", "device", ...)` adds those options with the same flags, help and checks everywhere;
TrainConfig takes its help text for the same settings from HELP so train's flags read the same.
"""

import argparse
import math
import os

from warmstart import launch
from warmstart.data.decode import DECODERS, DEFAULT as DEFAULT_DECODER, DEFAULT_MAX_PIXELS
from warmstart.data.shard_store import DEFAULT_CACHE_LIMIT
from warmstart.errors import UserError


def cpus_per_process() -> tuple[int, int]:
    """(the CPUs this process may use, their share for this process): the CPUs are shared among the processes its
    launcher puts on this node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        local = launch.detect().local_world_size
    except UserError:  # a malformed launcher variable: setup() says so in one line; this default is no place to fail
        local = 1
    return cpus, max(1, cpus // max(local, 1))


def _default_workers() -> int:
    """This process's share of the CPUs, at most 8."""
    return min(8, cpus_per_process()[1])


DEFAULT_WORKERS = _default_workers()
AMP = ["auto", "bf16", "fp16", "fp32"]  # engine/loop.py's choose_precision reads them

HELP = {
    "device": "cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    "amp": "mixed precision (bf16 runs fast on GPUs from Ampere on and CPUs with AMX; fp16 on a CPU runs far "
           "slower than bf16)",
    "batch_size": "images per batch per process",
    "workers": f"data-loading processes per process (0 = load in the main process; default: {DEFAULT_WORKERS}: this "
               f"process's CPUs / processes on the node, up to 8)",
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

    On a GPU (device "cuda"): math threads + loader workers = this process's share of the CPUs (affinity / processes
    on the node), at least 1 math thread. There the math threads only launch kernels, and torch's default (one per
    CPU) made them fight the workers that feed the GPU (on 2 cores ~30 vs 100+ img/s).
    On the CPU (device "cpu") the step is the work: the math threads get every CPU of the share and the workers come
    on top; they sleep while the step runs. Measured on 2 cores (benchmarks/RESULTS.md), leaving the workers their
    CPUs made TinyNet train 1.3-1.7x slower, even at 224 px with one worker (the step waited on data 1-2%).
    --threads N, else OMP_NUM_THREADS, wins."""
    _, share = cpus_per_process()
    detail = f"{workers} loader worker{'s' if workers != 1 else ''} of {share} CPU{'s' if share != 1 else ''}"
    if check_threads(threads) is not None:
        return threads, f"cpu threads: {threads} math (--threads) + {detail}"
    if os.environ.get("OMP_NUM_THREADS"):  # torch read it at start-up: leave its choice alone
        return None, f"cpu threads: OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} math + {detail}"
    if device == "cpu":
        return share, f"cpu threads: {share} math + {detail} (on the CPU the math gets every CPU)"
    n = max(1, share - workers)
    return n, f"cpu threads: {n} math + {detail}"


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
