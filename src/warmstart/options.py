"""Command-line options that several commands share, declared once.

`add(parser, "checkpoint", "device", ...)` adds those options with the same flags, help and checks everywhere;
TrainConfig takes its help text for the same settings from HELP so train's flags read the same.
"""

import argparse
import os

from warmstart import launch
from warmstart.errors import UserError


def _default_workers() -> int:
    """The CPUs this process may use, shared among the processes its launcher puts on this node, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        local = launch.detect().local_world_size
    except UserError:  # a malformed launcher variable: setup() says so in one line; this default is no place to fail
        local = 1
    return max(1, min(8, cpus // max(local, 1)))


DEFAULT_WORKERS = _default_workers()

HELP = {
    "device": "cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    "amp": "mixed precision (bf16 is fast on CPUs and GPUs; fp16 on a CPU runs far slower than bf16)",
    "batch_size": "images per batch per process",
    "workers": f"data-loading processes per process (0 = load in the main process; default: {DEFAULT_WORKERS}: this "
               f"process's CPUs / processes on the node, up to 8)",
    "trust_code": "build a model whose code (embedded source or an importable module:callable) is named by a "
                  "checkpoint that was not trained here; read the code first (warmstart refuses otherwise)",
    "json": "make the last line of stdout one JSON object",
    "checkpoint": "a .pt file written by warmstart (e.g. RUN/checkpoints/best.pt)",
    "weights": "which weights: the raw model, its EMA, or whichever scored higher in training (default: auto)",
}


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


def add(parser: argparse.ArgumentParser, *names: str, batch_size: int = 128) -> None:
    """Add the named shared options (keys of HELP) to a command's parser."""
    for name in names:
        if name == "checkpoint":
            parser.add_argument("--checkpoint", required=True, metavar="CKPT", help=HELP[name])
        elif name == "device":
            parser.add_argument("--device", default=None, help=HELP[name])
        elif name == "amp":
            parser.add_argument("--amp", choices=["bf16", "fp16"], default=None, help=HELP[name])
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
        else:
            raise KeyError(name)


def ema_choice(weights: str) -> bool | None:
    """--weights auto|model|ema -> the `ema` argument of checkpoint.load_model."""
    return {"auto": None, "model": False, "ema": True}[weights]
