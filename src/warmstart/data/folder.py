"""ImageFolder-style trees (`train/<class>/*`, `val/<class>/*`) with a cached file index.

Scanning 1.28 M files takes minutes, so the index is cached under ~/.cache/warmstart (or $WARMSTART_CACHE)
and reused while no class folder's mtime changed (adding or removing a file changes its folder's mtime).
"""

import hashlib
import json
import os
from pathlib import Path

from warmstart import untrusted
from warmstart.errors import UserError, printable, shown
from warmstart.fileio import atomic_write

# what counts as an image, for training and for `prepare --from-folder` alike
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif")


def is_image_name(name: str) -> bool:
    """An image file by its name: a known extension, not hidden (macOS `._x.jpg`, editors' `.x.jpg.swp`)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def image_files(root: Path) -> list[Path]:
    """Every image file under root at any depth, sorted, skipping hidden files and everything in hidden folders."""
    def unreadable(e: OSError):  # os.walk would pass over a folder it cannot list without a word
        raise UserError(f"cannot list {e.filename} ({e.strerror}); make it readable or leave it out")

    found = []
    for parent, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(parent) / f for f in filenames if is_image_name(f) and os.path.isfile(os.path.join(parent, f))]
    return sorted(found)


def cache_dir() -> Path:
    return Path(os.environ.get("WARMSTART_CACHE", Path.home() / ".cache" / "warmstart"))


def list_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is not a folder; expected an ImageFolder tree with one sub-folder per class")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    if bad := next((c for c in classes if not printable(c) or len(c) > 1000), None):
        # a class name travels into every checkpoint and every predict table: checkpoint.py refuses such names
        raise UserError(f"class folder {shown(bad)[:200]!r} in {split_dir} has control characters in its name (or is "
                        f"over 1000 characters); rename it")
    return classes


def _scan(split_dir: Path, classes: list[str]) -> dict[str, list[str]]:
    files = {}
    for c in classes:
        names = [e.name for e in os.scandir(split_dir / c)
                 if e.is_file() and is_image_name(e.name)]
        files[c] = sorted(names)
    return files


def _listing(files, classes: list[str]) -> bool:
    """Whether a cached index's files are {class: [file name, ...]} for every class (names, never paths)."""
    return isinstance(files, dict) and all(
        isinstance(files.get(c), list) and all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
                                               for n in files[c]) for c in classes)


def index_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """Return (classes, samples) with samples as (relative path, class index), sorted.

    `classes` fixes the class order (val/ is mapped by name onto train/'s classes); a class folder
    that is not in it is an error, since its images would have no label.
    """
    split_dir = Path(split_dir).resolve()
    found = list_classes(split_dir)
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has class folders missing from train/: {', '.join(unknown[:5])}"
                        f"{' …' if len(unknown) > 5 else ''}; every evaluated class must also be a training class")
    stamp = {c: (split_dir / c).stat().st_mtime_ns for c in found}
    cache = cache_dir() / "index" / (hashlib.sha1(str(split_dir).encode()).hexdigest() + ".json")
    files = None
    try:  # a cache: missing or whatever is wrong with it (torn, edited, 200,000 `[`) is rescanned, never an error
        cached = untrusted.read_json(cache, "folder index cache", limit=2**30)  # ImageNet's train/: ~30 MB
        if cached.get("stamp") == stamp and _listing(cached.get("files"), found):
            files = cached["files"]
    except UserError:
        pass
    if files is None:
        files = _scan(split_dir, found)
        text = json.dumps({"root": str(split_dir), "stamp": stamp, "files": files})
        try:  # a cache: no fsync, a torn file after a power loss is just rescanned
            atomic_write(cache, lambda tmp: tmp.write_text(text), durable=False)
        except (OSError, UserError):
            pass  # a read-only home or a full disk only costs a rescan next time
    to_index = {c: i for i, c in enumerate(classes)}
    samples = [(f"{c}/{name}", to_index[c]) for c in found for name in files[c]]
    if not samples:
        raise UserError(f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def find_split(root: Path, split: str) -> Path:
    """`root/split`, with a clear error when the tree does not look like a dataset folder."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist; pass --data DIR holding train/ and val/ "
                        f"(e.g. the output of `warmstart prepare`)")
    if not (root / split).is_dir():
        raise UserError(f"{root} has no {split}/ folder; expected {root}/{split}/<class>/<images> "
                        f"(the layout `warmstart prepare` writes)")
    return root / split
