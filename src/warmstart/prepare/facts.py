"""ILSVRC2012 facts shipped with the package, so `prepare` needs no network."""

import functools
import gzip
from pathlib import Path

from warmstart.data.verified import OFFICIAL_MD5 as MD5  # the published MD5s live where "verified" is read

META = Path(__file__).with_name("meta")

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
TEST_TARS = ("ILSVRC2012_img_test_v10102019.tar", "ILSVRC2012_img_test.tar")
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
TRAIN_TOTAL, VAL_PER_CLASS, VAL_TOTAL = 1_281_167, 50, 50_000

# Known bad files in the train tar: one PNG and 22 CMYK JPEGs, all named .JPEG.
PNG_FILES = ("n02105855_2933.JPEG",)
CMYK_FILES = tuple(f"{n}.JPEG" for n in (
    "n01739381_1309 n02077923_14822 n02447366_23489 n02492035_15739 n02747177_10752 n03018349_4028 "
    "n03062245_4620 n03347037_9675 n03467068_12171 n03529860_11437 n03544143_17228 n03633091_5218 "
    "n03710637_5125 n03961711_5286 n04033995_2932 n04258138_17003 n04264628_27969 n04336792_7448 "
    "n04371774_5854 n04596742_4225 n07583066_647 n13037406_4650").split())


@functools.cache
def synsets() -> dict[str, str]:
    """wnid -> human names, in class-index (sorted wnid) order."""
    lines = (META / "synsets.txt").read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines)


@functools.cache
def wnids() -> tuple[str, ...]:
    return tuple(synsets())


@functools.cache
def devkit_wnids() -> tuple[str, ...]:
    """wnid of each devkit ILSVRC2012_ID (1-based ID = position + 1); not sorted-wnid order."""
    return tuple(line.split()[0] for line in (META / "devkit_classes.txt").read_text().splitlines())


@functools.cache
def train_counts() -> dict[str, int]:
    lines = (META / "devkit_classes.txt").read_text().splitlines()
    return {w: int(n) for w, n in (line.split() for line in lines)}


def val_name(i: int) -> str:
    """Official file name of validation image i (1-based)."""
    return f"ILSVRC2012_val_{i:08d}.JPEG"


@functools.cache
def val_labels() -> dict[str, str]:
    """Official validation ground truth: file name -> wnid, for all 50,000 files."""
    ids = gzip.decompress((META / "val_labels.txt.gz").read_bytes()).split()
    w = wnids()
    return {val_name(i): w[int(k)] for i, k in enumerate(ids, 1)}
