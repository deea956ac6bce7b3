"""Reading archives safely: a file streamed front to back exactly once, hashed while read (HashingReader), and
every tar or zip member checked before anything is extracted (no path escapes, no links, no devices)."""

import hashlib
import io
import queue
import re
import stat
import tarfile
import threading
import time
import zipfile

from warmstart.errors import UserError, quoted

TRAIN_NAME = re.compile(r"(n\d{8})_\d+\.JPEG")
TEST_NAME = re.compile(r"ILSVRC2012_test_\d{8}\.JPEG")
TAR_BUFSIZE = 64 << 10  # tarfile's stream reads: fewer Python calls than 10 KiB, small remainder copies
Files = list[tuple[str, bytes | memoryview]]


class HashingReader:
    """A file read once, front to back: a thread reads 4 MiB chunks from a store's stream (a local file, or HTTP that
    resumes dropped connections) and feeds the hash (hashlib drops the GIL), so the download or disk reads and the
    hashing overlap the parsing in the caller's thread. algorithm None: nothing to check it against."""

    CHUNK = 4 << 20

    def __init__(self, stream, algorithm: str | None = "md5"):
        self.stream, self.consumed, self.waited = stream, 0, 0.0
        self.hash = hashlib.new(algorithm) if algorithm else None
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=8)
        self.buf: bytes | None = b""
        self.pos, self.stopped = 0, False
        self.thread = threading.Thread(target=self._read_ahead, daemon=True)
        self.thread.start()

    def _read_ahead(self) -> None:
        try:
            while not self.stopped and (chunk := self.stream.read(self.CHUNK)):
                self.chunks.put(chunk)  # parse this chunk while it is hashed
                if self.hash:
                    self.hash.update(chunk)
        except BaseException as e:  # surfaced in the reading thread
            self.chunks.put(e)
            return
        finally:
            self.stream.close()
        self.chunks.put(b"")

    def read(self, n: int) -> bytes:
        if self.buf is None:
            return b""
        if self.pos == len(self.buf):
            t0 = time.perf_counter()
            item = self.chunks.get()
            self.waited += time.perf_counter() - t0
            if isinstance(item, BaseException):
                self.buf = None
                raise item
            self.buf, self.pos = (item or None), 0
            if not item:
                return b""
        data = self.buf[self.pos : self.pos + n]
        self.pos += len(data)
        self.consumed += len(data)
        return data

    def readall(self, limit: int, what: str) -> bytes:
        """The rest of the file in memory; a file longer than `limit` is refused, not buffered."""
        chunks, total = [], 0
        while chunk := self.read(self.CHUNK):
            total += len(chunk)
            if total > limit:
                raise UserError(f"{what} is larger than {limit:,} bytes, more than its size said; refusing to hold "
                                "it in memory")
            chunks.append(chunk)
        return b"".join(chunks)

    def hexdigest(self) -> str | None:
        """The hash of the whole file; reads what the parser left (a tar's end-of-archive padding)."""
        while self.read(self.CHUNK):
            pass
        self.thread.join()
        return self.hash.hexdigest() if self.hash else None

    def close(self) -> None:
        """Stop early (an error in the parser, a restart): the thread ends after its next chunk, which the emptied
        queue has room for."""
        self.buf, self.stopped = None, True
        while not self.chunks.empty():
            self.chunks.get_nowait()


def safe_name(archive: str, info: tarfile.TarInfo | zipfile.ZipInfo) -> str | None:
    """The member's path if it is a regular file with a relative, '..'-free path; None for a
    directory; UserError for anything else (links, devices, escaping paths)."""
    if isinstance(info, tarfile.TarInfo):
        name, is_dir, is_file = info.name, info.isdir(), info.isreg()
    else:
        name, is_dir = info.filename, info.is_dir()
        is_file = not is_dir and not stat.S_ISLNK(info.external_attr >> 16)
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise UserError(f"{archive}: member {quoted(name)} has an unsafe path (absolute or '..'); refusing to extract. "
                        "This is not an untouched ILSVRC2012 archive; download it again from image-net.org")
    if is_dir:
        return None
    if not is_file:
        raise UserError(f"{archive}: member {quoted(name)} is a link or device file, which an ILSVRC2012 archive never "
                        "holds; refusing to extract. Download the archive again from image-net.org")
    return name.removeprefix("./")


def tar_error(archive: str, e: Exception) -> UserError:
    return UserError(f"{archive} is truncated or corrupt ({e}); download it again (resume a partial download "
                     "with `wget -c` or `curl -C -`)")


def expect(archive: str, name: str, pattern: re.Pattern | dict, what: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if not (base in pattern if isinstance(pattern, dict) else pattern.fullmatch(base)):
        raise UserError(f"{archive}: unexpected member {quoted(name)} (want {what}); is this the right archive?")
    return base


def inner_files(archive: str, wnid: str, data: bytes) -> Files:
    """Members of one class tar held in memory: slices of `data`, never copied or written."""
    view = memoryview(data)
    files = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                member = safe_name(archive, info)
                if member is None:
                    continue
                base = expect(archive, member, TRAIN_NAME, f"{wnid}_<n>.JPEG")
                if not base.startswith(wnid + "_"):
                    raise UserError(f"{archive}: {quoted(member)} belongs to another class; is this the right archive?")
                if info.offset_data + info.size > len(data):
                    raise tar_error(archive, EOFError("unexpected end of data"))
                files.append((base, view[info.offset_data : info.offset_data + info.size]))
    except (tarfile.TarError, EOFError) as e:
        raise tar_error(archive, e) from None
    return files
