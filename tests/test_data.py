"""Samplers, loaders (corrupt files, worker counts), the cached file index and on-device normalisation."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from synth import make_image_folder
from warmstart.data import folder
from warmstart.data.dataset import ImageDataset, eval_loader, make_loader
from warmstart.data.sampler import EvalSampler, TrainSampler
from warmstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, transform_spec
from warmstart.errors import UserError


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 7, 10, 11, 500])
def test_eval_sampler_shards_are_a_partition_of_the_val_set(n, world):
    # Fails for DistributedSampler-style padding (indices repeated to even the shards: len(seen) > n), for
    # dropping the remainder (len(seen) < n) and for overlapping or unbalanced shards.
    shards = [list(EvalSampler(n, size=32, rank=r, world_size=world)) for r in range(world)]
    seen = [i for shard in shards for i, _, _ in shard]
    assert len(seen) == n and sorted(seen) == list(range(n))
    assert all(len(EvalSampler(n, size=32, rank=r, world_size=world)) == len(shards[r]) for r in range(world))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # no rank waits long for another at the reduction
    assert all(seed == 0 and size == 32 for shard in shards for _, seed, size in shard)  # eval: no augmentation


def test_train_sampler_is_seeded_sharded_and_resumable():
    def items(seed=0, epoch=0, rank=0, world=1, start=0):
        s = TrainSampler(20, seed=seed, rank=rank, world_size=world)
        s.set_epoch(epoch, 64, start=start)
        return list(s)

    assert items() == items()
    assert items(epoch=1) != items() and items(seed=1) != items()
    assert items(start=7) == items()[7:] and len(items(start=7)) == 13
    shards = [{i for i, _, _ in items(rank=r, world=3)} for r in range(3)]
    assert sum(map(len, shards)) == 18 and not (shards[0] & shards[1] or shards[1] & shards[2])
    assert all(size == 64 for _, _, size in items())


def test_augmentation_depends_only_on_the_sample_seed(tmp_path):
    root = make_image_folder(tmp_path, classes=1, train_per_class=2, val_per_class=1)
    _, samples = folder.index_folder(root / "train")
    ds = ImageDataset(root / "train", samples, train=True)
    a, _ = ds[(0, 123, 24)]
    torch.rand(5)  # global RNG moves on: must not matter
    b, _ = ds[(0, 123, 24)]
    c, _ = ds[(0, 124, 24)]
    assert a.dtype == torch.uint8 and a.shape == (3, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_index_is_cached_and_invalidated_when_the_tree_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=3, val_per_class=1)
    classes, samples = folder.index_folder(root / "train")
    assert classes == ["c00", "c01"] and len(samples) == 6
    real_scan = folder._scan
    monkeypatch.setattr(folder, "_scan", lambda *a: pytest.fail("rescanned an unchanged tree"))
    assert folder.index_folder(root / "train") == (classes, samples)
    monkeypatch.setattr(folder, "_scan", real_scan)
    (root / "train" / "c01" / "extra.jpg").write_bytes((root / "train" / "c01" / "train_1_0.jpg").read_bytes())
    assert len(folder.index_folder(root / "train")[1]) == 7


def test_val_class_missing_from_train_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=1, val_per_class=1)
    (root / "val" / "zebra").mkdir()
    (root / "val" / "zebra" / "z.jpg").write_bytes((root / "val" / "c00" / "val_0_0.jpg").read_bytes())
    with pytest.raises(UserError, match="zebra"):
        folder.index_folder(root / "val", ["c00", "c01"])


def test_normalize_on_device_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(x.float() / 255)
    out = Normalize(channels_last=True)(x)
    assert torch.allclose(out, ref, atol=1e-5) and out.is_contiguous(memory_format=torch.channels_last)


# --- corrupt files: skipped and counted exactly ---------------------------------------------------------------

BAD_TRAIN, BAD_VAL = 3, 2


def add_corrupt_files(split_dir, names):
    """A truncated JPEG, random bytes named .jpg and an empty .JPEG, one per class folder, in that order."""
    good = next(split_dir.glob("*/*.jpg")).read_bytes()
    payloads = [("truncated.jpg", good[: len(good) // 2]),
                ("noise.jpg", np.random.default_rng(0).bytes(700)),
                ("empty.JPEG", b"")]
    for class_name, (file_name, data) in zip(names, payloads):
        (split_dir / class_name / file_name).write_bytes(data)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """3 classes; train: 7 readable images each + 3 corrupt files (24 files, a multiple of the batch of 4, so an
    epoch visits every file); val: 3 readable each + 2 corrupt."""
    root = make_image_folder(tmp_path_factory.mktemp("broken"), classes=3, train_per_class=7, val_per_class=3)
    add_corrupt_files(root / "train", ["c00", "c01", "c02"])
    add_corrupt_files(root / "val", ["c00", "c02"])
    return root


def train_loader(root, workers, *, batch_size=4, seed=0, auto_augment=None):
    """Wired as train.py wires it: ImageDataset + TrainSampler(multiple_of=batch) + make_loader(train=True)."""
    _, samples = folder.index_folder(root / "train")
    ds = ImageDataset(root / "train", samples, train=True, min_scale=0.25, auto_augment=auto_augment)
    sampler = TrainSampler(len(ds), seed=seed, multiple_of=batch_size)
    return sampler, make_loader(ds, sampler, batch_size=batch_size, workers=workers, train=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_loaders_skip_and_count_exactly_the_corrupt_files(broken, workers):
    # Would fail if a corrupt file were decoded anyway (e.g. PIL's LOAD_TRUNCATED_IMAGES turned on: 2 skipped,
    # not 3), if collate dropped a file without counting it, counted per batch instead of per file, or if one
    # bad file crashed a worker. (test_train.py's CLI test accepts 0 skipped, since its epoch may drop the file.)
    classes, _ = folder.index_folder(broken / "train")
    sampler, loader = train_loader(broken, workers)
    sampler.set_epoch(0, 16)
    batches = list(loader)
    assert len(sampler) == 24 == sum(len(y) + bad for _, y, bad in batches)
    assert sum(bad for _, _, bad in batches) == BAD_TRAIN
    assert Counter(y for _, ys, _ in batches for y in ys.tolist()) == {0: 7, 1: 7, 2: 7}  # every good one, once
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) for x, _, _ in batches)

    val = list(eval_loader(broken / "val", classes, transform_spec(16, 0.875), batch_size=4, workers=workers))
    assert sum(bad for _, _, bad in val) == BAD_VAL
    assert Counter(y for _, ys, _ in val for y in ys.tolist()) == {0: 3, 1: 3, 2: 3}


def test_training_step_and_evaluation_report_the_skipped_count(broken):
    from warmstart.engine.loop import Position, evaluate, train_one_epoch

    class NoSchedule:
        def step_update(self, step):
            pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    classes, _ = folder.index_folder(broken / "train")
    sampler, loader = train_loader(broken, 0)
    sampler.set_epoch(0, 16)
    stats = train_one_epoch(model=model, loader=loader, normalize=Normalize(), loss_fn=torch.nn.CrossEntropyLoss(),
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.01), scheduler=NoSchedule(),
                            pos=Position(), device=torch.device("cpu"), show_progress=False)
    assert (stats["skipped"], stats["train_images"]) == (BAD_TRAIN, 21)
    val = eval_loader(broken / "val", classes, transform_spec(16, 0.875), batch_size=4, workers=0)
    m = evaluate(model, val, Normalize(), torch.device("cpu"), show_progress=False)
    assert (m["skipped"], m["count"]) == (BAD_VAL, 9)


# --- worker count does not change the data ------------------------------------------------------------------------

def test_train_batches_are_bitwise_identical_with_0_and_2_workers(tmp_path):
    # The per-sample seed (dataset.py) makes augmentation independent of which worker decodes a sample. Would fail
    # if the dataset drew from the worker's own RNG (each DataLoader worker is seeded differently), if workers
    # reordered batches, or if a worker kept state across epochs that the main process does not.
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=12, val_per_class=1)
    add_corrupt_files(root / "train", ["c01"])  # 25 files: 5 batches of 5, one with a skipped file

    def run(workers, start=0):
        sampler, loader = train_loader(root, workers, batch_size=5, seed=3, auto_augment="trivialaugment")
        out = []
        for epoch, size in ((0, 24), (1, 16)):  # progressive resizing: the size travels with each key
            sampler.set_epoch(epoch, size, start=start if epoch == 0 else 0)
            out.append(list(loader))
        return out

    a, b = run(0), run(2)
    assert [len(e) for e in a] == [len(e) for e in b] == [5, 5]
    for epoch_a, epoch_b in zip(a, b):
        for (xa, ya, bad_a), (xb, yb, bad_b) in zip(epoch_a, epoch_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and bad_a == bad_b
    assert sum(bad for _, _, bad in a[0]) == 1
    assert a[0][0][0].shape[-1] == 24 and a[1][0][0].shape[-1] == 16
    assert [y.tolist() for _, y, _ in a[0]] != [y.tolist() for _, y, _ in a[1]]  # each epoch its own order
    # resumed mid-epoch with workers: the rest of the epoch, batch for batch
    resumed = run(2, start=10)[0]
    assert len(resumed) == 3 and all(torch.equal(x, y[0]) for (x, _, _), y in zip(resumed, a[0][2:]))


# --- the index cache goes through fileio.atomic_write -----------------------------------------------------------

def cache_file(split_dir):
    return folder.cache_dir() / "index" / (hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest() + ".json")


def test_index_cache_is_written_by_the_atomic_write_helper(tmp_path):
    # Would fail with a hand-rolled temp file: only fileio.atomic_write names temps .NAME.tmp<pid> and removes
    # the ones a killed writer left behind.
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    cache = cache_file(root / "train")
    cache.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = cache.parent / f".{cache.name}.tmp{dead}"
    stale.write_text("half a write")
    _, samples = folder.index_folder(root / "train")
    assert json.loads(cache.read_text())["files"] == {"c00": ["train_0_0.jpg", "train_0_1.jpg"],
                                                      "c01": ["train_1_0.jpg", "train_1_1.jpg"]}
    assert not stale.exists() and sorted(p.name for p in cache.parent.iterdir()) == [cache.name]


def test_index_cache_write_failures_only_cost_a_rescan(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    expected = folder.index_folder(root / "train")
    # a full disk: atomic_write turns ENOSPC into a UserError and removes its temp file. Would fail if
    # index_folder caught only OSError (the UserError would end the run) or if the temp file stayed.
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "full"))

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    assert folder.index_folder(root / "train") == expected
    assert list((tmp_path / "full" / "index").iterdir()) == []
    monkeypatch.undo()
    # a cache folder that cannot be created (works as root too, unlike a read-only mode): the plain OSError path
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "not-a-dir" / "cache"))
    assert folder.index_folder(root / "train") == expected
    assert folder.index_folder(root / "train") == expected  # and again: rescanned, no error
