"""warmstart as a user meets it: a real process (its own stderr, exit status, environment), whose mistakes must end
in one line, and a small file system to fill up."""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest


def cli(*argv, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "warmstart", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The error line of a run that failed as a user's mistake must: exit 2, one line, no traceback."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@contextmanager
def small_file_system(where: Path, size: str):
    """A tmpfs of `size` mounted at `where` (made here); skips the test without root or mount."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and mount -t tmpfs to make a small file system")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
