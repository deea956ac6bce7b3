"""Which samples each rank sees, in what order, with which augmentation seed — one place for all of it.

Each item is (index, seed, size): the per-sample seed makes augmentation independent of worker count and
scheduling, and `start` skips what was already trained, so a run resumed mid-epoch sees exactly the batches
the uninterrupted run would have seen.
"""

import torch
from torch.utils.data import Sampler


class TrainSampler(Sampler):
    """One global permutation per epoch, dealt to the ranks in turn: rank r takes items start+r, start+r+W, ...
    So after k updates the ranks together have consumed exactly the first k x global-batch items, whatever the
    world size, and a run saved on 4 processes continues on 2 (or 8) with every sample of the epoch seen once.
    multiple_of = batch size x accumulation steps: each rank's epoch ends on an optimiser update, so no
    gradients leak into the next epoch (where a checkpoint could not hold them)."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1, multiple_of: int = 1):
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.epoch_len = n // (world_size * multiple_of) * (world_size * multiple_of)  # whole global updates
        self.per_rank = self.epoch_len // world_size
        self.epoch, self.size, self.start = 0, 224, 0

    def set_epoch(self, epoch: int, size: int, start: int = 0):
        """start: samples of this epoch already consumed by all ranks together (resume)."""
        self.epoch, self.size, self.start = epoch, size, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        seeds = torch.randint(2**62, (self.n,), generator=g)
        for i in order[self.start + self.rank: self.epoch_len: self.world_size].tolist():
            yield i, int(seeds[i]), self.size

    def __len__(self):
        return len(range(self.start + self.rank, self.epoch_len, self.world_size))


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
