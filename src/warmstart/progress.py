"""Progress for long loops: a tqdm bar on a terminal; in a log file (SLURM, nohup, CI) one plain line every
$WARMSTART_PROGRESS_SECONDS (default 60) seconds instead of a line of carriage returns."""

import os
import sys
import time

from tqdm import tqdm


class Lines:
    """The part of tqdm's interface the loops use, printed as plain lines."""

    def __init__(self, total=None, initial=0, desc="", every=None):
        self.total, self.n, self.desc, self.postfix = total, initial, desc, ""
        self.every = every if every is not None else float(os.environ.get("WARMSTART_PROGRESS_SECONDS", 60))
        self.start = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
            print(f"{self.desc}: {done} ({time.monotonic() - self.start:.0f} s){', ' + self.postfix if self.postfix else ''}",
                  file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def bar(total=None, initial=0, desc="", enabled=True, leave=False):
    """A progress bar (enabled: rank 0 only), or plain lines when stderr is not a terminal."""
    if enabled and not sys.stderr.isatty():
        return Lines(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=leave,
                unit="batch")


def iterate(iterable, desc="", enabled=True):
    """`for x in iterate(loader, ...)` with progress (see bar)."""
    b = bar(len(iterable) if hasattr(iterable, "__len__") else None, desc=desc, enabled=enabled)
    for x in iterable:
        yield x
        b.update(1)
    b.close()
