"""Checks against the ILSVRC2012 facts: checksums, the devkit's and Kaggle's labels, counts."""

import csv
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

from warmstart.data import decode
from warmstart.errors import UserError
from warmstart.prepare import facts
from warmstart.prepare.archives import safe_name, tar_error

MD5SUMS_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")  # as `md5sum` writes it: text or binary mode


def md5sums(text: str | None, path: str) -> dict[str, str]:
    """file name -> MD5 from an MD5SUMS file next to the archives ({} without one). It is checked in addition to the
    official MD5s, never instead of them: anyone can write a file that matches the archive they have."""
    if text is None:
        return {}
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = MD5SUMS_LINE.fullmatch(line)
        if not m:
            raise UserError(f"{path} line {n} is not an MD5SUMS line ({line[:60]!r}); each line must be "
                            "`<32 hex digits>  <file name>` as md5sum writes it: fix the line or delete the file")
        sums[m[2]] = m[1].lower()
    return sums


def checksum_record(name: str, size: int, md5: str | None, official: str | None, listed: str | None) -> dict:
    """What was compared with what: the computed MD5 against the official one and against MD5SUMS, each on its own
    (None: nothing to compare with). ok: the reference that counts matched, the official MD5 where one exists."""
    def match(want):
        return None if want is None or md5 is None else md5 == want
    return {"file": name, "size": size, "md5": md5, "official_md5": official, "official_match": match(official),
            "md5sums_md5": listed, "md5sums_match": match(listed), "ok": match(official) if official else match(listed)}


def check_md5(path: Path | str, size: int, md5: str, sums: dict[str, str], partial: bool, notes: list[str]) -> dict:
    """Raise on a mismatch; only --partial accepts an official archive that differs from the published one (a mini
    fixture or a subset): its record says so, and the manifest marks the data unverified."""
    path = Path(path)
    official, listed = facts.MD5.get(path.name), sums.get(path.name)
    record = checksum_record(path.name, size, md5, official, listed)
    if official and md5 == official:
        if listed and listed != md5:
            notes.append(f"{path.name}: matches the official MD5; MD5SUMS lists {listed}, which is wrong")
    elif listed and md5 != listed:
        raise UserError(f"{path.name}: MD5 {md5} does not match MD5SUMS ({listed}); the download is corrupt or "
                        "incomplete, download it again")
    elif official and not partial:  # an MD5SUMS line that matches cannot stand in for the published MD5
        vouch = " (MD5SUMS lists it, but cannot stand in for the official MD5)" if listed else ""
        raise UserError(f"{path.name}: MD5 {md5} does not match the official MD5 ({official}){vouch}; the download "
                        "is corrupt or not the published archive: download it again, or give --partial to keep "
                        "it as unverified data")
    elif not official and not listed:
        notes.append(f"{path.name}: no published MD5 to check against (md5 {md5})")
    return record


def check_sha256(name: str, size: int, sha256: str | None, published: str | None, by: str, partial: bool,
                 notes: list[str]) -> dict:
    """A Hugging Face or WebDataset file against the SHA-256 its source publishes (`by` says who: the hub's file list,
    or huggingface-cli's record of it). Raise on a mismatch unless --partial, which keeps it as unverified data."""
    match = None if sha256 is None or published is None else sha256 == published
    record = {"file": name, "size": size, "sha256": sha256, "published_sha256": published, "published_by": by,
              "match": match, "ok": match}
    if match is False and not partial:
        raise UserError(f"{name}: SHA-256 {sha256} does not match the {published} that {by} lists; the file is "
                        "corrupt or changed: run the command again to fetch it again, or give --partial to keep it "
                        "as unverified data")
    return record


def unpublished_note(checksums: list[dict]) -> list[str]:
    """One note for the files nothing published a SHA-256 for (a local copy without huggingface-cli's records,
    WebDataset shards from elsewhere): computed and recorded, compared with nothing."""
    files = [c["file"] for c in checksums if c.get("sha256") and not c.get("published_sha256")]
    return [f"{len(files)} files had no published SHA-256 to compare with (e.g. {files[0]}); their SHA-256s are "
            "recorded in prepared.json; the per-class counts vouch for them"] if files else []


def unhashed_record(name: str, size: int, offset: int) -> dict:
    """A file a rerun did not read from its first byte (it resumed at `offset`, where the killed run stopped): its
    checksum was never computed, so the per-class counts, each image's header and (from `offset` on) each image's
    full decode vouch for it instead."""
    return {"file": name, "size": size, "md5": None, "one_pass": False, "resumed_at": offset, "ok": None}


def part_record(part, sums: dict[str, str], partial: bool, notes: list[str]) -> dict:
    """The checksum record of a part (layouts.Part) read to its end: what was computed, compared with what."""
    digest = part.checksum()
    if part.algorithm is None:  # Kaggle publishes no checksums; the zip's CRC-32s are checked on every read
        return checksum_record(Path(part.name).name, part.size, None, None, None)
    if digest is None:
        return unhashed_record(part.name, part.size, part.offset)
    if part.algorithm == "md5":
        return check_md5(part.name, part.size, digest, sums, partial, notes)
    return check_sha256(part.name, part.size, digest, *part.published(), partial, notes)


def devkit_labels(path: Path | str, data: bytes) -> tuple[str, dict[str, str]]:
    """(md5, val file name -> wnid) from the devkit's meta.mat and validation ground truth (`data`: the devkit's bytes).

    The ground truth holds devkit ILSVRC2012_IDs, which are not sorted-wnid indices: meta.mat maps them."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # else numpy's BLAS threads spin beside the writers
    import scipy.io

    path = Path(path)
    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for info in tar:
                name = safe_name(path.name, info)
                for want in ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"):
                    if name and name.endswith(want):
                        found[want] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise tar_error(path.name, e) from None
    if len(found) != 2:
        raise UserError(f"{path.name} lacks data/meta.mat or the validation ground truth; download it again")
    synsets = scipy.io.loadmat(io.BytesIO(found["data/meta.mat"]), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    if [id_to_wnid.get(i) for i in range(1, 1001)] != list(facts.devkit_wnids()):
        raise UserError(f"{path.name}: meta.mat's class IDs differ from ILSVRC2012's; is this the 2012 devkit?")
    ids = found["data/ILSVRC2012_validation_ground_truth.txt"].split()
    return hashlib.md5(data).hexdigest(), {facts.val_name(i): id_to_wnid[int(k)] for i, k in enumerate(ids, 1)}


def kaggle_labels(text: str) -> dict[str, str]:
    """val file name -> wnid from Kaggle's LOC_val_solution.csv (the first box's label)."""
    return {row["ImageId"] + ".JPEG": row["PredictionString"].split()[0] for row in csv.DictReader(io.StringIO(text))}


def cross_check(source: str, labels: dict[str, str], names) -> None:
    truth = facts.val_labels()
    wrong = [n for n in names if n in labels and labels[n] != truth[n]]
    if wrong:
        raise UserError(f"{source} disagrees with the official ground truth for {len(wrong)} validation files "
                        f"(e.g. {wrong[0]}: {labels[wrong[0]]} vs {truth[wrong[0]]}); it is corrupt or not ILSVRC2012's")


def count_problems(counts: dict[str, dict[str, int]], unreadable: list[str]) -> tuple[list[str], list[str]]:
    """-> (missing: fewer files than ILSVRC2012 has, wrong: anything else). counts: split -> class -> n."""
    missing, wrong = [], []
    for split, want in (("train", facts.train_counts()), ("val", dict.fromkeys(facts.wnids(), facts.VAL_PER_CLASS))):
        if split not in counts:
            missing.append(f"{split}: split not given")
            continue
        have = counts[split]
        absent = [w for w in want if w not in have]
        short = [w for w in want if 0 < have.get(w, 0) < want[w]]
        over = [w for w in have if have[w] > want.get(w, 0)]
        total = sum(have.values())
        if absent:
            missing.append(f"{split}: {len(absent)} of 1000 classes absent (e.g. {', '.join(absent[:3])})")
        if short:
            w = short[0]
            missing.append(f"{split}: {len(short)} classes incomplete (e.g. {w}: {have[w]} of {want[w]})")
        if absent or short:
            missing.append(f"{split}: {total:,} of {sum(want.values()):,} images")
        if over:
            wrong.append(f"{split}: {len(over)} classes hold more images than ILSVRC2012's (e.g. {over[0]}: {have[over[0]]})")
    if unreadable:
        wrong.append(f"{len(unreadable)} files are not decodable images or declare more than "
                     f"{decode.max_pixels:,} pixels (e.g. {unreadable[0]})")
    return missing, wrong


def on_disk(root: Path, tally: dict[str, dict]) -> list[str]:
    """Class folders holding fewer files than were written into them: two sources gave one name (two samples of a
    WebDataset, in different shards or runs), and the second overwrote the first."""
    short = []
    for split in ("train", "val"):
        for wnid, n in tally.get(split, {}).get("classes", {}).items():
            with os.scandir(root / split / wnid) as it:
                have = sum(1 for _ in it)
            if have != n:
                short.append(f"{split}/{wnid}: {n} images written but {have} files there; two share a name")
    return short[:1] + ([f"... and {len(short) - 1} more class folders like it"] if len(short) > 1 else [])
