"""DataLoaders for inference: sharded so each image is seen exactly once, sized for the machine."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader, Dataset, Subset

from .dataset import collate


def default_workers() -> int:
    """Decoding processes: half the cores (at most 8), leaving the rest to the model's threads.

    On a 2-core machine that is one worker, which overlaps decoding with the forward pass.
    """
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Rank ``rank``'s share: indices ``rank, rank + N, ...``. Unlike DistributedSampler there is no
    padding, so when the length does not divide by N every image is still counted exactly once."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def inference_loader(dataset: Dataset, batch_size: int, workers: int | None = None, *,
                     pin_memory: bool = False) -> DataLoader:
    """In-order batches of :class:`~hrnet.data.Batch` (bad files dropped and listed)."""
    workers = default_workers() if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, prefetch_factor=4 if workers else None)
