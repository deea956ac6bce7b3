"""Mini ILSVRC2012 archives in the official (or Kaggle) structure, for tests, the demo and benchmarks.

Official layout: ILSVRC2012_img_train.tar (an outer tar of per-class `<wnid>.tar` holding
`<wnid>_<n>.JPEG`), ILSVRC2012_img_val.tar (flat, official file names, so the shipped ground
truth labels them), ILSVRC2012_devkit_t12.tar.gz (real data/meta.mat and validation ground
truth in devkit class IDs), optionally a test tar, and MD5SUMS. Images come from the real JPEGs
in shared/data/imagenet-sample when present (one per class, varied by crop/flip/re-encode), else
they are drawn, so the demo works on a clone without shared data. With --drawn (drawn=True) every image
is drawn on its own by warmstart.synthetic instead: class i of the archive is shape class i (circle,
square, triangle, ...), so a network has something to learn and does not score 100%.

    python -m warmstart.prepare.fixtures --out DIR --classes 10 --per-class 3 --val 20
    python -m warmstart.prepare.fixtures --out DIR --classes 10 --per-class 150 --val 400 --drawn
"""

import argparse
import io
import os
import random
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, JpegImagePlugin

from warmstart import synthetic
from warmstart.data.shard_writer import file_digest
from warmstart.prepare import facts

MTIME = 1_335_000_000  # spring 2012, like the real archives
PNG_CLASS, CMYK_CLASS = "n02105855", "n01739381"  # owners of n02105855_2933 (PNG) and n01739381_1309 (CMYK)


def shared_data() -> Path | None:
    """shared/data next to the repository, or $WARMSTART_SHARED_DATA; None when absent."""
    path = Path(os.environ.get("WARMSTART_SHARED_DATA", Path(__file__).resolve().parents[3].parent / "shared" / "data"))
    return path if path.is_dir() else None


def sample_image(wnid: str) -> Image.Image:
    """The real imagenet-sample JPEG of this class, or a drawn stand-in."""
    data = shared_data()
    if data is not None:
        found = sorted((data / "imagenet-sample").glob(f"{wnid}_*.JPEG"))
        if found:
            return Image.open(found[0])
    rng = random.Random(wnid)
    img = Image.new("RGB", (400, 300), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.randrange(400), rng.randrange(300)
        draw.ellipse((x, y, x + rng.randrange(20, 160), y + rng.randrange(20, 120)), fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def class_images(wnid: str, count: int) -> list[bytes]:
    """`count` distinct JPEGs of one class: random crops (80-100%) and flips, re-encoded with the
    source's own quantisation tables and subsampling so file sizes stay ImageNet-like."""
    base = sample_image(wnid)
    if base.format == "JPEG":
        encoding = {"qtables": base.quantization, "subsampling": JpegImagePlugin.get_sampling(base)}
    else:
        encoding = {"quality": 90}
    base = base.convert(base.mode if base.mode in ("L", "RGB") else "RGB")
    rng = random.Random(f"{wnid}/{count}")
    out = []
    for _ in range(count):
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        x, y = rng.randrange(w - cw + 1), rng.randrange(h - ch + 1)
        img = base.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", **encoding)
        out.append(buf.getvalue())
    return out


def drawn_images(index: int, count: int, seed: int = 0) -> list[bytes]:
    """`count` JPEGs of shape class `index` of warmstart.synthetic, each drawn independently."""
    return synthetic.class_images(index, count, seed)


def drawn_names(classes: list[str]) -> dict[str, str]:
    """wnid -> the shape that stands in for it with drawn=True (class i of the archive is shape class i)."""
    return {w: synthetic.NAMES[i] for i, w in enumerate(classes)}


def reencode(data: bytes, fmt: str, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buf, fmt)
    return buf.getvalue()


def pick_classes(n: int, include: tuple[str, ...] = ()) -> list[str]:
    """n wnids spread over the 1,000 classes, always containing `include`."""
    all_wnids = facts.wnids()
    picked = list(dict.fromkeys(include))[:n]
    for i in range(n):
        if len(picked) == n:
            break
        w = all_wnids[i * len(all_wnids) // n]
        if w not in picked:
            picked.append(w)
    for w in all_wnids:  # only when `include` collided with the spread picks
        if len(picked) == n:
            break
        if w not in picked:
            picked.append(w)
    return sorted(picked)


def pick_val(classes: list[str], count: int) -> list[str]:
    """`count` official validation file names whose ground truth is one of `classes`, spread evenly."""
    per_class: dict[str, list[str]] = {w: [] for w in classes}
    for name, wnid in facts.val_labels().items():
        if wnid in per_class:
            per_class[wnid].append(name)
    names = [per_class[w][j] for j in range(facts.VAL_PER_CLASS) for w in classes]
    return sorted(names[:count])


def make_dataset(classes: list[str], per_class: int, val: int, test: int, bad_files: bool, workers: int | None = None,
                 drawn: bool = False):
    """-> train {wnid: [(name, bytes)]}, val [(name, bytes)], test [(name, bytes)].
    drawn: images of warmstart.synthetic's shape classes (class i <- shape i) instead of one photo per class."""
    if drawn and len(classes) > len(synthetic.NAMES):
        raise ValueError(f"drawn: at most {len(synthetic.NAMES)} classes (one per shape)")
    val_names = pick_val(classes, val)
    labels = facts.val_labels()
    n_val = {w: 0 for w in classes}
    for name in val_names:
        n_val[labels[name]] += 1
    extra = [test // len(classes) + (i < test % len(classes)) for i in range(len(classes))]  # test images per class
    counts = [per_class + n_val[w] + extra[i] for i, w in enumerate(classes)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        if drawn:
            images = dict(zip(classes, pool.map(drawn_images, range(len(classes)), counts)))
        else:
            images = dict(zip(classes, pool.map(class_images, classes, counts, chunksize=8)))
    train = {w: [(f"{w}_{k + 1}.JPEG", images[w][k]) for k in range(per_class)] for w in classes}
    val_files = []
    for name in val_names:
        w = labels[name]
        val_files.append((name, images[w][per_class + n_val[w] - 1]))
        n_val[w] -= 1
    test_files = [images[w][-1 - j] for i, w in enumerate(classes) for j in range(extra[i])]
    test_files = [(f"ILSVRC2012_test_{i:08d}.JPEG", d) for i, d in enumerate(test_files, 1)]
    if bad_files and per_class:
        if PNG_CLASS in train:
            train[PNG_CLASS][0] = (facts.PNG_FILES[0], reencode(train[PNG_CLASS][0][1], "PNG", "RGB"))
        if CMYK_CLASS in train:
            train[CMYK_CLASS][0] = ("n01739381_1309.JPEG", reencode(train[CMYK_CLASS][0][1], "JPEG", "CMYK"))
        grey = next(w for w in classes if w not in (PNG_CLASS, CMYK_CLASS))
        train[grey][-1] = (train[grey][-1][0], reencode(train[grey][-1][1], "JPEG", "L"))
    return train, val_files, test_files


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def hostile_member(kind: str) -> tuple[tarfile.TarInfo, bytes]:
    """A member a safe extractor must refuse: traversal, absolute, symlink, hardlink or device."""
    data = b"pwned\n"
    info = tarfile.TarInfo({"traversal": "../../evil.JPEG", "absolute": "/tmp/warmstart-evil.JPEG"}.get(kind, "evil.JPEG"))
    info.mtime, info.mode = MTIME, 0o644
    if kind in ("traversal", "absolute"):
        info.size = len(data)
    elif kind in ("symlink", "hardlink"):
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname, data = "/etc/passwd", b""
    elif kind == "device":
        info.type, info.devmajor, info.devminor, data = tarfile.CHRTYPE, 1, 3, b""
    else:
        raise ValueError(f"unknown hostile kind {kind!r}")
    return info, data


def write_tar(path: Path, files: list[tuple[str, bytes]], hostile: str | None = None) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            add_file(tar, name, data)
        if hostile:
            info, data = hostile_member(hostile)
            tar.addfile(info, io.BytesIO(data))


def write_devkit(path: Path, gt_override: dict[str, str] | None = None) -> None:
    """Devkit tar.gz with a real meta.mat (synsets struct array) and the validation ground truth."""
    import scipy.io

    names = facts.synsets()
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = np.zeros((1000, 1), dtype=[(f, "O") for f in fields])
    counts = facts.train_counts()
    for i, wnid in enumerate(facts.devkit_wnids()):
        synsets[i, 0] = (np.array([[i + 1]], np.uint16), np.array([wnid]), np.array([names[wnid]]), np.array([""]),
                         np.array([[0]], np.uint8), np.zeros((1, 0), np.uint8), np.array([[0]], np.uint8),
                         np.array([[counts[wnid]]], np.uint16))
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    devkit_id = {w: i + 1 for i, w in enumerate(facts.devkit_wnids())}
    labels = {**facts.val_labels(), **(gt_override or {})}
    gt = "".join(f"{devkit_id[labels[facts.val_name(i)]]}\n" for i in range(1, facts.VAL_TOTAL + 1)).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_file(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add_file(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


def build_official(out: Path, classes: list[str], per_class: int, val: int, test: int = 0, bad_files: bool = True,
                   devkit: bool = True, hostile: tuple[str, str] | None = None, drawn: bool = False) -> Path:
    """Write the official archives (and MD5SUMS) into `out`. hostile=(where, kind), where in train|inner|val.
    drawn: each class's images drawn by warmstart.synthetic (see make_dataset)."""
    out.mkdir(parents=True, exist_ok=True)
    train, val_files, test_files = make_dataset(classes, per_class, val, test, bad_files, drawn=drawn)
    where, kind = hostile or (None, None)
    with tarfile.open(out / facts.TRAIN_TAR, "w", format=tarfile.GNU_FORMAT) as outer:
        for i, (wnid, files) in enumerate(train.items()):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for name, data in files:
                    add_file(tar, name, data)
                if where == "inner" and i == 0:
                    info, data = hostile_member(kind)
                    tar.addfile(info, io.BytesIO(data))
            add_file(outer, f"{wnid}.tar", inner.getvalue())
        if where == "train":
            info, data = hostile_member(kind)
            outer.addfile(info, io.BytesIO(data))
    write_tar(out / facts.VAL_TAR, val_files, kind if where == "val" else None)
    if test_files:
        write_tar(out / facts.TEST_TARS[0], test_files)
    if devkit:
        write_devkit(out / facts.DEVKIT)
    names = [p.name for p in sorted(out.iterdir()) if p.name != "MD5SUMS"]
    (out / "MD5SUMS").write_text("".join(f"{md5sum(out / n)}  {n}\n" for n in names))
    return out


def build_kaggle(out: Path, classes: list[str], per_class: int, val: int, test: int = 0, bad_files: bool = True,
                 zipped: bool = True, drawn: bool = False) -> Path:
    """The Kaggle 'imagenet-object-localization-challenge' layout, as its zip or unzipped."""
    train, val_files, test_files = make_dataset(classes, per_class, val, test, bad_files, drawn=drawn)
    labels = facts.val_labels()
    files = {f"ILSVRC/Data/CLS-LOC/train/{w}/{name}": data for w, fs in train.items() for name, data in fs}
    files |= {f"ILSVRC/Data/CLS-LOC/val/{name}": data for name, data in val_files}
    files |= {f"ILSVRC/Data/CLS-LOC/test/{name}": data for name, data in test_files}
    files["LOC_synset_mapping.txt"] = "".join(f"{w} {n}\n" for w, n in facts.synsets().items()).encode()
    rows = "".join(f"{name[:-5]},{labels[name]} 10 20 200 180 \n" for name, _ in val_files)
    files["LOC_val_solution.csv"] = ("ImageId,PredictionString\n" + rows).encode()
    out.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(out / facts.KAGGLE_ZIP, "w", zipfile.ZIP_STORED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write the archives into")
    p.add_argument("--classes", type=int, default=10, help="number of classes (at most 1000)")
    p.add_argument("--per-class", type=int, default=3, help="train images per class")
    p.add_argument("--val", type=int, default=20, help="validation images in total (at most 50 per class)")
    p.add_argument("--test", type=int, default=0, help="test images (0: no test tar)")
    p.add_argument("--kaggle", action="store_true", help="write the Kaggle layout instead of the official tars")
    p.add_argument("--unzipped", action="store_true", help="with --kaggle: the unzipped folder instead of the zip")
    p.add_argument("--no-bad-files", action="store_true", help="skip the PNG, CMYK and greyscale files")
    p.add_argument("--drawn", action="store_true",
                   help=f"draw every image independently with warmstart.synthetic: class i is shape i "
                        f"(at most {len(synthetic.NAMES)} classes), instead of variations of one photo per class")
    args = p.parse_args(argv)
    if args.drawn and args.classes > len(synthetic.NAMES):
        p.error(f"--drawn: at most {len(synthetic.NAMES)} classes")
    bad = not args.no_bad_files
    classes = pick_classes(args.classes, (PNG_CLASS, CMYK_CLASS) if bad else ())
    if args.kaggle:
        build_kaggle(args.out, classes, args.per_class, args.val, args.test, bad, zipped=not args.unzipped,
                     drawn=args.drawn)
    else:
        build_official(args.out, classes, args.per_class, args.val, args.test, bad, drawn=args.drawn)
    print(f"wrote {len(classes)} classes x {args.per_class} train, {args.val} val, {args.test} test images to {args.out}")
    if args.drawn:
        print("drawn classes: " + ", ".join(f"{w}={name}" for w, name in drawn_names(classes).items()))


if __name__ == "__main__":
    main()
