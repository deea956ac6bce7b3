"""warmstart.synthetic: seeded drawn shape classes, the image-folder writer and its CLI, and mini archives drawn
with it (fixtures drawn=True / --drawn) that `warmstart prepare` accepts."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from warmstart import synthetic
from warmstart.cli import main
from warmstart.prepare import fixtures


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def test_same_arguments_same_bytes():
    a = synthetic.image_bytes("star", 7, seed=5, size=64)
    assert a == synthetic.image_bytes(3, 7, seed=5, size=64)  # by name or by index
    assert a != synthetic.image_bytes("star", 7, seed=6, size=64)
    assert a != synthetic.image_bytes("star", 8, seed=5, size=64)
    img = Image.open(io.BytesIO(a))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)


def test_every_image_is_drawn_on_its_own():
    """Images of one class are not crops of one picture, and classes differ from each other."""
    star = [pixels(b) for b in synthetic.class_images("star", 4, size=64)]
    ring = [pixels(b) for b in synthetic.class_images("ring", 4, size=64)]
    for group in (star, ring):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                assert np.abs(group[i] - group[j]).mean() > 10
    assert all(np.abs(s - r).mean() > 10 for s, r in zip(star, ring))
    # the same image index of two classes shares nothing but the seed: not one picture with another shape on it
    assert synthetic.image_bytes("circle", 0) != synthetic.image_bytes("square", 0)


def test_shape_names_and_class_lists():
    assert len(synthetic.NAMES) == len(set(synthetic.NAMES)) >= 20
    assert synthetic.parse_classes("3") == [0, 1, 2]
    assert synthetic.parse_classes("0-2,heart") == [0, 1, 2, synthetic.NAMES.index("heart")]
    assert synthetic.parse_classes("pentagon, 4") == [synthetic.NAMES.index("pentagon"), 4]
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic.parse_classes("dodecahedron")
    with pytest.raises(ValueError, match="out of range"):
        synthetic.shape_index(len(synthetic.NAMES))
    for name in synthetic.NAMES:  # every shape draws
        assert Image.open(io.BytesIO(synthetic.image_bytes(name, 0, size=32))).size == (32, 32)


def test_write_image_folder(tmp_path):
    out = synthetic.write_image_folder(tmp_path / "shapes", ["heart", 12, "stripes"], 3, 2, size=48, seed=1, workers=2)
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == ["heart", "l_shape", "stripes"]
        for d in (out / split).iterdir():
            files = sorted(d.glob("*.jpg"))
            assert len(files) == n
            assert Image.open(files[0]).size == (48, 48)
    train = {p.read_bytes() for p in out.glob("train/*/*.jpg")}
    val = {p.read_bytes() for p in out.glob("val/*/*.jpg")}
    assert len(train) == 9 and len(val) == 6 and not train & val  # validation never repeats a training image
    assert (out / "train/heart/heart_00000.jpg").read_bytes() == synthetic.image_bytes("heart", 0, seed=1, size=48)
    again = synthetic.write_image_folder(tmp_path / "again", ["heart", 12, "stripes"], 3, 2, size=48, seed=1,
                                         workers=1)
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*.jpg")} == \
           {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg")}
    with pytest.raises(ValueError, match="twice"):
        synthetic.write_image_folder(tmp_path / "x", ["heart", "heart"], 1, 1)


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--help"])
    assert e.value.code == 0 and "--classes" in capsys.readouterr().out
    synthetic.main(["--out", str(tmp_path / "s"), "--classes", "star,1", "--train", "2", "--val", "1", "--size", "40"])
    assert "2 classes (star, square)" in capsys.readouterr().out
    assert len(list((tmp_path / "s").glob("train/star/*.jpg"))) == 2
    assert len(list((tmp_path / "s").glob("val/square/*.jpg"))) == 1
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(tmp_path / "t"), "--classes", "blob"])


def test_drawn_archives_prepare(tmp_path):
    classes = fixtures.pick_classes(3)
    archives = fixtures.build_official(tmp_path / "archives", classes, 4, 6, bad_files=False, drawn=True)
    out = tmp_path / "imagenet"
    assert main(["prepare", "--archives", str(archives), "--out", str(out), "--partial"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == classes
    assert all(len(list((out / "train" / w).iterdir())) == 4 for w in classes)
    assert len(list(out.glob("val/*/*.JPEG"))) == 6
    assert json.loads((out / "prepared.json").read_text())["splits"]["train"]["images"] == 12
    # class i of the archive is shape class i, each image drawn on its own
    for i, w in enumerate(classes):
        assert (out / "train" / w / f"{w}_1.JPEG").read_bytes() == synthetic.image_bytes(i, 0)
    assert fixtures.drawn_names(classes) == dict(zip(classes, synthetic.NAMES[:3]))
    with pytest.raises(ValueError, match="at most"):
        fixtures.make_dataset(fixtures.pick_classes(len(synthetic.NAMES) + 1), 1, 0, 0, False, drawn=True)


def test_fixtures_cli_drawn(tmp_path, capsys):
    fixtures.main(["--out", str(tmp_path / "a"), "--classes", "3", "--per-class", "2", "--val", "3", "--drawn",
                   "--no-bad-files"])
    assert "drawn classes:" in capsys.readouterr().out
    assert (tmp_path / "a" / "ILSVRC2012_img_train.tar").is_file()
