"""The fixture writers for the HF tar, HF parquet and wds layouts: the real downloads' file names, member names and
labels, and inside them exactly the images (same bytes) build_official puts in its tars for the same arguments."""

import hashlib
import io
import json
import re
import tarfile

import pytest
from huggingface_hub._local_folder import read_download_metadata

from warmstart.prepare import facts, fixtures

CLASSES = fixtures.pick_classes(4, (fixtures.PNG_CLASS, fixtures.CMYK_CLASS))
ARGS = dict(per_class=3, val=8, test=2)
HF_WNID = re.compile(r"_(n\d{8})\.JPEG$")  # the _<wnid> HF appends to the official stem


def members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:  # gzip or not
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def official_name(hf_name: str) -> str:
    return HF_WNID.sub(".JPEG", hf_name)


def build(tmp_path_factory, writer, **kw):
    return writer(tmp_path_factory.mktemp(writer.__name__), CLASSES, **ARGS, **kw)


def assert_spread(parts: dict[str, list[str]]) -> None:
    """Train images named by class: the classes interleave (the real archives are pre-shuffled) and each one is
    split over several parts, so a reader must gather it."""
    order = [n.split("_")[0] for names in parts.values() for n in names]
    assert order != sorted(order)
    assert all(sum(any(n.startswith(w) for n in names) for names in parts.values()) >= 2 for w in CLASSES)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, bytes]:
    out = build(tmp_path_factory, fixtures.build_official, devkit=False)
    images = dict(members(out / facts.VAL_TAR) + members(out / facts.TEST_TARS[0]))
    for _, inner in members(out / facts.TRAIN_TAR):
        with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
            images |= {m.name: tar.extractfile(m).read() for m in tar}
    assert len(images) == 4 * 3 + 8 + 2
    return images


@pytest.fixture(scope="module")
def hf_tars(tmp_path_factory):
    return build(tmp_path_factory, fixtures.build_hf_tars)


def test_hf_tars_hold_the_official_images_under_hf_names(hf_tars, official):
    names = [f"train_images_{k}.tar.gz" for k in range(5)] + ["val_images.tar.gz", "test_images.tar.gz"]
    assert sorted(p.name for p in (hf_tars / "data").iterdir()) == sorted(names)
    assert (hf_tars / "README.md").read_text().startswith("---\n")
    tars = {name: members(hf_tars / "data" / name) for name in names}
    assert {official_name(n): d for files in tars.values() for n, d in files} == official
    for n, _ in tars["val_images.tar.gz"]:
        assert HF_WNID.search(n)[1] == facts.val_labels()[official_name(n)]
    assert [n for n, _ in tars["test_images.tar.gz"]] == [f"ILSVRC2012_test_0000000{i}.JPEG" for i in (1, 2)]
    train = {name: [n for n, _ in tars[name]] for name in names[:5]}
    assert all(HF_WNID.search(n)[1] == n.split("_")[0] for names in train.values() for n in names)
    assert_spread(train)


def test_hf_download_metadata_is_what_huggingface_hub_reads(hf_tars):
    for path in [*(hf_tars / "data").iterdir(), hf_tars / "README.md"]:
        filename = path.relative_to(hf_tars).as_posix()
        lines = (hf_tars / ".cache/huggingface/download" / f"{filename}.metadata").read_text().splitlines()
        assert len(lines) == 3 and re.fullmatch(r"[0-9a-f]{40}", lines[0])
        meta = read_download_metadata(hf_tars, filename)  # None unless path, format and timestamp are right
        data = path.read_bytes()
        want = hashlib.sha1(b"blob %d\0" % len(data) + data) if path.name == "README.md" else hashlib.sha256(data)
        assert meta is not None and meta.etag == want.hexdigest()


def test_hf_tars_without_data_dir_are_the_archives_alone(tmp_path):
    fixtures.build_hf_tars(tmp_path, CLASSES, per_class=1, val=4, parts=2, data_dir=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_images_0.tar.gz", "train_images_1.tar.gz",
                                                          "val_images.tar.gz"]


def test_hf_parquet_schema_labels_and_images(tmp_path_factory, official):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = build(tmp_path_factory, fixtures.build_hf_parquet, row_group=4)
    data = out / "data"
    assert sorted(p.name for p in data.iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet"]
    images = {}
    for path in data.iterdir():
        f = pq.ParquetFile(path)
        schema = f.schema_arrow
        assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        assert schema.names == ["image", "label"] and schema.field("label").type == pa.int64()
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert features["image"] == {"_type": "Image"}
        assert features["label"] == {"names": list(facts.synsets().values()), "_type": "ClassLabel"}
        for row in f.read().to_pylist():
            name, wnid = row["image"]["path"], HF_WNID.search(row["image"]["path"])
            assert row["label"] == (facts.wnids().index(wnid[1]) if wnid else -1)
            images[official_name(name)] = row["image"]["bytes"]
    assert images == official
    assert pq.ParquetFile(data / "train-00000-of-00002.parquet").metadata.num_row_groups == 2  # 6 rows, groups of 4


def test_wds_samples_labels_and_images(tmp_path_factory, official):
    out = build(tmp_path_factory, fixtures.build_wds)
    shards = [f"imagenet1k-train-{k:04d}.tar" for k in range(3)] + [f"imagenet1k-validation-0{k}.tar" for k in (0, 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["_info.json"])
    images, train = {}, {}
    for shard in shards:
        files = members(out / shard)
        assert len(files) % 3 == 0
        for (jpg, data), (cls, label), (js, meta) in zip(files[0::3], files[1::3], files[2::3]):
            key = jpg.removesuffix(".jpg")
            assert (jpg, cls, js) == (f"{key}.jpg", f"{key}.cls", f"{key}.json")  # one sample's members adjacent
            wnid = facts.val_labels().get(f"{key}.JPEG") or key.split("_")[0]
            assert int(label) == facts.wnids().index(wnid)
            assert json.loads(meta) == {"filename": f"{key}.JPEG", "label": int(label),
                                        "class_name": facts.synsets()[wnid]}
            images[f"{key}.JPEG"] = data
            train.setdefault(shard, []).append(f"{key}.JPEG")
    assert images == {n: d for n, d in official.items() if "_test_" not in n}
    assert_spread({s: train[s] for s in shards[:3]})
    info = json.loads((out / "_info.json").read_text())["splits"]
    assert (info["train"]["num_samples"], info["validation"]["shard_lengths"]) == (12, [4, 4])
    assert info["train"]["filenames"] == shards[:3]
