"""What `--archives` holds, in whichever layout people download ImageNet in, as parts: one source file each (the
official tars, Kaggle's zip or folder, the Hugging Face tar.gz or parquet files, WebDataset shards), read once front
to back through archives.HashingReader and turned into (output path, bytes) with the official names:
train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_<n>.JPEG, test/ILSVRC2012_test_<n>.JPEG."""

import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from warmstart import untrusted
from warmstart.errors import UserError, first_line, printable, quoted
from warmstart.prepare import archives, facts, stores
from warmstart.prepare.archives import TAR_BUFSIZE, TEST_NAME, TRAIN_NAME, expect, safe_name, tar_error

KAGGLE_ROOT = "ILSVRC/Data/CLS-LOC/"
BATCH = 256  # files per writer task
Files = list[tuple[str, bytes | memoryview]]  # (path under the output root, bytes)

OFFICIAL = {facts.TRAIN_TAR: "train", facts.VAL_TAR: "val", **{t: "test" for t in facts.TEST_TARS}}
HF_TAR = re.compile(r"(?:data/)?(train|val|test)_images(?:_\d+)?\.tar\.gz")
HF_PARQUET = re.compile(r"(?:data/)?(train|validation|test)-\d{5}-of-\d{5}\.parquet")
WDS = re.compile(r"(?:[\w.-]+/)?imagenet1k-(train|validation)-\d+\.tar")
SPLIT = {"validation": "val"}
HF_TRAIN = re.compile(r"(n\d{8})_(\d+)_(n\d{8})\.JPEG")  # <image id>_<wnid>.JPEG
HF_VAL = re.compile(r"(ILSVRC2012_val_\d{8})_(n\d{8})\.JPEG")
HF_TEST = re.compile(r"(ILSVRC2012_test_\d{8})(?:_[^/]*)?\.JPEG")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PARQUET_LIMIT = 8 << 30  # a parquet file whose size nobody stated is held in memory up to this (the Hub's are ~0.5 GB)


def train_path(where: str, name: str, wnid: str) -> str:
    """train/<wnid>/<name> once `name` is an official train file name of class `wnid`."""
    m = TRAIN_NAME.fullmatch(name)
    if not m or m[1] != wnid or wnid not in facts.synsets():
        raise UserError(f"{where}: {quoted(name)} is not an ILSVRC2012 train image of class {wnid}; is this ImageNet-1k?")
    return f"train/{wnid}/{name}"


def val_path(where: str, name: str, wnid: str) -> str:
    """val/<wnid>/<name>, checked against the shipped ground truth (a flat or misfiled val folder scores 0.1%)."""
    truth = facts.val_labels().get(name)
    if truth is None:
        raise UserError(f"{where}: {quoted(name)} is not an ILSVRC2012 validation file name; is this ImageNet-1k?")
    if truth != wnid:
        raise UserError(f"{where}: {name} is labelled {wnid} but ILSVRC2012's ground truth says {truth}; the "
                        "labels are corrupt or not ImageNet-1k's")
    return f"val/{wnid}/{name}"


def class_of(where: str, label) -> str:
    """The wnid of a class index (sorted-wnid order, as the Hugging Face and timm datasets number them)."""
    if type(label) is not int or not 0 <= label < 1000:
        raise UserError(f"{where}: label {quoted(label)} is outside 0..999; this is not ImageNet-1k's labelling")
    return facts.wnids()[label]


class Part:
    """One source file. read() opens it (from byte `offset`), then files() yields (unit, files): unit names a train
    class the caller may commit on its own (official and Kaggle train), None for files of the part as a whole."""

    kind = ""
    staged = True  # files of many classes: written aside, moved into place once the part is whole and checked
    algorithm: str | None = "sha256"

    def __init__(self, split: str, store: stores.Store, entry: stores.Entry, key: str | None = None):
        self.split, self.store, self.entry, self.name = split, store, entry, entry.name
        self.key = key or f"{split}/@{entry.name}"
        self.size = entry.size or 0
        self.reader: archives.HashingReader | None = None
        self.stream, self.digest, self.end = None, None, 0
        self.offset = 0

    def open(self, offset: int = 0, on_resume=None) -> None:
        """Start reading (a thread fetches ahead at once). on_resume(line): told of each resumed connection; may be
        set later as the attribute, for a part opened ahead of its turn."""
        self.offset, self.on_resume, self.digest = offset, on_resume, None
        self.stream = self.store.open(self.name, offset, on_resume=lambda line: self.on_resume and self.on_resume(line))
        self.reader = archives.HashingReader(self.stream, self.algorithm if offset == 0 else None)

    def files(self, done: set[str]) -> Iterator[tuple[str | None, Files | None]]:
        raise NotImplementedError

    def checksum(self) -> str | None:
        """The digest of every byte (the rest read first: a tar's end padding), once files() is exhausted; None when
        the file was not read from byte 0. Kept, so closing the part after does not touch it."""
        if self.digest is None:
            self.digest = self.reader.hexdigest() or ""
        return self.digest or None

    @property
    def consumed(self) -> int:
        return self.offset + (self.reader.consumed if self.reader else 0)

    def published(self) -> tuple[str | None, str]:
        """(the SHA-256 this file should have, who says so): the hub's file list; for a local copy, the record
        `huggingface-cli download --local-dir` keeps of the hub's ETag (an LFS file's ETag is its SHA-256)."""
        if self.entry.sha256:
            return self.entry.sha256.lower(), "the hub's file list"
        root = self.store.path("")
        for meta in ([root / ".cache/huggingface/download" / f"{self.name}.metadata",
                      root.parent / ".cache/huggingface/download" / root.name / f"{self.name}.metadata"] if root else []):
            if meta.is_file():
                try:
                    lines = untrusted.read_text(meta, meta.name, limit=4096).splitlines()
                except UserError:
                    continue
                if len(lines) > 1 and re.fullmatch(r"[0-9a-f]{64}", lines[1].strip()):
                    return lines[1].strip(), f"huggingface-cli's download record ({meta.relative_to(root.parent)})"
        return None, "nobody"

    def close(self) -> None:
        if self.reader:
            self.reader.close()

    def _tar(self, mode: str = "r|") -> tarfile.TarFile:
        return tarfile.open(fileobj=self.reader, mode=mode, bufsize=TAR_BUFSIZE)

    def _members(self, mode: str = "r|") -> Iterator[tuple[str, bytes]]:
        """(member path, bytes) of a tar streamed front to back, unsafe members refused."""
        try:
            with self._tar(mode) as tar:
                for info in tar:
                    member = safe_name(self.name, info)
                    if member is not None:
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise tar_error(self.name, EOFError("unexpected end of data"))
                        # the byte after this member in the file: a plain tar's next header starts there
                        self.end = self.offset + info.offset_data + -(-info.size // 512) * 512
                        yield member, data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise tar_error(self.name, e) from None


def batched(pairs: Iterator[tuple[str, bytes]]) -> Iterator[tuple[None, Files]]:
    batch: Files = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == BATCH:
            yield None, batch
            batch = []
    if batch:
        yield None, batch


class OfficialTrain(Part):
    """ILSVRC2012_img_train.tar: an outer tar of 1,000 class tars, each a unit committed as it ends. ends[wnid] is the
    byte after its member, where a rerun over HTTP starts (the outer tar is a plain tar: a header starts there)."""

    kind, staged, algorithm = "official", False, "md5"

    def __init__(self, split, store, entry):
        super().__init__(split, store, entry, key="train")
        self.ends: dict[str, int] = {}

    def files(self, done):
        for member, data in self._members():
            wnid = expect(self.name, member, re.compile(r"n\d{8}\.tar"), "<wnid>.tar")[:-4]
            if wnid not in facts.synsets():
                raise UserError(f"{self.name}: {quoted(member)} is not one of the 1,000 ILSVRC2012 classes")
            self.ends[wnid] = self.end
            yield f"train/{wnid}", None if wnid in done else [
                (f"train/{wnid}/{name}", d) for name, d in archives.inner_files(f"{self.name}/{member}", wnid, data)]


class OfficialFlat(Part):
    """ILSVRC2012_img_val.tar or the test tar: flat, official names; one unit."""

    kind, staged, algorithm = "official", False, "md5"

    def __init__(self, split, store, entry):
        super().__init__(split, store, entry, key=split)

    def files(self, done):
        return batched(self._paths())

    def _paths(self) -> Iterator[tuple[str, bytes]]:
        labels = facts.val_labels()
        for member, data in self._members():
            if self.split == "val":
                name = expect(self.name, member, labels, "ILSVRC2012_val_XXXXXXXX.JPEG")
                yield f"val/{labels[name]}/{name}", data
            else:
                yield f"test/{expect(self.name, member, TEST_NAME, 'ILSVRC2012_test_XXXXXXXX.JPEG')}", data


class HfTar(Part):
    """The Hugging Face dataset ILSVRC/imagenet-1k's data/{train_images_K,val_images,test_images}.tar.gz: flat tars of
    <image id>_<wnid>.JPEG, classes spread over the train parts."""

    kind = "hf-tars"

    def files(self, done):
        return batched((self.path(member.rsplit("/", 1)[-1]), data) for member, data in self._members("r|gz"))

    def path(self, base: str) -> str:
        where = f"{self.name}: {quoted(base)}"
        if self.split == "test":
            m = HF_TEST.fullmatch(base)
            if not m:
                raise UserError(f"{where} is not named ILSVRC2012_test_<n>.JPEG; is this ImageNet-1k's test_images?")
            return f"test/{m[1]}.JPEG"
        m = (HF_TRAIN if self.split == "train" else HF_VAL).fullmatch(base)
        if not m:
            want = "<wnid>_<n>_<wnid>.JPEG" if self.split == "train" else "ILSVRC2012_val_<n>_<wnid>.JPEG"
            raise UserError(f"{where} is not named {want}; is this ImageNet-1k's {self.split}_images?")
        if self.split == "train":
            return train_path(self.name, f"{m[1]}_{m[2]}.JPEG", m[3])
        return val_path(self.name, f"{m[1]}.JPEG", m[2])


class HfParquet(Part):
    """ILSVRC/imagenet-1k's parquet files: rows of image{bytes, path} and label (sorted-wnid index; -1 in test). A
    parquet file's index is at its end, so the file is read whole (hashed as it arrives) and parsed from memory."""

    kind = "hf-parquet"

    def files(self, done):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading parquet needs pyarrow: pip install 'warmstart[parquet]'") from None
        data = self.reader.readall(self.size or PARQUET_LIMIT, self.name)
        try:
            table = pq.ParquetFile(pa.BufferReader(data))
            image = table.schema_arrow.field("image").type if "image" in table.schema_arrow.names else None
            if image is None or "label" not in table.schema_arrow.names or not pa.types.is_struct(image) or \
                    {image.field(i).name for i in range(image.num_fields)} < {"bytes", "path"}:
                raise UserError(f"{self.name}: a parquet file without the columns image{{bytes, path}} and label "
                                f"(it has {', '.join(table.schema_arrow.names)}); is this ILSVRC/imagenet-1k?")
            row = 0
            for batch in table.iter_batches(batch_size=BATCH, columns=["image", "label"]):
                images, labels = batch.column("image"), batch.column("label").to_pylist()
                files = []
                for blob, path, label in zip(images.field("bytes").to_pylist(), images.field("path").to_pylist(), labels):
                    files.append((self.path(f"{self.name} row {row}", path, label), blob or b""))
                    row += 1
                yield None, files
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{self.name} is truncated or not a parquet file ({first_line(e)}); download it "
                            "again") from None

    def path(self, where: str, path, label) -> str:
        base = str(path or "").replace("\\", "/").rsplit("/", 1)[-1]
        if self.split == "test":
            m = HF_TEST.fullmatch(base)
            if not m:
                raise UserError(f"{where}: image.path {quoted(path)} is not an ILSVRC2012 test file name")
            return f"test/{m[1]}.JPEG"
        wnid = class_of(where, label)
        m = re.fullmatch(r"((?:n\d{8}|ILSVRC2012_val)_\d+)(?:_n\d{8})?\.JPEG", base)
        if not m:
            raise UserError(f"{where}: image.path {quoted(path)} is not an ILSVRC2012 file name; the output needs it")
        name = f"{m[1]}.JPEG"
        return train_path(where, name, wnid) if self.split == "train" else val_path(where, name, wnid)


class Wds(Part):
    """WebDataset shards (timm/imagenet-1k-wds): samples KEY.jpg + KEY.cls (sorted-wnid index) + KEY.json, a
    sample's members adjacent. The file name is the json's "filename", else KEY.JPEG."""

    kind = "wds"

    def files(self, done):
        return batched(self._samples())

    def _samples(self) -> Iterator[tuple[str, bytes]]:
        key, sample, seen = None, {}, set()
        for member, data in self._members("r|*"):
            folder, _, base = member.rpartition("/")  # a key is the name up to the first dot of its base name
            k, _, ext = base.partition(".")
            k = f"{folder}/{k}" if folder else k
            if k != key:
                if key is not None:
                    yield self.path(key, sample, seen)
                if k in seen:
                    raise UserError(f"{self.name}: two samples named {quoted(k)}; a WebDataset shard's samples are unique")
                key, sample = k, {}
            sample[ext.lower()] = data
        if key is not None:
            yield self.path(key, sample, seen)

    def path(self, key: str, sample: dict, seen: set) -> tuple[str, bytes]:
        seen.add(key)
        where = f"{self.name}: sample {quoted(key)}"
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if image is None or "cls" not in sample:
            raise UserError(f"{where} has no {'.cls' if image is not None else '.jpg'}; each sample needs an image "
                            "and its class index (.cls)")
        if not re.fullmatch(rb"\s*\d{1,9}\s*", sample["cls"]):  # ASCII digits only: int() also takes "+2_0" and "٢"
            raise UserError(f"{where}: .cls {quoted(sample['cls'])} is not a class index")
        label = int(sample["cls"])
        wnid = class_of(where, label)
        name = key.rsplit("/", 1)[-1] + ".JPEG"
        if "json" in sample:
            meta = untrusted.parse_json(sample["json"].decode(errors="replace"), f"{where}.json")
            if isinstance(meta, dict) and isinstance(meta.get("filename"), str):
                name = meta["filename"]
                if "/" in name or "\\" in name:
                    raise UserError(f"{where}: .json filename {quoted(name)} is a path, not a file name")
        return (train_path(where, name, wnid) if self.split == "train" else val_path(where, name, wnid)), image


class Kaggle(Part):
    """The Kaggle 'imagenet-object-localization-challenge' layout, its zip or the unzipped folder: files by name (no
    stream, no published checksum; the zip's CRC-32 is checked on every read). One part per split."""

    kind, staged, algorithm = "kaggle", False, None

    def __init__(self, split: str, source: "KaggleFiles"):
        self.source, self.split, self.name, self.key = source, split, str(source.archive(split)), split
        self.size, self.read_bytes, self.offset, self.reader, self.stream = source.sizes[split], 0, 0, None, None

    def open(self, offset=0, on_resume=None):
        self.read_bytes = 0

    def checksum(self):
        return None

    @property
    def consumed(self):
        return self.read_bytes

    def close(self):
        pass

    def _read(self, member: str) -> bytes:
        data = self.source.read(member)
        self.read_bytes += len(data)
        return data

    def files(self, done):
        members = sorted(self.source.members[self.split].items())
        if self.split == "train":
            by_class: dict[str, list[str]] = {}
            for key, member in members:
                by_class.setdefault(key.split("/")[0], []).append(member)
            for wnid, ms in by_class.items():
                yield f"train/{wnid}", None if wnid in done else [
                    (f"train/{wnid}/{m.rsplit('/', 1)[1]}", self._read(m)) for m in ms]
            return
        labels = facts.val_labels()
        yield from batched((f"val/{labels[k]}/{k}" if self.split == "val" else f"test/{k}", self._read(m))
                           for k, m in members)


class KaggleFiles:
    """Kaggle's members by split, from its zip or its unzipped folder."""

    def __init__(self, root: Path, zip_path: Path | None):
        self.root, self.zip_path = root, zip_path
        self.zip = zipfile.ZipFile(zip_path) if zip_path else None
        self.members: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}  # split -> {key: member}
        self.sizes = {"train": 0, "val": 0, "test": 0}
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
                    raise UserError(f"{where}: unexpected member {quoted(name)} (want train/<wnid>/<wnid>_<n>.JPEG)")
                key = rest
            elif split == "val":
                key = expect(where, name, facts.val_labels(), "val/ILSVRC2012_val_XXXXXXXX.JPEG")
            elif split == "test":
                key = expect(where, name, TEST_NAME, "test/ILSVRC2012_test_XXXXXXXX.JPEG")
            else:
                continue
            self.members[split][key] = name
            self.sizes[split] += size

    def archive(self, split: str) -> Path:
        return self.zip_path or self.root / KAGGLE_ROOT / split

    def read(self, member: str) -> bytes:
        try:
            return self.zip.read(member) if self.zip else (self.root / member).read_bytes()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
            raise UserError(f"cannot read {member} from {self.zip_path or self.root} ({e}); download it again") from None

    def text(self, name: str) -> str | None:
        if self.zip:
            return self.zip.read(name).decode() if name in self.zip.NameToInfo else None
        return (self.root / name).read_text() if (self.root / name).is_file() else None


class Source:
    """Everything --archives named: parts per split (val, train, test, each from one layout), the devkit, MD5SUMS."""

    def __init__(self, where: str, parts: dict[str, list[Part]], devkit: tuple | None = None,
                 md5sums: tuple | None = None, kaggle: KaggleFiles | None = None):
        self.where, self.parts, self.devkit, self.md5sums, self.kaggle = where, parts, devkit, md5sums, kaggle
        self.layout = "+".join(dict.fromkeys(p[0].kind for p in parts.values()))
        self.ignored: list[str] = []  # splits found in a second layout, said once

    def splits(self) -> list[str]:
        return [s for s in ("val", "train", "test") if self.parts.get(s)]

    @staticmethod
    def location(store_entry: tuple) -> str:
        """How a message names a file: its local path, or its store and name."""
        store, entry = store_entry
        return str(store.path(entry.name) or f"{store.where.rstrip('/')}/{entry.name}")

    def read(self, store_entry: tuple) -> bytes:
        """A small file (the devkit, MD5SUMS) read whole."""
        store, entry = store_entry
        stream = store.open(entry.name, 0)
        try:
            return b"".join(iter(lambda: stream.read(1 << 20), b""))
        finally:
            stream.close()


LAYOUTS = (  # preference when two layouts hold the same split
    ("official", lambda name: OFFICIAL.get(name)),
    ("hf-tars", lambda name: (m := HF_TAR.fullmatch(name)) and m[1]),
    ("wds", lambda name: (m := WDS.fullmatch(name)) and SPLIT.get(m[1], m[1])),
    ("hf-parquet", lambda name: (m := HF_PARQUET.fullmatch(name)) and SPLIT.get(m[1], m[1])),
)
MAKE = {"hf-tars": HfTar, "wds": Wds, "hf-parquet": HfParquet}


def find(specs: list[str]) -> Source:
    """Recognise what the --archives folders, URLs and hf:// datasets hold; each split from one layout."""
    found: dict[str, dict[str, list]] = {}  # layout -> split -> [(store, entry)]
    extra: dict[str, tuple] = {}
    seen: dict[str, str] = {}
    all_stores = [stores.open_store(s) for s in specs]
    if len(all_stores) == 1 and (kaggle := kaggle_files(all_stores[0])):  # before listing its 1.4M files
        return Source(all_stores[0].where, {s: [Kaggle(s, kaggle)] for s in ("val", "train", "test")
                                            if kaggle.members[s]}, kaggle=kaggle)
    for store in all_stores:
        for name, entry in sorted(store.entries().items(), key=lambda kv: natural(kv[0])):
            matches = [(layout, split) for layout, split_of in LAYOUTS if (split := split_of(name))]
            if not matches and name not in (facts.DEVKIT, "MD5SUMS"):
                continue
            check_name(store, name)
            if name in seen:
                raise UserError(f"{name} is in both {seen[name]} and {store.where}; give it once")
            seen[name] = store.where
            if name in (facts.DEVKIT, "MD5SUMS"):
                extra[name] = (store, entry)
            for layout, split in matches:
                found.setdefault(layout, {}).setdefault(split, []).append((store, entry))
    parts: dict[str, list[Part]] = {}
    ignored = []
    for layout, by_split in found.items():
        for split, items in by_split.items():
            if split in parts:
                ignored.append(f"{split}: read from the {parts[split][0].kind} files; the {layout} files "
                               f"({items[0][1].name}, ...) are ignored (one layout per split)")
                continue
            if layout == "official":
                store, entry = next(i for i in items if i[1].name != facts.TEST_TARS[1] or len(items) == 1)
                parts[split] = [OfficialTrain(split, store, entry) if split == "train" else OfficialFlat(split, store, entry)]
            else:
                parts[split] = [MAKE[layout](split, store, entry) for store, entry in items]
    where = ", ".join(s.where for s in all_stores)
    if facts.KAGGLE_ZIP in seen and seen[facts.KAGGLE_ZIP] in {s.where for s in all_stores if s.remote}:
        raise UserError(f"{facts.KAGGLE_ZIP} is read by name, member by member, which a stream cannot do: download "
                        "it first (kaggle competitions download ...), then give its folder to --archives")
    if parts:
        source = Source(where, dict(sorted(parts.items(), key=lambda kv: ("val", "train", "test").index(kv[0]))),
                        extra.get(facts.DEVKIT), extra.get("MD5SUMS"))
        source.ignored = ignored
        return source
    raise UserError(f"{where} holds none of the layouts prepare reads: the official {facts.TRAIN_TAR} / "
                    f"{facts.VAL_TAR}, Kaggle's {facts.KAGGLE_ZIP} (or its folder), Hugging Face's "
                    "data/{train,val}_images*.tar.gz or data/*-NNNNN-of-NNNNN.parquet, or WebDataset shards "
                    "imagenet1k-{train,validation}-NNNN.tar; point --archives at the download")


def check_name(store: stores.Store, name: str) -> None:
    """A file name from a listing someone else wrote: printable, relative, no '..' (it becomes part of a URL)."""
    parts = name.split("/")
    if not printable(name) or "\\" in name or name.startswith("/") or ".." in parts or "" in parts:
        raise UserError(f"{store.where} lists the file {quoted(name)}: control characters, '..' or an absolute path "
                        "in a file name; refusing this source")


def kaggle_files(store: stores.Store) -> KaggleFiles | None:
    """Kaggle's layout in a local folder that holds no official archive (those come first, as they always have)."""
    root = store.path("")
    if root is None or not root.is_dir() or any((root / name).is_file() for name in OFFICIAL):
        return None
    if (root / facts.KAGGLE_ZIP).is_file():
        return KaggleFiles(root, root / facts.KAGGLE_ZIP)
    return KaggleFiles(root, None) if (root / KAGGLE_ROOT).is_dir() else None


def natural(name: str) -> list:
    """Sort key: train_images_10 after train_images_9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
