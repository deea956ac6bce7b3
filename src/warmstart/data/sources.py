"""Where a run's images come from: DATA/train + DATA/val folders, a folder of class folders with no val/ (a seeded,
stratified hold-out), or a CSV of `path,label[,split]`. One answer for train and finetune alike."""

import csv
import random
from dataclasses import dataclass
from pathlib import Path

from warmstart.data import verified
from warmstart.data.dataset import read_human_names
from warmstart.data.folder import find_split, index_folder
from warmstart.data.shard_format import SPLITS, is_shards
from warmstart.data.shard_reader import ShardReader, open_shard_splits
from warmstart.data.shard_store import DEFAULT_CACHE_LIMIT
from warmstart.errors import UserError

# A split's samples: files as (path relative to its root, or absolute; class index) pairs, or (root None) shards,
# a ShardReader that returns (bytes, class index, file name) by global index. Both have len() and [i].
Samples = list[tuple[str, int]] | ShardReader


@dataclass
class Splits:
    classes: list[str]
    human: list[str] | None
    train_root: Path | None         # None: shards
    train: Samples
    val_root: Path | None
    val: Samples
    note: str = ""                  # how the validation set was obtained, for the start-of-run line
    warning: str | None = None      # one line per warning to show at the start of a run: unverified data (folders:
                                    # prepared.json, shards: warmstart.json), a --cache-limit below the shards' size


def stratified_split(samples: list[tuple[str, int]], fraction: float, seed: int):
    """Hold out `fraction` of each class (at least one image of every class with two or more), chosen by `seed`."""
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng, train, val = random.Random(seed), [], []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        k = min(len(items) - 1, max(1, round(fraction * len(items)))) if len(items) > 1 and fraction > 0 else 0
        val += items[:k]
        train += items[k:]
    return sorted(train), sorted(val)


def _from_csv(path: Path, val_split: float, seed: int) -> Splits:
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would hide the header
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} as CSV ({e}); expected lines `path,label[,split]`") from None
    if rows and rows[0][:2] == ["path", "label"]:
        rows = rows[1:]
    bad = next((i for i, r in enumerate(rows, 1) if len(r) not in (2, 3) or (len(r) == 3 and r[2].strip() not in
                                                                                ("train", "val", ""))), None)
    if bad is not None or not rows:
        raise UserError(f"{path}: line {bad or 1} is not `path,label[,split]` with split train or val; fix the CSV")
    classes = sorted({r[1].strip() for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    samples = [(r[0].strip(), index[r[1].strip()], r[2].strip() if len(r) == 3 else "") for r in rows]
    root = path.parent  # relative paths in the CSV are relative to the CSV itself
    missing = [p for p, _, _ in samples if not (root / p).is_file()]
    if missing:
        raise UserError(f"{path}: {len(missing)} listed image(s) do not exist, e.g. {root / missing[0]}; paths are "
                        f"relative to the CSV's folder or absolute")
    if any(s == "val" for _, _, s in samples):
        train = [(p, y) for p, y, s in samples if s != "val"]
        val = [(p, y) for p, y, s in samples if s == "val"]
        return Splits(classes, None, root, train, root, val, f"val = the CSV's split column ({len(val)} images)")
    train, val = stratified_split([(p, y) for p, y, _ in samples], val_split, seed)
    return Splits(classes, None, root, train, root, val,
                  f"val = a stratified {val_split:.0%} of {path.name} (seed {seed}, {len(val)} images)")


def _from_shards(data: str, cache_dir, cache_limit) -> Splits:
    classes, human, readers, warning = open_shard_splits(data, cache_dir=cache_dir, cache_limit=cache_limit)
    missing = [s for s in SPLITS if s not in readers]
    if missing:
        raise UserError(f"--data {data} has no {missing[0]} shards; write them with `warmstart prepare --shards` "
                        f"from a folder with train/ and val/")
    return Splits(classes, human, None, readers["train"], None, readers["val"], f"val = {readers['val'].url}", warning)


def load_splits(data, *, val_split: float | None = None, seed: int = 0, cache_dir=None,
                cache_limit: str = DEFAULT_CACHE_LIMIT) -> Splits:
    """The training and validation images of DATA. val_split=None requires a val/ folder (pretraining);
    a fraction allows holding one out when there is none (fine-tuning). Shards (a folder with warmstart.json, or
    s3://) come with both splits; their train/val are ShardReaders and their roots None."""
    if is_shards(data):
        return _from_shards(str(data), cache_dir, cache_limit)
    root = Path(data)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _from_csv(root, val_split or 0.1, seed)
    has_train = (root / "train").is_dir()
    if val_split is None or (has_train and (root / "val").is_dir()):
        train_dir, val_dir = find_split(root, "train"), find_split(root, "val")
        classes, train = index_folder(train_dir)
        _, val = index_folder(val_dir, classes)
        return Splits(classes, read_human_names(root, classes), train_dir, train, val_dir, val,
                      f"val = {val_dir}", verified.folder_warning(root))
    pool = find_split(root, "train") if has_train else root
    if not pool.is_dir():
        raise UserError(f"data {root} does not exist; pass a folder of class folders, DIR with train/ [val/], "
                        f"or a CSV of path,label[,split]")
    classes, samples = index_folder(pool)
    train, val = stratified_split(samples, val_split, seed)
    if not val:
        raise UserError(f"{pool} has no val/ folder and --val-split {val_split} holds out nothing; raise --val-split")
    return Splits(classes, read_human_names(root, classes), pool, train, pool, val,
                  f"val = a stratified {val_split:.0%} of {pool} (seed {seed}, {len(val)} images; no val/ folder)",
                  verified.folder_warning(root))
