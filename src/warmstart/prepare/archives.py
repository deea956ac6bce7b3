"""Find the ILSVRC2012 inputs (official archives or the Kaggle layout, zipped or not) and read
them front to back exactly once, hashing while reading and refusing anything unsafe."""

import hashlib
import io
import os
import queue
import re
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

from warmstart.errors import UserError
from warmstart.prepare import facts

TRAIN_NAME = re.compile(r"(n\d{8})_\d+\.JPEG")
TEST_NAME = re.compile(r"ILSVRC2012_test_\d{8}\.JPEG")
KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC/"
TAR_BUFSIZE = 64 << 10  # tarfile's stream reads: fewer Python calls than 10 KiB, small remainder copies
Files = list[tuple[str, bytes | memoryview]]


class HashingReader:
    """A file read once, front to back: a thread reads 4 MiB chunks and feeds MD5 (hashlib drops
    the GIL), so disk reads and hashing overlap the tar parsing in the caller's thread."""

    CHUNK = 4 << 20

    def __init__(self, path: Path):
        self.path, self.consumed = path, 0
        self.md5 = hashlib.md5()
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=8)
        self.buf: bytes | None = b""
        self.pos = 0
        self.thread = threading.Thread(target=self._read_ahead, daemon=True)
        self.thread.start()

    def _read_ahead(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                while chunk := f.read(self.CHUNK):
                    self.chunks.put(chunk)  # parse this chunk while it is hashed
                    self.md5.update(chunk)
        except BaseException as e:  # surfaced in the reading thread
            self.chunks.put(e)
            return
        self.chunks.put(b"")

    def read(self, n: int) -> bytes:
        if self.buf is None:
            return b""
        if self.pos == len(self.buf):
            item = self.chunks.get()
            if isinstance(item, BaseException):
                raise item
            self.buf, self.pos = (item or None), 0
            if not item:
                return b""
        data = self.buf[self.pos : self.pos + n]
        self.pos += len(data)
        self.consumed += len(data)
        return data

    def hexdigest(self) -> str:
        """MD5 of the whole file; reads what the tar parser left (end-of-archive padding)."""
        while self.read(self.CHUNK):
            pass
        self.thread.join()
        return self.md5.hexdigest()


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
        raise UserError(f"{archive}: member {name!r} has an unsafe path (absolute or '..'); refusing to extract. "
                        "This is not an untouched ILSVRC2012 archive; download it again from image-net.org")
    if is_dir:
        return None
    if not is_file:
        raise UserError(f"{archive}: member {name!r} is a link or device file, which an ILSVRC2012 archive never "
                        "holds; refusing to extract. Download the archive again from image-net.org")
    return name.removeprefix("./")


def tar_error(archive: str, e: Exception) -> UserError:
    return UserError(f"{archive} is truncated or corrupt ({e}); download it again (resume a partial download "
                     "with `wget -c` or `curl -C -`)")


def expect(archive: str, name: str, pattern: re.Pattern | dict, what: str) -> str:
    base = name.rsplit("/", 1)[-1]
    if not (base in pattern if isinstance(pattern, dict) else pattern.fullmatch(base)):
        raise UserError(f"{archive}: unexpected member {name!r} (want {what}); is this the right archive?")
    return base


class Official:
    """ILSVRC2012_img_{train,val,test}.tar + devkit, as downloaded from image-net.org."""

    layout = "official"

    def __init__(self, root: Path, paths: dict[str, Path], devkit: Path | None):
        self.root, self.paths, self.devkit = root, paths, devkit
        self.readers: dict[str, HashingReader] = {}

    def archive(self, split: str) -> Path | None:
        return self.paths.get(split)

    def _stream(self, split: str) -> tarfile.TarFile:
        self.readers[split] = reader = HashingReader(self.paths[split])
        return tarfile.open(fileobj=reader, mode="r|", bufsize=TAR_BUFSIZE)

    def train(self, done: set[str]) -> Iterator[tuple[str, Files | None]]:
        """(wnid, files) per class in archive order; files is None for classes in `done`,
        which are still read (the MD5 covers every byte) but not parsed."""
        name = self.paths["train"].name
        try:
            with self._stream("train") as outer:
                for info in outer:
                    member = safe_name(name, info)
                    if member is None:
                        continue
                    wnid = expect(name, member, re.compile(r"n\d{8}\.tar"), "<wnid>.tar")[:-4]
                    if wnid not in facts.synsets():
                        raise UserError(f"{name}: {member!r} is not one of the 1,000 ILSVRC2012 classes")
                    data = outer.extractfile(info).read()
                    if len(data) != info.size:
                        raise tar_error(name, EOFError("unexpected end of data"))
                    yield wnid, None if wnid in done else inner_files(f"{name}/{member}", wnid, data)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise tar_error(name, e) from None

    def flat(self, split: str, pattern: re.Pattern | dict, what: str) -> Iterator[tuple[str, bytes]]:
        name = self.paths[split].name
        try:
            with self._stream(split) as tar:
                for info in tar:
                    member = safe_name(name, info)
                    if member is not None:
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise tar_error(name, EOFError("unexpected end of data"))
                        yield expect(name, member, pattern, what), data
        except (tarfile.TarError, EOFError, OSError) as e:
            raise tar_error(name, e) from None

    def val(self) -> Iterator[tuple[str, bytes]]:
        return self.flat("val", facts.val_labels(), "ILSVRC2012_val_XXXXXXXX.JPEG")

    def test(self) -> Iterator[tuple[str, bytes]]:
        return self.flat("test", TEST_NAME, "ILSVRC2012_test_XXXXXXXX.JPEG")

    def size(self, split: str) -> int:
        return self.paths[split].stat().st_size

    def md5(self, split: str) -> str | None:
        return self.readers[split].hexdigest() if split in self.readers else None

    def consumed(self, split: str) -> int:
        return self.readers[split].consumed if split in self.readers else 0


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
                    raise UserError(f"{archive}: {member!r} belongs to another class; is this the right archive?")
                if info.offset_data + info.size > len(data):
                    raise tar_error(archive, EOFError("unexpected end of data"))
                files.append((base, view[info.offset_data : info.offset_data + info.size]))
    except (tarfile.TarError, EOFError) as e:
        raise tar_error(archive, e) from None
    return files


class Kaggle:
    """The Kaggle 'imagenet-object-localization-challenge' layout: its zip, or the unzipped folder."""

    layout = "kaggle"
    devkit = None

    def __init__(self, root: Path, zip_path: Path | None):
        self.root, self.zip_path = root, zip_path
        self.zip = zipfile.ZipFile(zip_path) if zip_path else None
        self.members: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}  # split -> {key: member}
        self.sizes = {"train": 0, "val": 0, "test": 0}
        self.read = {"train": 0, "val": 0, "test": 0}
        where = zip_path.name if zip_path else str(root)
        if self.zip:
            names = [(safe_name(where, i), i.compress_size) for i in self.zip.infolist()]
        else:
            names = []
            for dirpath, dirnames, filenames in os.walk(root):
                for f in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                    p = os.path.join(dirpath, f)
                    if os.path.islink(p):
                        raise UserError(f"{p} is a symbolic link; the Kaggle folder should hold only regular files")
                    names.append((os.path.relpath(p, root).replace(os.sep, "/"), os.path.getsize(p)))
        for name, size in names:
            if name is None or not name.startswith(KAGGLE_ROOT):
                continue
            split, _, rest = name[len(KAGGLE_ROOT) :].partition("/")
            if split == "train":
                wnid, _, base = rest.partition("/")
                if wnid not in facts.synsets() or not TRAIN_NAME.fullmatch(base) or not base.startswith(wnid + "_"):
                    raise UserError(f"{where}: unexpected member {name!r} (want train/<wnid>/<wnid>_<n>.JPEG)")
                key = rest
            elif split == "val":
                key = expect(where, name, facts.val_labels(), "val/ILSVRC2012_val_XXXXXXXX.JPEG")
            elif split == "test":
                key = expect(where, name, TEST_NAME, "test/ILSVRC2012_test_XXXXXXXX.JPEG")
            else:
                continue
            self.members[split][key] = name
            self.sizes[split] += size

    def archive(self, split: str) -> Path | None:
        return (self.zip_path or self.root / KAGGLE_ROOT / split) if self.members[split] else None

    def _read(self, split: str, member: str) -> bytes:
        try:
            data = self.zip.read(member) if self.zip else (self.root / member).read_bytes()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
            raise UserError(f"cannot read {member} from {self.zip_path or self.root} ({e}); download it again") from None
        self.read[split] += len(data)
        return data

    def text(self, name: str) -> str | None:
        if self.zip:
            return self.zip.read(name).decode() if name in self.zip.NameToInfo else None
        return (self.root / name).read_text() if (self.root / name).is_file() else None

    def train(self, done: set[str]) -> Iterator[tuple[str, Files | None]]:
        by_class: dict[str, list[str]] = {}
        for key, member in sorted(self.members["train"].items()):
            by_class.setdefault(key.split("/")[0], []).append(member)
        for wnid, members in by_class.items():
            yield wnid, None if wnid in done else [(m.rsplit("/", 1)[1], self._read("train", m)) for m in members]

    def val(self) -> Iterator[tuple[str, bytes]]:
        return ((k, self._read("val", m)) for k, m in sorted(self.members["val"].items()))

    def test(self) -> Iterator[tuple[str, bytes]]:
        return ((k, self._read("test", m)) for k, m in sorted(self.members["test"].items()))

    def size(self, split: str) -> int:
        return self.sizes[split]

    def md5(self, split: str) -> str | None:
        return None  # Kaggle publishes no checksums; the zip's CRC-32s are checked on every read

    def consumed(self, split: str) -> int:
        return self.read[split]


def find(root: Path) -> Official | Kaggle:
    """Recognise what `root` holds: official archives by name, else the Kaggle zip or folder."""
    if not root.is_dir():
        raise UserError(f"--archives {root} is not a folder; point it at the folder holding the downloaded archives")
    paths = {"train": root / facts.TRAIN_TAR, "val": root / facts.VAL_TAR}
    paths["test"] = next((root / t for t in facts.TEST_TARS if (root / t).is_file()), root / facts.TEST_TARS[0])
    paths = {split: p for split, p in paths.items() if p.is_file()}
    if paths:
        devkit = root / facts.DEVKIT
        return Official(root, paths, devkit if devkit.is_file() else None)
    if (root / facts.KAGGLE_ZIP).is_file():
        return Kaggle(root, root / facts.KAGGLE_ZIP)
    if (root / KAGGLE_ROOT).is_dir():
        return Kaggle(root, None)
    raise UserError(f"{root} holds neither {facts.TRAIN_TAR} / {facts.VAL_TAR} nor the Kaggle layout "
                    f"({facts.KAGGLE_ZIP} or {KAGGLE_ROOT}); point --archives at the download folder")
