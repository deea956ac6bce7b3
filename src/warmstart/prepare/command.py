"""`warmstart prepare`: the CLI stage. Reads each archive once, writes verified class folders."""

import argparse
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from warmstart import fileio
from warmstart.data import decode, verified
from warmstart.data.folder import image_files
from warmstart.data.shard_store import parse_size
from warmstart.data.shard_writer import DEFAULT_CHUNK_BYTES
from warmstart.errors import UserError
from warmstart.options import in_range
from warmstart.prepare import facts, images, layouts, manifest, stores, verify
from warmstart.prepare import shards as pack
from warmstart.prepare.extract import Output

HELP = "ImageNet downloads (official, Kaggle, Hugging Face, WebDataset; local or a URL) -> verified class folders"
DESCRIPTION = """\
Turn the ILSVRC2012 downloads into ImageFolder trees, reading each file once:

  warmstart prepare --archives ~/Downloads/ilsvrc --out /data/imagenet
  warmstart prepare --archives hf://datasets/ILSVRC/imagenet-1k --out /data/imagenet
  warmstart prepare --archives https://host/ILSVRC2012_img_train.tar https://host/ILSVRC2012_img_val.tar --out ...

--archives is one or more local folders or files, http(s) URLs or hf://datasets/OWNER/NAME[@REVISION]
(HF_TOKEN or `huggingface-cli login`; HF_ENDPOINT honoured). A folder URL (ending in /) cannot be
listed: the official and Hugging Face tar names are looked for there; give other files by their
URLs. Any of these layouts: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, optionally
ILSVRC2012_img_test[_v10102019].tar and ILSVRC2012_devkit_t12.tar.gz (and optionally MD5SUMS,
checked in addition to the official MD5s, never instead of them); Kaggle's
imagenet-object-localization-challenge.zip, or that zip unzipped (ILSVRC/Data/CLS-LOC/...,
LOC_val_solution.csv; local only); Hugging Face's ILSVRC/imagenet-1k files
(data/{train_images_K,val_images,test_images}.tar.gz, or data/{train,validation,test}-*.parquet,
with the data/ folder or without); WebDataset shards imagenet1k-{train,validation}-NNNN.tar
(timm/imagenet-1k-wds). Each split comes from one layout; several may be mixed. URLs are streamed
(no archive copy on disk); a dropped connection resumes with Range; with --out, a rerun fetches
nothing it finished (--shards starts over).

Output:
  OUT/train/<wnid>/<wnid>_<n>.JPEG    1,281,167 images, 1,000 classes
  OUT/val/<wnid>/ILSVRC2012_val_*.JPEG  50,000 images, sorted by the shipped ground truth
  OUT/test/ILSVRC2012_test_*.JPEG     if the test tar is given
  OUT/synsets.txt                     wnid and names, one line per class, in class-index order
  OUT/shortN/{train,val,test}/...     with --resize-short N: a pre-resized copy, itself a
                                      dataset folder (train with --data OUT/shortN)
  OUT/prepared.json                   counts, checksums, repairs, options, "verified"; written
                                      last, so its presence means the folder is complete

Checks MD5s while streaming (an archive that differs from its official MD5 is an error;
--partial accepts it and prepared.json then says "verified": false, with the reasons),
counts per class, repairs the PNG and CMYK files (and any other file that is not an RGB or
greyscale JPEG) as RGB JPEGs, refuses unsafe archive members. Interrupted, or out of disk
space? Run the same command again: finished classes are kept.

  warmstart prepare --from-folder /data/imagenet --resize-short 160 --out /data/imagenet160

resizes any ImageFolder tree (mirrored as-is) instead.

  warmstart prepare --archives ~/Downloads/ilsvrc --shards /data/imagenet-shards
  warmstart prepare --from-folder /data/imagenet --shards /data/imagenet-shards [--resize-short 256]

writes train and val as shards instead (LitData's format: a few 64 MB chunk files per split plus
warmstart.json with classes, counts and every chunk's SHA-256), for shared file systems and object
storage: copy the folder to s3://bucket/prefix and train with --data s3://bucket/prefix.
"""

def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--archives", nargs="+", action="extend", metavar="WHERE", help="where the download is: a folder (the official "
                     "archives, Kaggle's zip or folder, Hugging Face's data/ files, WebDataset shards), an http(s):// "
                     "folder or file URL, or hf://datasets/ILSVRC/imagenet-1k[@REV] or hf://datasets/timm/imagenet-1k-wds; "
                     "several may be given (e.g. train from one, val from another)")
    src.add_argument("--from-folder", type=Path, metavar="DIR", help="an ImageFolder tree to resize (--resize-short) or "
                     "to write as shards (--shards)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", type=Path, metavar="DIR", help="output folder (created; nothing is written outside it)")
    dest.add_argument("--shards", type=Path, metavar="DIR", help="write train and val shards (LitData's format, for "
                      "shared file systems and s3://) to DIR instead of class folders")
    p.add_argument("--chunk-bytes", default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help=f"with --shards: the size of each chunk file (default: {DEFAULT_CHUNK_BYTES})")
    p.add_argument("--partial", action="store_true", help="accept a subset (partial download, mini archives) and report what is missing; also accept "
                   "archives that differ from the official MD5s, marking the data unverified in prepared.json")
    p.add_argument("--workers", type=in_range(int, 1, 1024), default=os.cpu_count(), help="threads for checks/repairs/writes and processes for resizing (default: all cores)")
    p.add_argument("--resize-short", type=in_range(int, 8, 1_000_000), metavar="N", help="also write a copy with the shorter side resized to N (aspect kept, never upscaled) to OUT/shortN")
    p.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality of the resized copy (default: 90)")
    p.add_argument("--resized-only", action="store_true", help="with --resize-short: write only OUT/shortN, not the full-size folders")


def run(args: argparse.Namespace) -> int:
    decode.set_max_pixels(None)  # the default budget, as prepare's worker processes (which never set it) have it
    if args.resize_short is not None and args.resize_short < 1 or not 1 <= args.quality <= 100:
        raise UserError("--resize-short must be a positive size and --quality between 1 and 100")
    if args.resized_only and not args.resize_short:
        raise UserError("--resized-only needs --resize-short N")
    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.shards:
        if args.resized_only:
            raise UserError("--resized-only is for class folders; with --shards, --resize-short N alone writes "
                            "resized shards")
        parse_size(args.chunk_bytes, "--chunk-bytes")
        out = args.shards.expanduser().resolve()
        return (pack.from_folder if args.from_folder else pack.from_archives)(args, out)
    out = args.out.expanduser().resolve()
    if (out / "prepared.json").is_file():
        shutil.rmtree(out / ".partial", ignore_errors=True)
        print(f"{out} is already prepared (prepared.json exists); delete it to prepare again")
        return 0
    try:
        return from_folder(args, out) if args.from_folder else from_archives(args, out)
    except OSError as e:  # image writes report a full disk themselves; this catches the journal, folders and the rest
        images.raise_if_full(e, e.filename or out)
        raise


def check_space(out: Path, need: float) -> None:
    free = shutil.disk_usage(out).free
    if need * 1.02 > free:
        raise UserError(f"{out} has {free / 1e9:.1f} GB free but this needs about {need / 1e9:.1f} GB more; "
                        "free some space or choose another --out")


def progress(split: str, total: int) -> tqdm:
    return tqdm(total=total, desc=f"{split:>5}", unit="B", unit_scale=True, unit_divisor=1024, disable=None,
                dynamic_ncols=True, file=sys.stderr)


def from_archives(args: argparse.Namespace, out: Path) -> int:
    src = layouts.find(args.archives)
    n, resized = args.resize_short, f"short{args.resize_short}" if args.resize_short else None
    options = {"layout": src.layout, "resize_short": n, "quality": args.quality if n else None,
               "resized_only": args.resized_only}
    out.mkdir(parents=True, exist_ok=True)
    output = Output(out, options, args.workers, None if args.resized_only else "", resized, n, args.quality)
    timing = Timing()
    try:
        done_bytes = sum(r["bytes"] + r["resized_bytes"] for r in output.done.values())
        todo = sum(p.size for s in src.splits() for p in src.parts[s] if p.key not in output.done)
        factor = min(1.0, (n / 350) ** 2) if n else 0.0  # resized/full size; ImageNet's shorter side averages ~350
        check_space(out, todo * ((0 if args.resized_only else 1) + factor) - done_bytes)
        notes: list[str] = []
        checksums = [r["checksum"] for r in output.done.values() if r.get("checksum")]
        seconds = extract(args, src, output, notes, checksums, timing)
        doc, tally = write_manifest(args, out, src, options, resized, output, checksums, notes)
        output.finish()
    finally:
        output.close()
    print(manifest.table(tally, seconds, resized))
    for line in [f"repaired {r['file']} (was {r['was']})" for r in doc["repairs"]] + notes:
        print(line)
    if doc["missing"]:
        print("partial: " + "; ".join(doc["missing"]))
    if not doc["verified"]:
        print("unverified: " + "; ".join(doc["unverified_reasons"]))
    if timing.wall:
        print(timing.summary(output.write_seconds, args.workers))
    print(f"prepared {out}" + (f" (resized copy: {out / resized})" if resized else ""))
    return 0


def extract(args: argparse.Namespace, src: layouts.Source, output: Output, notes: list[str], checksums: list[dict],
            timing: "Timing") -> dict[str, float]:
    """Each part not done yet streamed to the writers and committed once its checksum is checked (the devkit's too,
    before the first part commits); appends to notes and checksums; -> seconds per split."""
    sums = verify.md5sums(src.read(src.md5sums).decode(errors="replace"), src.location(src.md5sums)) if src.md5sums else {}
    for line in src.ignored:
        print(line)
    notes += src.ignored
    devkit = None
    if src.devkit and "devkit" not in output.done:  # checked on a thread while val streams; before val commits
        devkit = ThreadPoolExecutor(1).submit(lambda: verify.devkit_labels(src.devkit[1].name, src.read(src.devkit)))
    elif src.kaggle and (text := src.kaggle.text("LOC_val_solution.csv")):
        labels = verify.kaggle_labels(text)
        verify.cross_check("LOC_val_solution.csv", labels, labels)
    seconds: dict[str, float] = {}
    todo = [p for s in src.splits() for p in src.parts[s] if p.key not in output.done]
    earlier = {p.split for s in src.splits() for p in src.parts[s] if p.key in output.done}
    try:
        for part, after in zip(todo, todo[1:] + [None]):
            t0 = time.perf_counter()
            stage = "" if not part.staged else "@" + part.name.replace("/", "@")
            futures, record = read_part(args, part, output, stage, sums, notes, timing, after)
            if devkit:
                checksums.append(devkit_record(args, src, devkit.result(), sums, output, notes))
                devkit = None
            output.commit(part.key, [part.split] if part.split != "train" and not part.staged else [], futures, stage,
                          checksum=record)
            output.settle(block=True)
            checksums.append(record)
            seconds[part.split] = seconds.get(part.split, 0.0) + time.perf_counter() - t0
    finally:
        for part in todo:  # a part opened ahead of its turn, when this one failed
            part.close()
    return {s: t for s, t in seconds.items() if s not in earlier}  # rates of a split read in part earlier would lie


RESTARTS = 3  # times a part starts over when a server cannot resume it (ignores Range, the file changed)


def read_part(args: argparse.Namespace, part: layouts.Part, output: Output, stage: str, sums: dict, notes: list[str],
              timing: "Timing", after: layouts.Part | None = None) -> tuple[list, dict]:
    """Stream one part to the writers, starting it over when its server cannot resume it; -> (its writes, its
    checksum record). Once its bytes are read, the next part (`after`) starts downloading, so the link does not idle
    while this one's writes finish. A checksum mismatch (without --partial) discards what the part wrote."""
    for attempt in range(RESTARTS + 1):
        offset, was = resume_offset(part, output) if attempt == 0 else (0, None)  # refused Range: from the start
        show = PartProgress(part, offset)
        if part.reader is None or attempt:
            part.open(offset, on_resume=show.resumed)
        part.on_resume = show.resumed
        if offset and version(part) != was:  # the file changed since the killed run: its classes are not this file's
            show.line(f"{part.name} changed since the last run (version {was} became {version(part)}); preparing "
                      "its classes again")
            part.close()
            show.close(False)
            output.discard("train")
            offset, show = 0, PartProgress(part, 0)
            part.open(0, on_resume=show.resumed)
        futures: list = []  # filled as the part streams, so a restart can wait for what it wrote
        finished = False
        try:
            stream(part, output, stage, show, timing, futures)
            part.checksum()  # the rest of the file read and hashed while its stream is still open
            if after is not None and after.reader is None and not isinstance(after, (layouts.OfficialTrain, layouts.Kaggle)):
                after.open(0)  # its bytes flow while this part's writes end; its own offset is always 0
            output.settle(block=True)
            finished = True
            break
        except stores.Restart as e:
            if attempt == RESTARTS:
                raise UserError(f"{part.name}: started over {RESTARTS} times, and the last try failed too ({e}); run "
                                "the command again later") from None
            show.line(f"{e}; starting {part.name} over ({attempt + 1} of {RESTARTS})")
            if isinstance(part, (layouts.OfficialTrain, layouts.Kaggle)) and part.split == "train":
                output.settle(block=True)  # its whole classes stay committed; the rest is read again
            else:
                output.drop(futures, [part.split], stage)
        finally:
            part.close()
            show.close(finished)
    try:
        return futures, verify.part_record(part, sums, args.partial, notes)
    except UserError as e:
        if part.staged:
            output.drop(futures, [], stage)
        else:
            output.discard(part.split)
        if part.split == "train" and not part.staged:  # its classes were moved into place as they finished
            raise UserError(f"{e}; the class folders already extracted from it were removed") from None
        raise


def resume_offset(part: layouts.Part, output: Output) -> tuple[int, list | None]:
    """Where a rerun starts the official train tar over HTTP: after the last class a killed run finished (classes
    commit in archive order), and the file version ([ETag, size]) that run read. Its MD5 is then never computed, and
    prepared.json says so. Local files are read whole."""
    if not isinstance(part, layouts.OfficialTrain) or not part.store.remote:
        return 0, None
    done = [r for k, r in output.done.items() if k.startswith("train/n")]
    if not done or not all(type(r.get("end")) is int and isinstance(r.get("version"), list) for r in done):
        return 0, None
    last = max(done, key=lambda r: r["end"])
    return last["end"], last["version"]


def version(part: layouts.Part) -> list | None:
    """[ETag, size] of the file a remote part streams (what a later resume must find again), else None."""
    v = getattr(part.stream, "version", None)
    return [v[0], v[2]] if v and v[0] else None


def devkit_record(args: argparse.Namespace, src: layouts.Source, result: tuple, sums: dict, output: Output,
                  notes: list[str]) -> dict:
    """The devkit's checksum record, its val labels cross-checked with the shipped ones, committed."""
    md5, labels = result
    name = src.devkit[1].name
    record = verify.check_md5(name, src.devkit[1].size or 0, md5, sums, args.partial, notes)
    verify.cross_check(name, labels, facts.val_labels())
    output.commit("devkit", [], [], checksum=record)
    return record


def write_manifest(args: argparse.Namespace, out: Path, src: layouts.Source, options: dict, resized: str | None,
                   output: Output, checksums: list[dict], notes: list[str]) -> tuple[dict, dict]:
    """Check the counts, then write synsets.txt and prepared.json (the top-level one last of all); -> (the manifest,
    the per-split tally)."""
    unverified = verified.unverified_reasons(checksums)
    if unverified and not args.partial:  # accepted by an earlier run with --partial, whose units this run kept
        raise UserError(f"an earlier run with --partial accepted {'; '.join(unverified)}; give --partial again "
                        f"to finish with the data marked unverified, or delete {out} and start over")
    records = list(output.done.values())
    tally = manifest.tally(records)
    unreadable = [f for r in records for f in r["unreadable"]]
    missing, wrong = verify.count_problems({s: v["classes"] for s, v in tally.items()}, unreadable)
    wrong += verify.on_disk(out / (resized if args.resized_only else ""), tally)
    if wrong or (missing and not args.partial):
        for line in wrong + missing:
            print(f"  {line}", file=sys.stderr)
        raise UserError("the archives do not hold ILSVRC2012 as published (see above); "
                        + ("download the damaged archive again" if wrong else "give all archives, or --partial to accept a subset"))
    classes = sorted(set(tally.get("train", {}).get("classes", {})) | set(tally.get("val", {}).get("classes", {})))
    notes += verify.unpublished_note(checksums)
    doc = manifest.manifest({**options, "partial": args.partial, "archives": src.where}, tally, checksums,
                            missing, notes, verified.unhashed_reasons(checksums))
    for root in ([out / resized] if resized else []) + [out]:
        manifest.write_synsets(root, classes)
        manifest.write_json(root / "prepared.json", doc)
    return doc, tally


def stream(part: layouts.Part, output: Output, stage: str, show: "PartProgress", timing: "Timing",
           futures: list) -> None:
    """Feed one part to the writers: a train class of the official tar or Kaggle commits on its own; other files
    join the part's stage, their writes appended to `futures` (what the part's own commit waits for)."""
    done = {k.split("/")[1] for k in output.done if k.startswith("train/n")}
    t0 = time.perf_counter()
    try:
        for unit, files in part.files(done):
            if files:
                t = time.perf_counter()
                # a file no checksum will vouch for (read from an offset) is decoded whole instead
                future = output.submit(files, sum(len(d) for _, d in files), "" if unit else stage,
                                       decode=part.algorithm is not None and part.offset > 0)
                timing.submit += time.perf_counter() - t
                if unit:
                    end = getattr(part, "ends", {}).get(unit.split("/")[1])
                    where = {"end": end, "version": version(part)} if end is not None and version(part) else {}
                    output.commit(unit, [unit], [future], **where)
                else:
                    futures.append(future)
                show.images += len(files)
    finally:
        timing.add(part, time.perf_counter() - t0)


class PartProgress:
    """A part's progress: a tqdm bar on a terminal (bytes, MB/s, ETA, images; refreshed by a thread twice a second,
    so a file parsed only once whole, parquet, moves too), else a plain line a minute and one at the end, for logs;
    resumes are said either way."""

    EVERY = 60.0

    def __init__(self, part: layouts.Part, offset: int):
        self.part, self.images, self.t0, self.last = part, 0, time.perf_counter(), time.perf_counter()
        self.bar = progress(part.name.rsplit("/", 1)[-1], part.size or None)
        self.bar.update(offset)
        self.offset, self.plain = offset, self.bar.disable
        self.stop = threading.Event()
        threading.Thread(target=self._refresh, daemon=True).start()

    def _refresh(self) -> None:
        while not self.stop.wait(0.5):
            self.update()

    def update(self) -> None:
        if self.plain:
            if time.perf_counter() - self.last > self.EVERY:
                self.last = time.perf_counter()
                self.line(self.status())
            return
        self.bar.update(self.part.consumed - self.bar.n)
        self.bar.set_postfix_str(f"{self.images:,} images", refresh=False)

    def status(self) -> str:
        t, got = time.perf_counter() - self.t0, self.part.consumed - self.offset
        size = f" of {fileio.human(self.part.size)}" if self.part.size else ""
        return (f"{self.part.name}: {fileio.human(self.part.consumed)}{size} in {t:.0f} s "
                f"({got / max(t, 1e-9) / 1e6:.1f} MB/s), {self.images:,} images")

    def resumed(self, line: str) -> None:
        self.line(line)

    def line(self, text: str) -> None:
        if self.plain:
            print(text, flush=True)  # a log: the command's own output, one line each
        else:
            tqdm.write(text, file=sys.stderr)

    def close(self, finished: bool) -> None:
        self.stop.set()
        if not self.plain:
            self.update()
        self.bar.close()
        if self.plain and finished:
            self.line(self.status())


class Timing:
    """Where the reading time went, over all parts: waiting for bytes (the network or the disk), parsing archives,
    waiting for the writers (their queue full)."""

    def __init__(self):
        self.wall = self.waited = self.network = self.submit = 0.0

    def add(self, part: layouts.Part, seconds: float) -> None:
        self.wall += seconds
        self.waited += part.reader.waited if part.reader else 0.0
        self.network += getattr(part.stream, "network_seconds", 0.0) or 0.0

    def summary(self, write_seconds: float, workers: int) -> str:
        parse = max(0.0, self.wall - self.waited - self.submit)
        return (f"time: {self.wall:.1f} s reading; waiting for bytes {self.waited:.1f} s (network {self.network:.1f} s), "
                f"parsing {parse:.1f} s, waiting for the writers {self.submit:.1f} s; writing took {write_seconds:.1f} s "
                f"over {workers} thread{'s' if workers > 1 else ''}")


def output_names(files: list[str]) -> list[str]:
    """The JPEG name of each image file of one folder (sorted). JPEGs keep theirs; another image becomes STEM.JPEG,
    or NAME.JPEG (a.png.JPEG) where STEM.JPEG is taken (a.gif next to a.png or a.JPEG): no two files share an output."""
    jpeg = [os.path.splitext(f)[1].lower() in (".jpg", ".jpeg") for f in files]
    taken = {f.lower() for f, j in zip(files, jpeg) if j}  # lower: the output may be on a case-insensitive disk
    names = []
    for f, j in zip(files, jpeg):
        name, n = f if j else os.path.splitext(f)[0] + ".JPEG", 1
        while not j and name.lower() in taken:
            n += 1
            name = f"{f}.JPEG" if n == 2 else f"{f}.{n}.JPEG"
        taken.add(name.lower())
        names.append(name)
    return names


def folder_units(src: Path) -> dict[str, list[tuple[str, str]]]:
    """{folder under src ("." for src itself): [(output path under OUT, input path)]}: every image file that training
    would read (hidden ones skipped), named by output_names folder by folder."""
    by_folder: dict[str, list[Path]] = {}
    for p in image_files(src):
        by_folder.setdefault(p.parent.relative_to(src).as_posix(), []).append(p)
    units = {}
    for rel, paths in by_folder.items():
        names = output_names([p.name for p in paths])
        units[rel] = [(name if rel == "." else f"{rel}/{name}", str(p)) for p, name in zip(paths, names)]
    return units


def from_folder(args: argparse.Namespace, out: Path) -> int:
    src = args.from_folder.expanduser().resolve()
    if not args.resize_short:
        raise UserError("--from-folder makes a resized copy; give --resize-short N (e.g. 160), or --shards DIR")
    if not src.is_dir():
        raise UserError(f"--from-folder {src} is not a folder")
    if out == src or src in out.parents or out in src.parents:
        raise UserError(f"--out {out} must be outside --from-folder {src} (and not contain it)")
    units = folder_units(src)
    if not units:
        raise UserError(f"--from-folder {src} holds no images")
    options = {"from_folder": str(src), "resize_short": args.resize_short, "quality": args.quality}
    out.mkdir(parents=True, exist_ok=True)
    output = Output(out, options, args.workers, None, "", args.resize_short, args.quality)
    try:
        total = sum(os.path.getsize(p) for rel, files in units.items() if rel not in output.done for _, p in files)
        check_space(out, total * min(1.0, (args.resize_short / 350) ** 2))
        t0 = time.perf_counter()
        bar = tqdm(total=sum(len(f) for f in units.values()), desc="resize", unit="img", disable=None, file=sys.stderr)
        for rel, files in units.items():
            if rel in output.done:
                bar.update(len(files))
                continue
            future = output.submit(files, 0)
            future.add_done_callback(lambda f, n=len(files): bar.update(n))
            # a class folder moves into place as one; images at the top of a flat folder move one by one
            output.commit(rel, [rel] if rel != "." else [name for name, _ in files], [future])
        output.settle(block=True)
        bar.close()
        records = list(output.done.values())
        splits = manifest.tally([{**r, "counts": {("." if "/" not in d else d): n for d, n in r["counts"].items()}}
                                 for r in records])
        if (src / "synsets.txt").is_file():
            fileio.atomic_write(out / "synsets.txt", lambda tmp: shutil.copyfile(src / "synsets.txt", tmp))
        unreadable = [f for r in records for f in r["unreadable"]]
        reason = verified.folder_reason(src)  # a copy of unverified data is unverified too
        doc = manifest.manifest({**options, "from_folder": str(src)}, splits, [], [], [f"not decodable, skipped: {f}" for f in unreadable],
                                ([f"resized from {src}, which is unverified: {reason}"] if reason else [])
                                + images.rejected_reason(unreadable))
        manifest.write_json(out / "prepared.json", doc)
        output.finish()
    finally:
        output.close()
    print(manifest.table(splits, {s: time.perf_counter() - t0 for s in splits}, f"short{args.resize_short}"))
    print(f"prepared {out}" + (f"; {len(unreadable)} files rejected, undecodable or over the pixel limit (see "
                               f"prepared.json)" if unreadable else ""))
    return 0
