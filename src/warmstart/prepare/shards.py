"""`warmstart prepare --shards OUT`: the archives (one pass, no class folders written) or any dataset folder ->
train and val shards in LitData's format (data/shard_format.py, written by data/shard_writer.py), checked like
the folders are.

Samples are written in the order they are read (val first, then train class by class, as the archives hold
them); training order comes from warmstart's own global permutation, so that order is not the training order.
Interrupted, it starts over (a LitData chunk writer cannot resume): OUT/.partial is removed first.
"""

import argparse
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from warmstart import fileio
from warmstart.data import verified
from warmstart.data.shard_format import META, SPLITS
from warmstart.data.shard_writer import SplitWriter, write_meta
from warmstart.errors import UserError
from warmstart.prepare import facts, images, layouts, stores, verify

BATCH = 64  # images per resize task


def prepared(data: bytes, resize: int | None, quality: int) -> bytes | None:
    """The bytes a shard stores: as read for an RGB/greyscale JPEG (re-encoded when resizing), other formats repaired
    to RGB JPEG; None for what cannot be decoded."""
    if resize:
        return images.resized_bytes(data, resize, quality)
    return bytes(data) if images.is_ok(images.kind(data)) else images.repair(data)


class Packer:
    """The open split writers of one run, the repairs and the undecodable files; resizing on worker processes."""

    def __init__(self, tmp: Path, args: argparse.Namespace):
        self.tmp, self.resize, self.quality, self.chunk_bytes = tmp, args.resize_short, args.quality, args.chunk_bytes
        self.writers: dict[str, SplitWriter] = {}
        self.repairs, self.unreadable = [], []
        self.names: set[int] = set()  # hashes of split/class/name: a second sample of one name is an error
        self.procs = ProcessPoolExecutor(args.workers) if self.resize and args.workers > 1 else None

    def add(self, split: str, items: list[tuple[str, str, bytes]]) -> None:
        """items: (file name, class name, bytes as read), written in this order."""
        if split not in self.writers:
            self.writers[split] = SplitWriter(self.tmp / split, self.chunk_bytes)
        datas = [d for _, _, d in items]
        if self.procs:
            out = list(self.procs.map(prepared, datas, [self.resize] * len(datas), [self.quality] * len(datas),
                                      chunksize=BATCH))
        else:
            out = [prepared(d, self.resize, self.quality) for d in datas]
        for (name, cls, data), result in zip(items, out):
            where = f"{split}/{cls}/{name}"
            if hash(where) in self.names:  # as class folders would: one file, not two samples a count takes for two
                raise UserError(f"{where} is given twice (two samples or files share the name); the source is not "
                                "ImageNet as published")
            self.names.add(hash(where))
            if result is None:
                self.unreadable.append(where)
                continue
            if not self.resize and result is not data and not images.is_ok(images.kind(data)):
                self.repairs.append({"file": where, "was": images.kind(data)})
            self.writers[split].add(name, result, cls)

    def close(self) -> dict:
        if self.procs:
            self.procs.shutdown()
        return {s: w.close() for s, w in self.writers.items()}


def bar(total: int, desc: str, unit: str = "B") -> tqdm:
    return tqdm(total=total, desc=f"{desc:>5}", unit=unit, unit_scale=True, disable=None, dynamic_ncols=True,
                file=sys.stderr)


def start(out: Path) -> Path:
    if (out / META).is_file():
        raise UserError(f"{out} already holds shards ({META} exists); delete it to write them again")
    if out.exists() and not out.is_dir():
        raise UserError(f"--shards {out} is a file; name a new folder")
    if out.exists() and any(p.name != ".partial" for p in out.iterdir()):
        raise UserError(f"--shards {out} is not empty; name a new folder")
    tmp = out / ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish(out: Path, tmp: Path, splits: dict, **meta) -> dict:
    """Move the finished splits into place, then write warmstart.json (last: its presence means complete)."""
    for s in splits:
        (tmp / s).rename(out / s)
    classes = sorted({c for rec in splits.values() for c in rec["classes"]})
    names = facts.synsets()
    human = [names.get(c, c) for c in classes] if any(c in names for c in classes) else None
    doc = write_meta(out, classes=classes, human=human, splits=splits, **meta)
    shutil.rmtree(tmp, ignore_errors=True)
    return doc


def report(out: Path, doc: dict, seconds: float) -> None:
    for s, rec in doc["splits"].items():
        print(f"{s:>5}: {rec['images']:,} images of {len(rec['classes'])} classes in {len(rec['chunks'])} chunk(s), "
              f"{fileio.human(sum(c['bytes'] for c in rec['chunks']))}")
    for r in doc["repairs"] if "repairs" in doc else []:
        print(f"repaired {r['file']} (was {r['was']})")
    missing = [n[len("missing: "):] for n in doc["notes"] if n.startswith("missing: ")]
    for n in doc["notes"]:
        if not n.startswith("missing: "):
            print(n)
    if missing:
        print("partial: " + "; ".join(missing))
    if not doc["verified"]:
        print("unverified: " + "; ".join(doc["unverified_reasons"]))
    print(f"wrote shards {out} in {seconds:.1f}s (train or evaluate with --data {out})")


def from_archives(args: argparse.Namespace, out: Path) -> int:
    src = layouts.find(args.archives)
    splits = [s for s in ("val", "train") if s in src.splits()]
    if not splits:
        raise UserError(f"{src.where} holds no train or val files")
    tmp, t0 = start(out), time.perf_counter()
    packer, notes, checksums = Packer(tmp, args), [], []
    sums = verify.md5sums(src.read(src.md5sums).decode(errors="replace"), src.location(src.md5sums)) if src.md5sums else {}
    try:
        for split in splits:
            for part in src.parts[split]:
                progress = bar(part.size, part.name.rsplit("/", 1)[-1])
                part.open()
                try:
                    for _, files in part.files(set()):
                        packer.add(split, [(rel.rsplit("/", 1)[1], rel.split("/")[1], data) for rel, data in files])
                        progress.update(part.consumed - progress.n)
                    part.checksum()  # the rest read and hashed before the part is closed
                except stores.Restart as e:  # what a chunk already holds cannot be taken back; class folders can
                    raise UserError(f"{str(e).split('; restarting')[0]}: --shards cannot start one file over; run the command again, or prepare "
                                    "class folders with --out (they restart a file) and shard those with "
                                    "--from-folder") from None
                finally:
                    part.close()
                    progress.close()
                checksums.append(verify.part_record(part, sums, args.partial, notes))
        if src.devkit:
            name = src.devkit[1].name
            md5, labels = verify.devkit_labels(name, src.read(src.devkit))
            checksums.append(verify.check_md5(name, src.devkit[1].size or 0, md5, sums, args.partial, notes))
            verify.cross_check(name, labels, facts.val_labels())
        written = packer.close()
        notes += verify.unpublished_note(checksums)
    finally:
        if packer.procs:
            packer.procs.shutdown(cancel_futures=True)
    missing, wrong = verify.count_problems({s: r["classes"] for s, r in written.items()}, packer.unreadable)
    if wrong or (missing and not args.partial):
        for line in wrong + missing:
            print(f"  {line}", file=sys.stderr)
        raise UserError("the archives do not hold ILSVRC2012 as published (see above); "
                        + ("download the damaged archive again" if wrong else "give all archives, or --partial to accept a subset"))
    options = {"layout": src.layout, "archives": src.where, "resize_short": args.resize_short,
               "quality": args.quality if args.resize_short else None, "chunk_bytes": args.chunk_bytes,
               "partial": args.partial}
    doc = finish(out, tmp, written, options=options,
                 unverified=verified.unverified_reasons(checksums) + verified.unhashed_reasons(checksums),
                 notes=notes + [f"missing: {m}" for m in missing], checksums=checksums)
    report(out, {**doc, "repairs": packer.repairs}, time.perf_counter() - t0)
    return 0


def from_folder(args: argparse.Namespace, out: Path) -> int:
    """A dataset folder (DIR/train + DIR/val, as prepare writes or any ImageFolder pair), or one class-folder tree
    (written as train alone)."""
    from warmstart.data.folder import index_folder

    root = args.from_folder.expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"--from-folder {root} is not a folder")
    if out == root or root in out.parents:
        raise UserError(f"--shards {out} must be outside --from-folder {root}")
    parts = {s: root / s for s in SPLITS if (root / s).is_dir()} or {"train": root}
    classes, samples = None, {}
    for s, d in parts.items():
        found, samples[s] = index_folder(d, classes)
        classes = classes or found
    tmp, t0 = start(out), time.perf_counter()
    packer = Packer(tmp, args)
    try:
        for s, items in samples.items():
            progress = bar(len(items), s, unit="img")
            for i in range(0, len(items), 256):
                part = items[i:i + 256]
                packer.add(s, [(Path(p).name, classes[y], (parts[s] / p).read_bytes()) for p, y in part])
                progress.update(len(part))
            progress.close()
        written = packer.close()
    finally:
        if packer.procs:
            packer.procs.shutdown(cancel_futures=True)
    for s, items in samples.items():  # what was read is what was written, image for image
        if written[s]["images"] + sum(u.startswith(f"{s}/") for u in packer.unreadable) != len(items):
            raise UserError(f"{s}: {written[s]['images']} images written of {len(items)} read; write the shards again")
    reason = verified.folder_reason(root)  # shards of unverified data are unverified too
    options = {"from_folder": str(root), "resize_short": args.resize_short,
               "quality": args.quality if args.resize_short else None, "chunk_bytes": args.chunk_bytes}
    unverified = ([f"made from {root}: {reason}"] if reason else []) + images.rejected_reason(packer.unreadable)
    doc = finish(out, tmp, written, options=options, unverified=unverified,
                 notes=[f"not decodable, skipped: {f}" for f in packer.unreadable])
    report(out, {**doc, "repairs": packer.repairs}, time.perf_counter() - t0)
    return 0
