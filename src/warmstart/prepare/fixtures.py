"""Mini ILSVRC2012 archives in the layouts people download ImageNet in, for tests, the demo and benchmarks.

Official layout: ILSVRC2012_img_train.tar (an outer tar of per-class `<wnid>.tar` holding
`<wnid>_<n>.JPEG`), ILSVRC2012_img_val.tar (flat, official file names, so the shipped ground
truth labels them), ILSVRC2012_devkit_t12.tar.gz (real data/meta.mat and validation ground
truth in devkit class IDs), optionally a test tar, and MD5SUMS. The other layouts (--layout: Kaggle's zip or its
unzipped folder, Hugging Face ILSVRC/imagenet-1k as tars or parquet, timm/imagenet-1k-wds) hold the very same images
with the same bytes, so a tree prepared from any of them equals one prepared from the official tars.

Images come from the real JPEGs in shared/data/imagenet-sample when present (one per class, varied by
crop/flip/re-encode), else they are drawn, so the demo works on a clone without shared data. With --drawn (drawn=True)
every image is drawn on its own by warmstart.synthetic instead: class i of the archive is shape class i (circle,
square, triangle, ...), so a network has something to learn and does not score 100%.

    python -m warmstart.prepare.fixtures --out DIR --classes 10 --per-class 3 --val 20
    python -m warmstart.prepare.fixtures --out DIR --classes 10 --per-class 150 --val 400 --drawn
    python -m warmstart.prepare.fixtures --out DIR --layout hf-parquet
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
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
    """A tar of (name, bytes); gzip-compressed when `path` ends in .gz, with a fixed mtime in the gzip header so the
    same fixture has the same checksum on every run."""
    raw = gzip.GzipFile(path, "wb", mtime=MTIME) if path.name.endswith(".gz") else open(path, "wb")
    with raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
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


def dataset_splits(classes: list[str], per_class: int, val: int, test: int, bad_files: bool, drawn: bool):
    """make_dataset as {split: [(official name, wnid or None for test, bytes)]}. Train is shuffled (seeded by the class
    list) because the HF and wds archives are: a class spans several parts and a reader must gather it."""
    train, val_files, test_files = make_dataset(classes, per_class, val, test, bad_files, drawn=drawn)
    records = [(name, w, data) for w, files in train.items() for name, data in files]
    random.Random(",".join(classes)).shuffle(records)
    labels = facts.val_labels()
    return {"train": records, "validation": [(n, labels[n], d) for n, d in val_files],
            "test": [(n, None, d) for n, d in test_files]}


def hf_name(name: str, wnid: str | None) -> str:
    """The file name in ILSVRC/imagenet-1k: the official stem + _<wnid>; test images keep theirs (no label)."""
    return name if wnid is None else f"{name[:-5]}_{wnid}.JPEG"


def class_label(wnid: str | None) -> int:
    """The class index HF and timm use (position in the sorted wnids); -1 for an unlabelled test image."""
    return -1 if wnid is None else facts.wnids().index(wnid)


def chunks(items: list, n: int) -> list[list]:
    return [items[k * len(items) // n:(k + 1) * len(items) // n] for k in range(n)]


HF_README = "---\nlicense: other\npretty_name: ImageNet\n---\n\n# ILSVRC/imagenet-1k (a warmstart fixture)\n"


def hf_folder(out: Path, data_dir: bool) -> Path:
    folder = out / "data" if data_dir else out
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def hf_download_dir(out: Path, folder: Path, classes: list[str]) -> Path:
    """With data/ under `out`, the rest of what `huggingface-cli download ILSVRC/imagenet-1k --local-dir out` leaves:
    README.md and .cache/huggingface/download/<file>.metadata (with its .lock, .gitignore and CACHEDIR.TAG), written by
    huggingface_hub's own writer so the format is the real one; the etag is the sha256 of an LFS file, the git blob
    hash of README.md. Without data/ the user pointed at the data folder itself, which holds only the archives."""
    if folder == out:
        return out
    from huggingface_hub._local_folder import write_download_metadata

    readme = HF_README.encode()
    (out / "README.md").write_bytes(readme)
    commit = hashlib.sha1(",".join(classes).encode()).hexdigest()  # stands in for the repo revision
    write_download_metadata(out, "README.md", commit, hashlib.sha1(b"blob %d\0" % len(readme) + readme).hexdigest())
    for path in sorted(folder.iterdir()):
        write_download_metadata(out, f"data/{path.name}", commit, file_digest(path, "sha256"))
    return out


def build_hf_tars(out: Path, classes: list[str], per_class: int, val: int, test: int = 0, bad_files: bool = True,
                  drawn: bool = False, parts: int = 5, data_dir: bool = True) -> Path:
    """Hugging Face ILSVRC/imagenet-1k as tars: data/train_images_{0..parts-1}.tar.gz, val_images.tar.gz and (test > 0)
    test_images.tar.gz, each a flat tar of <image id>_<wnid>.JPEG. data_dir=False: the archives directly in `out`."""
    splits = dataset_splits(classes, per_class, val, test, bad_files, drawn)
    tars = {f"train_images_{k}.tar.gz": part for k, part in enumerate(chunks(splits["train"], parts))}
    tars["val_images.tar.gz"] = splits["validation"]
    if splits["test"]:
        tars["test_images.tar.gz"] = splits["test"]
    folder = hf_folder(out, data_dir)
    for name, files in tars.items():
        write_tar(folder / name, [(hf_name(n, w), d) for n, w, d in files])
    return hf_download_dir(out, folder, classes)


def build_hf_parquet(out: Path, classes: list[str], per_class: int, val: int, test: int = 0, bad_files: bool = True,
                     drawn: bool = False, shards: tuple[int, int, int] = (2, 1, 1), data_dir: bool = True,
                     row_group: int = 64) -> Path:
    """ILSVRC/imagenet-1k as the Hub serves it now: data/{train,validation,test}-0000K-of-0000N.parquet (N from
    `shards`, in that split order; test only if test > 0), columns image struct<bytes, path> (path the name in the HF
    tars) and label int64 (sorted-wnid index, -1 for test), with the `huggingface` schema metadata `datasets` writes
    (features Image and ClassLabel). row_group: rows per parquet row group."""
    import pyarrow as pa  # only this layout needs pyarrow: the `parquet` extra
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"names": list(facts.synsets().values()), "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    folder = hf_folder(out, data_dir)
    for (split, files), n in zip(dataset_splits(classes, per_class, val, test, bad_files, drawn).items(), shards):
        for k, part in enumerate(chunks(files, n) if files else []):
            rows = [{"image": {"bytes": d, "path": hf_name(name, w)}, "label": class_label(w)} for name, w, d in part]
            table = pa.Table.from_pylist(rows, schema)
            pq.write_table(table, folder / f"{split}-{k:05d}-of-{n:05d}.parquet", row_group_size=row_group)
    return hf_download_dir(out, folder, classes)


def build_wds(out: Path, classes: list[str], per_class: int, val: int, test: int = 0, bad_files: bool = True,
              drawn: bool = False, train_shards: int = 3, val_shards: int = 2) -> Path:
    """timm/imagenet-1k-wds: imagenet1k-train-{0000..}.tar and imagenet1k-validation-{00..}.tar, each sample KEY.jpg,
    KEY.cls (sorted-wnid index) and KEY.json (filename, label, class_name), KEY the official name less .JPEG, plus the
    _info.json timm's reader takes split sizes from. wds has no test split: `test` only keeps the images identical to
    build_official's with the same arguments (the images drawn depend on the count)."""
    splits = dataset_splits(classes, per_class, val, test, bad_files, drawn)
    out.mkdir(parents=True, exist_ok=True)
    info = {"name": "imagenet1k", "splits": {}}
    for split, n, digits in (("train", train_shards, 4), ("validation", val_shards, 2)):
        parts = chunks(splits[split], n)
        names = [f"imagenet1k-{split}-{k:0{digits}d}.tar" for k in range(n)]
        for name, part in zip(names, parts):
            write_tar(out / name, [m for sample in part for m in wds_sample(*sample)])
        info["splits"][split] = {"name": split, "filenames": names, "shard_lengths": [len(p) for p in parts],
                                 "num_samples": len(splits[split])}
    (out / "_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def wds_sample(name: str, wnid: str, data: bytes) -> list[tuple[str, bytes]]:
    key, label = name[:-5], class_label(wnid)
    meta = {"filename": name, "label": label, "class_name": facts.synsets()[wnid]}
    return [(f"{key}.jpg", data), (f"{key}.cls", str(label).encode()), (f"{key}.json", json.dumps(meta).encode())]


LAYOUTS = {"official": build_official, "kaggle": build_kaggle, "kaggle-unzipped": partial(build_kaggle, zipped=False),
           "hf-tars": build_hf_tars, "hf-parquet": build_hf_parquet, "wds": build_wds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder to write the archives into")
    p.add_argument("--classes", type=int, default=10, help="number of classes (at most 1000)")
    p.add_argument("--per-class", type=int, default=3, help="train images per class")
    p.add_argument("--val", type=int, default=20, help="validation images in total (at most 50 per class)")
    p.add_argument("--test", type=int, default=0, help="test images (0: no test tar)")
    p.add_argument("--layout", choices=list(LAYOUTS), help="the layout to write (default: official)")
    p.add_argument("--kaggle", action="store_true", help="same as --layout kaggle")
    p.add_argument("--unzipped", action="store_true", help="with --kaggle: same as --layout kaggle-unzipped")
    p.add_argument("--no-bad-files", action="store_true", help="skip the PNG, CMYK and greyscale files")
    p.add_argument("--drawn", action="store_true",
                   help=f"draw every image independently with warmstart.synthetic: class i is shape i "
                        f"(at most {len(synthetic.NAMES)} classes), instead of variations of one photo per class")
    args = p.parse_args(argv)
    if args.drawn and args.classes > len(synthetic.NAMES):
        p.error(f"--drawn: at most {len(synthetic.NAMES)} classes")
    bad = not args.no_bad_files
    classes = pick_classes(args.classes, (PNG_CLASS, CMYK_CLASS) if bad else ())
    layout = args.layout or ("kaggle" if args.kaggle else "official")
    if layout == "kaggle" and args.unzipped:
        layout = "kaggle-unzipped"
    LAYOUTS[layout](args.out, classes, args.per_class, args.val, args.test, bad, drawn=args.drawn)
    print(f"wrote {len(classes)} classes x {args.per_class} train, {args.val} val, {args.test} test images "
          f"to {args.out} ({layout} layout)")
    if args.drawn:
        print("drawn classes: " + ", ".join(f"{w}={name}" for w, name in drawn_names(classes).items()))


if __name__ == "__main__":
    main()
