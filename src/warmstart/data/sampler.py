"""Which samples each rank sees, in what order, with which augmentation seed — one place for all of it.

Each item is (index, seed, size): the per-sample seed makes augmentation independent of worker count and
scheduling, and `start` skips what was already trained, so a run resumed mid-epoch sees exactly the batches
the uninterrupted run would have seen.
"""

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """multiple_of = batch size x accumulation steps: each rank's epoch ends on an optimiser update, so no
    gradients leak into the next epoch (where a checkpoint could not hold them)."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, multiple_of: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = n // world_size // multiple_of * multiple_of  # equal shards, whole updates
        self.epoch, self.size, self.start = 0, 224, 0

    def set_epoch(self, epoch: int, size: int, start: int = 0):
        """start: samples of this rank's shard already consumed in this epoch (resume)."""
        self.epoch, self.size, self.start = epoch, size, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        mine = order[self.rank: self.per_rank * self.world_size: self.world_size]
        for i in mine[self.start:].tolist():
            yield i, int(seeds[i]), self.size

    def __len__(self):
        return self.per_rank - self.start


class EvalSampler(Sampler):
    """Every sample exactly once across ranks: no padding, no duplicates (sums are reduced afterwards)."""

    def __init__(self, n: int, *, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, n, world_size)
        self.size = size

    def __iter__(self):
        for i in self.indices:
            yield i, 0, self.size

    def __len__(self):
        return len(self.indices)
