"""The run directory's human- and machine-readable record (rank 0 only): log.txt, metrics.csv/.jsonl,
TensorBoard events and curves.png."""

import contextlib
import csv
import fcntl
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

from tqdm import tqdm

from warmstart import fileio
from warmstart.errors import UserError, shown


@contextlib.contextmanager
def _disk(path: Path):
    """A full disk while writing the run's records is one line, like a full disk during a checkpoint save."""
    try:
        yield
    except Exception as e:
        if fileio.is_out_of_space(e):
            raise fileio.out_of_space_error(path, None, "; the last checkpoint written is intact") from None
        raise


def _quiet_tensorboard_thread(args) -> None:
    # TensorBoard's writer thread re-raises a full disk into the main thread at the next flush, which _disk turns
    # into one line; without this hook the thread would also print its own traceback
    if type(args.thread).__name__ == "_AsyncWriterThread" and fileio.is_out_of_space(args.exc_value):
        return
    _default_excepthook(args)


_default_excepthook = threading.excepthook
threading.excepthook = _quiet_tensorboard_thread


_held_locks = []  # the lock files this process holds open


def _close_inherited_locks() -> None:
    # a forked child (a data worker) gets a copy of the lock's descriptor, and an flock lasts while any copy is
    # open: a worker that outlives a SIGKILLed parent by seconds would keep `--resume auto` out for those seconds
    for f in _held_locks:
        f.close()
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _me() -> str:
    """This process's lock record. The PID namespace is part of it: containers that share a host name (host
    networking) and a run folder number their processes apart, so a pid means something only in its namespace."""
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = "?"
    return f"pid {os.getpid()} on {socket.gethostname()} ns {ns}"


def _dead_here(holder: str) -> bool:
    """Whether a lock's record names a process of this host and PID namespace that has ended."""
    words, mine = holder.split(), _me().split()
    if len(words) != 6 or words[0] != "pid" or not words[1].isdigit() or len(words[1]) > 9 or words[2:] != mine[2:]:
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    try:  # a zombie (killed, not yet reaped by its parent) has closed all its files
        stat = Path(f"/proc/{words[1]}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].startswith("Z")


def _try_lock(path: Path):
    """(the locked file, None), or (None, the holder's record) when another process holds it."""
    while True:
        f = fileio.open_own(path, "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.buffer.read(200).decode("utf-8", errors="replace").strip() or "another process"
            f.close()
            return None, shown(holder)
        if path.exists() and os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
            return f, None
        f.close()  # the file was replaced by a take-over after it was opened: lock the one the path names now


@contextlib.contextmanager
def _folder_locked(run_dir: Path):
    """Taking RUN/.lock, writing its record and any take-over happen under a lock on the folder itself: without
    it, a process could read the record a killed run left while another has just taken the lock, and replace the
    file under it. Best effort: a file system without flock on folders just goes without."""
    folder = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the folder's flock


def _lock(run_dir: Path) -> tuple[object, str | None]:
    """An exclusive lock on RUN/.lock for as long as this process writes the run folder: two processes that each
    think they are alone (e.g. tasks started with SLURM variables but no srun step) must not both write last.pt.
    flock is released by the OS when the process dies (forked children close their copy at once), so a killed run
    never leaves a stale lock; a lock still held in the name of an ended process of this host (a child that kept
    it, e.g. one forked outside Python) is taken over: the file is replaced. Returns (the lock, what to say)."""
    path, note = run_dir / ".lock", None
    with _folder_locked(run_dir):
        f, holder = _try_lock(path)
        if f is None and _dead_here(holder):
            path.unlink()
            note = f"{path} was held in the name of {holder.split(' on ')[0]}, which has ended; taken over"
            f, holder = _try_lock(path)
        if f is None:
            raise UserError(f"{run_dir} is being written by {holder}; wait for that run to end, or give this one "
                            f"another --out")
        f.seek(0)
        f.truncate()
        f.write(_me() + "\n")
        f.flush()
    _held_locks.append(f)
    return f, note


# What a run writes into its folder. Any of RECORDS means a run lives there: a command without --resume never
# writes into it (a deleted or dangling last.pt does not make a finished run's folder free).
RECORDS = ("config.yaml", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt")
WRITTEN = RECORDS + ("metrics.csv", "curves.png", "log.txt", ".lock")
MAX_METRICS_BYTES = 64 * 2**20  # a row an epoch, ~300 bytes: a thousand-epoch run writes well under 1 MB


def records(run_dir: Path) -> list[str]:
    """The RECORDS run_dir holds; one line for a file the run writes that is not a regular file (a directory, a
    dangling link, a FIFO), a `checkpoints` that is not a folder, or a metrics.jsonl beyond any run's size."""
    if os.path.lexists(run_dir / "checkpoints") and not (run_dir / "checkpoints").is_dir():
        raise UserError(f"{run_dir / 'checkpoints'} is not a folder; a run keeps its checkpoints there: move it "
                        f"aside, or give another --out")
    for name in WRITTEN:
        path = run_dir / name
        if path.is_symlink() and not name.endswith(".pt"):  # checkpoints are replaced by a rename, never written into
            raise UserError(f"{path} is a symbolic link; a run folder's files must be its own: remove the link (or "
                            f"give another --out)")
        if os.path.lexists(path) and not path.is_file():
            what = "a link to nothing" if path.is_symlink() and not path.exists() else "a folder" if path.is_dir() \
                else "not a regular file"
            raise UserError(f"{path} is {what}; a run writes it there: move it aside, or give another --out")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > MAX_METRICS_BYTES:
        raise UserError(f"{metrics} is {fileio.human(metrics.stat().st_size)}, far beyond any run's; it was edited: "
                        f"move it aside, or give another --out")
    return [name for name in RECORDS if os.path.lexists(run_dir / name)]


def _repair_torn_tail(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline; the next append would glue a good row to it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with fileio.open_own(path, "r+") as f:
        raw = f.buffer
        size = raw.seek(0, os.SEEK_END)
        raw.seek(max(0, size - 2**20))  # only the tail: the file may be large
        tail = raw.read()
        if not tail.endswith(b"\n"):
            raw.truncate(size - len(tail) + tail.rfind(b"\n") + 1)


class RunLog:
    """Also the run folder's lock (rank 0 holds it while the run writes there): use it as a context manager."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._tb = self._lock = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock, note = _lock(self.run_dir)
            _repair_torn_tail(self.run_dir / "metrics.jsonl")
            self._log = fileio.open_own(self.run_dir / "log.txt")
            if note:
                self.print(note)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        tqdm.write(msg)
        with _disk(self.run_dir / "log.txt"):
            # every line starts with the time: a value from a run folder (a model name with a newline in it)
            # cannot start a line of its own
            stamp = time.strftime('%Y-%m-%d %H:%M:%S')
            self._log.write("".join(f"{stamp} {line}\n" for line in msg.splitlines() or [""]))
            self._log.flush()

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when there is something to write
            self._tb = SummaryWriter(str(self.run_dir))
        with _disk(self.run_dir / "events.out.tfevents"):
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def epoch(self, row: dict) -> None:
        """One row per epoch in metrics.csv and metrics.jsonl; then redraw curves.png."""
        if not self.enabled:
            return
        with _disk(self.run_dir / "metrics.jsonl"):
            with fileio.open_own(self.run_dir / "metrics.jsonl") as f:
                f.write(json.dumps(row) + "\n")
        rows = read_metrics(self.run_dir)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        table = io.StringIO()
        w = csv.DictWriter(table, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        fileio.write_text(self.run_dir / "metrics.csv", table.getvalue(), durable=False)
        self.scalars(row["epoch"], {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))})
        plot_curves(rows, self.run_dir / "curves.png")

    def close(self) -> None:
        if self.enabled and self._lock is not None:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            self._log.close()
            _held_locks.remove(self._lock)
            self._lock.close()  # releases the flock
            self._lock = None


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    # a resumed run rewrites epochs it redoes: keep the last row per epoch. A line torn by a crash or edited into
    # something else is not a row: it must not stop a run after a full epoch of training
    rows = {}
    with open(path, "rb") as f:
        data = f.read(MAX_METRICS_BYTES)  # checked at the start of the run; an append cannot grow it past this
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: a line of 200,000 `[`
            continue
        if isinstance(r, dict) and type(r.get("epoch")) is int:
            rows[r["epoch"]] = r
    return [rows[e] for e in sorted(rows)]


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("loss", ["train_loss", "val_loss", "ema_val_loss"]), ("accuracy (%)", ["val_top1", "val_top5", "ema_val_top1"]),
              ("learning rate", ["lr"])]
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(e, r[k]) for e, r in zip(epochs, rows) if type(r.get(k)) in (int, float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    best = max((r["val_top1"] for r in rows if type(r.get("val_top1")) in (int, float)), default=0)
    fig.suptitle(f"{path.parent.name}: best val top-1 {best:.2f}%")
    fig.tight_layout()
    try:
        fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"), durable=False,
                            what="the last checkpoint written is intact")
    finally:
        plt.close(fig)
