"""A folder of labelled images, addressed by (index, seed, size) keys from the samplers."""

import signal
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from warmstart.data.folder import index_folder
from warmstart.data.sampler import EvalSampler
from warmstart.data.transforms import eval_resize_size, eval_transform, load_image, train_decode_size, train_transform

# what a broken file raises while decoding; anything else is a bug or a bad setting and must surface
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDataset(Dataset):
    """train=True: random crops at the size the sampler asks for, seeded per sample.
    train=False: the deterministic eval transform described by `spec` (see transforms.transform_spec)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], *, train: bool, spec: dict | None = None,
                 min_scale: float = 0.08, auto_augment: str | None = None):
        self.root, self.train, self.spec = Path(root), train, spec
        # numpy arrays, not a list of tuples: forked workers would otherwise copy the list page by page
        # as reference counts change (hundreds of MB per worker at ImageNet scale)
        self.paths = np.array([p.encode() for p, _ in samples])
        self.labels = np.array([y for _, y in samples], dtype=np.int64)
        self.min_scale, self.auto_augment = min_scale, auto_augment
        self._transforms = {}  # size -> transform, built lazily in each worker

    def __len__(self):
        return len(self.labels)

    def _transform(self, size: int):
        if size not in self._transforms:
            self._transforms[size] = (train_transform(size, min_scale=self.min_scale, auto_augment=self.auto_augment)
                                      if self.train else eval_transform(self.spec))
        return self._transforms[size]

    def __getitem__(self, key):
        index, seed, size = key
        path, label = self.root / self.paths[index].decode(), int(self.labels[index])
        decode_size = train_decode_size(size, self.min_scale) if self.train else eval_resize_size(self.spec)
        try:
            img = load_image(path, decode_size)
        except DECODE_ERRORS:  # corrupt or unreadable: skipped by collate and counted, never a crash
            return None, label
        if not self.train:
            return self._transform(size)(img), label
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # CPU only: leave CUDA generators alone
            return self._transform(size)(img), label


def collate(batch):
    """Stack the readable samples; the third item counts the unreadable ones that were dropped."""
    good = [(x, y) for x, y in batch if x is not None]
    if not good:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), len(batch)
    images = torch.stack([x for x, _ in good])
    labels = torch.tensor([y for _, y in good])
    return images, labels, len(batch) - len(good)


# SLURM (at preemption or the time limit), Kubernetes and `kill -- -PGID` signal the whole process group. The main
# process saves and stops at the next update (engine/run.py); a data worker must live until then, but torch's worker
# handler makes SIGTERM from anyone but the parent fatal, which would end the run in a DataLoader error, unsaved.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class Loader(DataLoader):
    """A DataLoader whose workers ignore the stop signals. They are blocked while workers start (so a signal in the
    instant between fork and worker_init_fn cannot kill one) and delivered to the main process afterwards."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def make_loader(dataset, sampler, *, batch_size: int, workers: int, train: bool, pin_memory: bool = False):
    # its own generator: creating an iterator must not draw from the global RNG, or a resumed run would
    # continue from a different random state than the uninterrupted one
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                  drop_last=train, pin_memory=pin_memory, persistent_workers=workers > 0,
                  prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(0),
                  worker_init_fn=_worker_ignores_stop_signals if workers > 0 else None)


def read_human_names(root: Path, classes: list[str]) -> list[str] | None:
    """Human-readable class names from ROOT/synsets.txt ('wnid names' lines, as `warmstart prepare` writes)."""
    path = Path(root) / "synsets.txt"
    if not path.is_file():
        return None
    names = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
    return [names.get(c, c) for c in classes]


def eval_loader(split_dir: Path, classes: list[str], spec: dict, *, batch_size: int, workers: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False, samples=None):
    """A loader over every image of split_dir once (sharded across ranks), labelled in `classes` order; or over
    `samples` ((path under split_dir, label) pairs) when the caller already has them."""
    if samples is None:
        _, samples = index_folder(split_dir, classes)
    dataset = ImageDataset(split_dir, samples, train=False, spec=spec)
    sampler = EvalSampler(len(dataset), size=spec["size"], rank=rank, world_size=world_size)
    return make_loader(dataset, sampler, batch_size=batch_size, workers=workers, train=False, pin_memory=pin_memory)
