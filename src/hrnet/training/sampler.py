"""Sample order and augmentation that depend only on (seed, epoch, position).

That makes a run reproducible across restarts, worker counts and process counts: a resumed run
skips the batches already done and sees exactly the samples, in the same order and with the same
random crops, that the uninterrupted run would have seen; and ``N`` processes with batch ``B``
see together what one process with batch ``N x B`` sees. The position in an epoch is a global
sample index, not a per-rank step, so a run resumed on another number of processes (with the same
global batch) continues where the interrupted one stopped, each sample seen exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size x world_size`` samples cut from a permutation seeded by
    (seed, epoch); this rank takes its contiguous slice of each. The last incomplete global batch
    is dropped so every rank runs the same number of steps. ``set_epoch(e, start)`` reseeds the
    permutation and starts at global sample index ``start`` (a mid-epoch resume: the samples done
    by all ranks together), which must be a multiple of the global batch."""

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        step = self.batch_size * self.world_size
        if start % step:
            raise ValueError(f"start {start} is not a multiple of the global batch {step}")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        step = self.batch_size * self.world_size
        for b in range(self.start // step, self.batches_per_epoch):
            first = b * step + self.rank * self.batch_size
            yield order[first:first + self.batch_size].tolist()


class EpochSeeded(Dataset):
    """Wraps a dataset so the random transform of sample ``i`` in epoch ``e`` draws from a torch
    generator seeded by (seed, e, i) alone, whatever process or worker loads it. The caller's own
    random state is left untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue lazy CUDA/XPU/MTIA seeding,
            # each recording a stack trace, ~1 ms per sample.
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]
