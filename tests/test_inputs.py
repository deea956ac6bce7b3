"""Inputs as users have them: 16-bit PNG/TIFF, Excel's CSV with a byte-order mark, and a folder where two images share
a stem (a.png, a.gif), which prepare --from-folder must not merge."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from synth import make_image_folder
from warmstart.cli import main
from warmstart.data.sources import load_splits
from warmstart.data.transforms import load_image
from warmstart.prepare import images

GREY = 129  # the true 8-bit value; its 16-bit form is 129 * 257


@pytest.mark.parametrize("fmt, dtype", [("png", "<u2"), ("tiff", "<u2"), ("tiff", ">u2")],
                         ids=["png-I;16", "tiff-I;16", "tiff-I;16B"])
def test_16_bit_images_decode_to_their_8_bit_value(tmp_path, fmt, dtype):
    path = tmp_path / f"grey.{fmt}"
    Image.fromarray(np.full((8, 12), GREY * 257, dtype=dtype)).save(path)
    assert Image.open(path).mode.startswith("I;16")  # the case under test, as PIL decodes it
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (8, 12, 3) and abs(rgb.mean() - GREY) <= 1


def test_32_bit_int_mode_is_read_as_16_bit(tmp_path):
    """Mode I (older Pillow's 16-bit PNG, 32-bit TIFF): values beyond 16 bits clip to white, not wrap."""
    path = tmp_path / "grey.tiff"
    Image.fromarray(np.array([[GREY * 257, 0, 65535, 1 << 20]], dtype=np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [GREY, 0, 255, 255]


def test_csv_with_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the header is still the header, not an image called '\\ufeffpath'."""
    data = make_image_folder(tmp_path / "img", classes=2, train_per_class=3, val_per_class=2, size=8)
    rows = ["path,label,split"] + [f"{f.relative_to(tmp_path)},{f.parent.name},{split}"
                                   for split in ("train", "val") for f in sorted((data / split).rglob("*.jpg"))]
    csv = tmp_path / "excel.csv"
    csv.write_bytes("\r\n".join(rows).encode("utf-8-sig") + b"\r\n")
    splits = load_splits(csv, val_split=0.1)
    assert splits.classes == ["c00", "c01"] and len(splits.train) == 6 and len(splits.val) == 4


def test_prepare_from_folder_keeps_images_that_share_a_stem(tmp_path):
    """a.png, a.gif and a.JPEG in one class folder are three images out, as prepared.json counts them."""
    src = tmp_path / "src" / "n00000001"
    src.mkdir(parents=True)
    for i, name in enumerate(["a.png", "a.gif", "a.JPEG", "b.png", "c.bmp"]):
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(src / name)
    out = tmp_path / "out"
    assert main(["prepare", "--from-folder", str(src.parent), "--resize-short", "16", "--out", str(out),
                 "--workers", "1"]) == 0
    written = sorted(p.name for p in (out / "n00000001").iterdir())
    assert written == ["a.JPEG", "a.gif.JPEG", "a.png.JPEG", "b.JPEG", "c.JPEG"]
    assert json.loads((out / "prepared.json").read_text())["splits"]["."]["images"] == len(written)
    # the a.JPEG written is the JPEG's own image (colour 80), not another file's
    assert abs(np.asarray(Image.open(out / "n00000001" / "a.JPEG"))[..., 0].mean() - 80) < 8


def test_prepare_keeps_16_bit_images_grey(tmp_path):
    """prepare re-encodes a 16-bit PNG as a JPEG, resized (--from-folder) or repaired (a PNG inside an archive): its grey
    stays grey, not white."""
    src = tmp_path / "src" / "n00000001"
    src.mkdir(parents=True)
    Image.fromarray(np.full((30, 40), GREY * 257, dtype=np.uint16)).save(src / "deep.png")
    Image.new("RGB", (40, 30), (10, 20, 30)).save(src / "plain.JPEG")
    out = tmp_path / "out"
    assert main(["prepare", "--from-folder", str(src.parent), "--resize-short", "16", "--out", str(out),
                 "--workers", "1"]) == 0
    assert abs(np.asarray(Image.open(out / "n00000001" / "deep.JPEG").convert("L")).mean() - GREY) <= 2
    repaired = images.repair((src / "deep.png").read_bytes())
    assert abs(np.asarray(Image.open(io.BytesIO(repaired)).convert("L")).mean() - GREY) <= 2


def test_prepare_from_a_flat_folder_writes_its_images(tmp_path):
    """Images at the top of --from-folder (no class folders, like a folder of photos) are written, not only counted."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(src / f"photo{i}.jpg")
    out = tmp_path / "out"
    assert main(["prepare", "--from-folder", str(src), "--resize-short", "16", "--out", str(out), "--workers", "1"]) == 0
    assert sorted(p.name for p in out.glob("*.jpg")) == ["photo0.jpg", "photo1.jpg", "photo2.jpg"]
    assert json.loads((out / "prepared.json").read_text())["splits"]["."]["images"] == 3
