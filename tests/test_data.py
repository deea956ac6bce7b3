"""Samplers, the cached file index and on-device normalisation."""

import pytest
import torch
from torchvision.transforms import v2

from synth import make_image_folder
from warmstart.data import folder
from warmstart.data.dataset import ImageDataset
from warmstart.data.sampler import EvalSampler, TrainSampler
from warmstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from warmstart.errors import UserError


def test_eval_sampler_covers_every_sample_exactly_once_across_ranks():
    seen = [i for r in range(3) for i, _, _ in EvalSampler(10, size=32, rank=r, world_size=3)]
    assert sorted(seen) == list(range(10))


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
