"""Durable file writes, in one place: every file warmstart writes that a crash must not corrupt goes through here.

atomic_write(path, write) calls write(tmp_path) on a temp file beside `path`, fsyncs it, renames it over `path` and
fsyncs the directory: after a power loss or kernel crash `path` holds either the old or the new content, never a
torn or empty file. Temp files are named `.NAME.tmp<pid>`; ones left by a killed writer are removed by the next
write to the same path. A full disk (or quota) ends in a UserError that says which file, how much it needed and
that the previous file is intact, with the temp file removed.
"""

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from warmstart.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_out_of_space(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library wrapped it (torch's writer raises RuntimeError
    'unexpected pos' or 'file write failed' after the OS said no space)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        text = str(e)
        if isinstance(e, RuntimeError) and ("unexpected pos" in text or "write failed" in text):
            return True
        if "No space left" in text:  # any library's wording of ENOSPC (safetensors: SafetensorError, os error 28)
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int | None:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path).free
    return None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def out_of_space_error(path: Path, needed: int | None, detail: str = "") -> UserError:
    free = free_bytes(Path(path).parent)
    need = f"it needed {human(needed)}" if needed else "it needed more space"
    have = f", {human(free)} free" if free is not None else ""
    return UserError(f"no space left on the device writing {path} ({need}{have}){detail}; "
                     f"free some space or write elsewhere, then run the same command again")


def remove_stale_temps(path: Path) -> None:
    """Temp files of earlier writes to `path` whose writer process is gone (killed mid-save)."""
    path = Path(path)
    prefix = f".{path.name}.tmp"
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            if p.name.startswith(prefix):
                pid = p.name[len(prefix):]
                if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
                    with contextlib.suppress(OSError):
                        p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(path: Path) -> Path:
    """The temp file beside `path` that this process writes (or links) before renaming it over `path`; the name
    remove_stale_temps(path) knows."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened/fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path, write: Callable[[Path], None], *, durable: bool = True, what: str = "",
                 needed: int | None = None) -> None:
    """write(tmp) fills a temp file; it then replaces `path` atomically. durable=False skips the fsyncs (for caches
    and plots, where a torn file after a power loss is merely rebuilt). `what` names the previous file's state in the
    out-of-space message (e.g. 'the previous checkpoint is intact'); `needed` the expected size, when known."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_out_of_space(e):
            previous = f"; {what}" if what and path.exists() else ""
            raise out_of_space_error(path, max(needed or 0, written) or None, previous) from None
        raise
    if durable:
        fsync_dir(path.parent)


# os.link's answers where the file system has no hard links (another device, FAT, some network and FUSE mounts,
# a file with too many links): the caller writes a copy instead
def atomic_link(src, path, *, durable: bool = True) -> bool:
    """Make `path` a hard link of the file `src` (which must be durable already): linked under a temp name beside
    `path` (atomic_write's, so a killed process's is removed as its are), renamed over `path`, the directory fsynced.
    `path` is at every moment its old file or `src`'s, whole; a later replace of `src` leaves `path` the file it
    linked. False, with nothing changed, where no hard link can be made (another file system, one without links
    (EPERM, ENOTSUP), too many links, a policy that refuses them)."""
    src, path = Path(src), Path(path)
    remove_stale_temps(path)
    tmp = temp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # the caller writes a copy
        return False
    try:
        os.replace(tmp, path)
    finally:  # gone after a rename; left where the rename failed, or did nothing (`path` already was `src`'s file)
        with contextlib.suppress(OSError):
            tmp.unlink()
    if durable:
        fsync_dir(path.parent)
    return True


def write_text(path, text: str, *, durable: bool = True) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), durable=durable)


def open_own(path, mode: str = "a"):
    """Open a file of a run folder for appending ("a") or reading and writing ("r+", created if missing), never
    through a symbolic link: a run folder is data someone may have sent, and a link in it (log.txt ->
    ~/.bashrc) would make warmstart write where the sender chose."""
    flags = {"a": os.O_WRONLY | os.O_APPEND, "r+": os.O_RDWR}[mode] | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; a run folder's files must be its own: remove the link (or "
                            f"give another --out)") from None
        raise
    return os.fdopen(fd, mode)
