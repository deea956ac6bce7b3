"""Checks against the ILSVRC2012 facts: checksums, the devkit's and Kaggle's labels, counts."""

import csv
import hashlib
import io
import os
import tarfile
from pathlib import Path

from warmstart.errors import UserError
from warmstart.prepare import facts
from warmstart.prepare.archives import safe_name, tar_error


def expected_md5(root: Path) -> dict[str, str]:
    """Official MD5s, overridden by an MD5SUMS file (`md5  name` lines) next to the archives."""
    sums = dict(facts.MD5)
    if (root / "MD5SUMS").is_file():
        for line in (root / "MD5SUMS").read_text().splitlines():
            if line.strip():
                md5, name = line.split(maxsplit=1)
                sums[name.lstrip("*")] = md5.lower()
    return sums


def check_md5(path: Path, md5: str, expected: dict[str, str], partial: bool, notes: list[str]) -> dict:
    """Raise on a mismatch, except a non-official archive under --partial (a mini fixture or subset)."""
    want = expected.get(path.name)
    record = {"file": path.name, "size": path.stat().st_size, "md5": md5, "expected": want, "ok": md5 == want}
    if want is None:
        notes.append(f"{path.name}: no published MD5 to check against (md5 {md5})")
    elif md5 != want:
        official = facts.MD5.get(path.name) == want
        if official and partial:
            notes.append(f"{path.name}: not the official archive (md5 {md5}); accepted with --partial")
        else:
            source = "the official MD5" if official else "MD5SUMS"
            raise UserError(f"{path.name}: MD5 {md5} does not match {source} ({want}); the download is corrupt or "
                            "incomplete, download it again")
    return record


def devkit_labels(path: Path) -> tuple[str, dict[str, str]]:
    """(md5, val file name -> wnid) from the devkit's meta.mat and validation ground truth.

    The ground truth holds devkit ILSVRC2012_IDs, which are not sorted-wnid indices: meta.mat maps them."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # else numpy's BLAS threads spin beside the writers
    import scipy.io

    data = path.read_bytes()
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
        wrong.append(f"{len(unreadable)} files are not decodable images (e.g. {unreadable[0]})")
    return missing, wrong
