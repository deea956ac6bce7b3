"""`prepare --archives` reads every layout people download ImageNet in (the official tars, Kaggle's zip, Hugging Face's
tar.gz and parquet files, WebDataset shards) into the same tree: identical paths, bytes and synsets.txt."""

import hashlib
import json
from pathlib import Path

import pytest

from warmstart.cli import main
from warmstart.errors import UserError
from warmstart.prepare import fixtures

CLASSES = fixtures.pick_classes(10, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
SIZES = dict(per_class=3, val=20, test=4)
LAYOUTS = ["official", "kaggle", "hf-tars", "hf-parquet", "hf-parquet-data", "wds"]


def write(layout: str, out: Path) -> Path:
    if layout == "hf-parquet-data":  # the user points at the data/ folder itself
        fixtures.build_hf_parquet(out, CLASSES, **SIZES, data_dir=False)
        return out
    fixtures.LAYOUTS[layout](out, CLASSES, **SIZES)
    return out


def tree(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file but prepared.json (it names its sources)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "prepared.json"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """Each layout's fixture prepared once."""
    base, out = tmp_path_factory.mktemp("layouts"), {}
    for layout in LAYOUTS:
        src = write(layout, base / f"src-{layout}")
        assert main(["prepare", "--archives", str(src), "--out", str(base / layout), "--partial"]) == 0
        out[layout] = base / layout
    return out


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_every_layout_prepares_the_same_tree(prepared, layout):
    want, got = tree(prepared["official"]), tree(prepared[layout])
    if layout == "wds":  # WebDataset shards hold no test split
        want = {k: v for k, v in want.items() if not k.startswith("test/")}
    assert got == want
    doc = json.loads((prepared[layout] / "prepared.json").read_text())
    assert doc["splits"]["train"]["images"] == len(CLASSES) * SIZES["per_class"]
    assert doc["splits"]["val"]["images"] == SIZES["val"]
    assert doc["options"]["layout"] == {"hf-parquet-data": "hf-parquet"}.get(layout, layout)


def test_hugging_face_files_checked_against_the_sha256_the_download_recorded(prepared):
    doc = json.loads((prepared["hf-tars"] / "prepared.json").read_text())
    sums = {c["file"]: c for c in doc["checksums"]}
    assert set(sums) == {f"data/train_images_{i}.tar.gz" for i in range(5)} | {"data/val_images.tar.gz",
                                                                                  "data/test_images.tar.gz"}
    assert all(c["match"] is True and c["sha256"] == c["published_sha256"] for c in sums.values())
    assert all("huggingface-cli" in c["published_by"] for c in sums.values())
    assert doc["verified"] is True


def test_a_file_that_differs_from_its_recorded_sha256_is_refused(tmp_path, capsys):
    src = write("hf-tars", tmp_path / "src")
    meta = src / ".cache/huggingface/download/data/val_images.tar.gz.metadata"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], "0" * 64, *lines[2:]]) + "\n")
    assert main(["prepare", "--archives", str(src), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data/val_images.tar.gz: SHA-256" in err and "does not match" in err
    assert not (tmp_path / "out" / "val").exists() and not (tmp_path / "out" / "prepared.json").exists()


def test_splits_may_come_from_two_layouts(tmp_path, prepared):
    """train from the Hugging Face tars, val from WebDataset shards: two --archives."""
    hf, wds = write("hf-tars", tmp_path / "hf"), write("wds", tmp_path / "wds")
    for p in (hf / "data").glob("*_images.tar.gz"):  # keep only the train parts
        p.unlink()
    assert main(["prepare", "--archives", str(hf), str(wds), "--out", str(tmp_path / "out"), "--partial"]) == 0
    want = {k: v for k, v in tree(prepared["official"]).items() if not k.startswith("test/")}
    assert tree(tmp_path / "out") == want
    assert json.loads((tmp_path / "out" / "prepared.json").read_text())["options"]["layout"] == "wds+hf-tars"


def wds_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True)
    fixtures.write_tar(path, [(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items()])


def jpeg() -> bytes:
    return fixtures.class_images(CLASSES[0], 1)[0]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case,want", [
    ("no-cls", "has no .cls"),
    ("label-1000", "label 1000 is outside 0..999"),
    ("same-name", "two samples named"),
    ("wrong-class", "is not an ILSVRC2012 train image of class"),
])
def test_bad_webdataset_samples_are_one_line(tmp_path, capsys, case, want):
    wnid = CLASSES[0]
    idx = fixtures.facts.wnids().index(wnid)
    good = {"jpg": jpeg(), "cls": str(idx).encode()}
    samples = {"no-cls": [(f"{wnid}_1", {"jpg": jpeg()})],
               "label-1000": [(f"{wnid}_1", {**good, "cls": b"1000"})],
               "same-name": [(f"{wnid}_1", good), (f"{wnid}_2", good), (f"{wnid}_1", good)],
               "wrong-class": [(f"{wnid}_1", {**good, "cls": str(idx + 1).encode()})]}[case]
    wds_shard(tmp_path / "src" / "imagenet1k-train-0000.tar", samples)
    assert main(["prepare", "--archives", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--partial"]) == 2
    assert want in one_line_error(capsys)
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "out" / "prepared.json").exists()


def test_truncated_gzip_is_one_line_and_nothing_is_kept(tmp_path, capsys):
    src = write("hf-tars", tmp_path / "src")
    part = src / "data" / "train_images_1.tar.gz"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    (src / ".cache").rename(tmp_path / "cache")  # its recorded SHA-256 would refuse the file first
    out = tmp_path / "out"
    assert main(["prepare", "--archives", str(src), "--out", str(out), "--partial"]) == 2
    assert "data/train_images_1.tar.gz is truncated or corrupt" in one_line_error(capsys)
    assert not (out / "prepared.json").exists()
    done = json.loads("[" + ",".join((out / ".partial" / "journal.jsonl").read_text().splitlines()) + "]")
    assert [r["key"] for r in done] == ["val/@data/val_images.tar.gz", "train/@data/train_images_0.tar.gz"]


def test_parquet_without_the_expected_columns_is_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "src" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "src/data/train-00000-of-00001.parquet")
    assert main(["prepare", "--archives", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--partial"]) == 2
    assert "without the columns image{bytes, path} and label (it has img, label)" in one_line_error(capsys)


def test_misfiled_validation_labels_are_refused(tmp_path, capsys):
    """A val image labelled with another class than the ground truth (a flat folder read as one class scores 0.1%)."""
    name, truth = next(iter(fixtures.facts.val_labels().items()))
    other = next(w for w in CLASSES if w != truth)
    (tmp_path / "src" / "data").mkdir(parents=True)
    fixtures.write_tar(tmp_path / "src" / "data" / "val_images.tar.gz", [(f"{name[:-5]}_{other}.JPEG", jpeg())])
    assert main(["prepare", "--archives", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--partial"]) == 2
    assert f"labelled {other} but ILSVRC2012's ground truth says {truth}" in one_line_error(capsys)


def test_one_name_in_two_shards_is_refused(tmp_path, capsys):
    """The same sample in two WebDataset shards: the second would overwrite the first, and the counts would lie."""
    wnid = CLASSES[0]
    good = {"jpg": jpeg(), "cls": str(fixtures.facts.wnids().index(wnid)).encode()}
    wds_shard(tmp_path / "src" / "imagenet1k-train-0000.tar", [(f"{wnid}_1", good), (f"{wnid}_2", good)])
    fixtures.write_tar(tmp_path / "src" / "imagenet1k-train-0001.tar", [(f"{wnid}_1.jpg", good["jpg"]),
                                                                       (f"{wnid}_1.cls", good["cls"])])
    assert main(["prepare", "--archives", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--partial"]) == 2
    err = capsys.readouterr()
    assert f"train/{wnid}: 3 images written but 2 files there; two share a name" in err.err
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_a_listing_with_unsafe_names_is_refused_and_other_layouts_are_said(tmp_path, capsys, monkeypatch):
    from warmstart.prepare import layouts, stores

    class Listed(stores.LocalStore):  # a remote listing someone else wrote, over a local folder
        def __init__(self, root, names):
            super().__init__(root)
            self.names = names

        def _list(self):
            return {n: stores.Entry(n, 1, None) for n in self.names}

    for name, said in (("../imagenet1k-validation-0000.tar", "refusing this source"),  # it would become a URL
                       ("x\n\x1b[31m/imagenet1k-validation-0000.tar", "holds none of the layouts"),  # never read
                       ("/abs/imagenet1k-train-0000.tar", "holds none of the layouts")):
        monkeypatch.setattr(stores, "open_store", lambda spec, name=name: Listed(tmp_path, [name]))
        with pytest.raises(UserError) as e:
            layouts.find(["listed"])
        assert said in str(e.value) and "\n" not in str(e.value) and "\x1b" not in str(e.value)
    # two layouts for one split: the first is read, the other said, not silently dropped
    hf, wds = write("hf-tars", tmp_path / "hf"), write("wds", tmp_path / "wds")
    monkeypatch.undo()
    assert main(["prepare", "--archives", str(hf), "--archives", str(wds), "--out", str(tmp_path / "o"), "--partial"]) == 0
    out = capsys.readouterr().out
    assert "val: read from the hf-tars files; the wds files (imagenet1k-validation-00.tar, ...) are ignored" in out
    assert "train: read from the hf-tars files" in out


def test_a_part_that_writes_no_file_and_duplicates_in_shards(tmp_path, capsys):
    src = write("hf-tars", tmp_path / "src")
    (src / ".cache").rename(tmp_path / "cache")
    fixtures.write_tar(src / "data" / "test_images.tar.gz", [])  # an empty part: nothing to move into place
    assert main(["prepare", "--archives", str(src), "--out", str(tmp_path / "out"), "--partial"]) == 0
    assert not (tmp_path / "out" / "test").exists()
    capsys.readouterr()
    part = src / "data" / "train_images_0.tar.gz"
    import tarfile
    with tarfile.open(part) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    fixtures.write_tar(part, members + members[:1])  # one name twice
    assert main(["prepare", "--archives", str(src), "--shards", str(tmp_path / "shards"), "--partial"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is given twice" in err


def test_the_checksum_covers_the_bytes_after_the_end_of_the_tar(tmp_path, monkeypatch):
    """A tar's end marker may be followed by megabytes of padding the parser never reads: the hash must still see
    every byte (read to the end before the part's stream is closed), or a good archive would fail its MD5."""
    from warmstart.prepare import archives

    monkeypatch.setattr(archives.HashingReader, "CHUNK", 64 << 10)  # read-ahead far shorter than the padding
    src = fixtures.build_official(tmp_path / "src", CLASSES[:2], 2, 4, devkit=False)
    with open(src / fixtures.facts.VAL_TAR, "ab") as f:
        f.write(bytes(4 << 20))
    want = fixtures.md5sum(src / fixtures.facts.VAL_TAR)
    (src / "MD5SUMS").write_text("".join(f"{fixtures.md5sum(p)}  {p.name}\n" for p in sorted(src.glob("*.tar"))))
    assert main(["prepare", "--archives", str(src), "--out", str(tmp_path / "out"), "--partial"]) == 0
    doc = json.loads((tmp_path / "out" / "prepared.json").read_text())
    record = {c["file"]: c for c in doc["checksums"]}[fixtures.facts.VAL_TAR]
    assert record["md5"] == want and record["md5sums_match"] is True
