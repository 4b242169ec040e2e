"""DataLoaders for inference: sharded so each image is seen exactly once, sized for the device."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader, Dataset, Subset

from .dataset import collate


#: The most loader processes :func:`default_workers` starts per GPU process.
MAX_WORKERS = 8


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's limit narrows)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(device: str, processes: int = 1) -> int:
    """Decoding processes per process for inference or training on ``device`` (``data.workers: auto``),
    ``processes`` sharing this machine (torchrun's local world size).

    On a GPU the CPU is otherwise idle, so up to :data:`MAX_WORKERS` processes keep the model fed,
    never more than the CPUs give each process. On the CPU the
    model's threads already use every core and a worker process only competes with them (2 cores,
    HRNet-W18, batch 32: 57 % of the bare model's throughput with one worker, 99 % without), while
    decoding in-process costs about 2 CPU ms per 500x375 JPEG against ~150 for the forward pass.
    """
    return max(1, min(MAX_WORKERS, cpu_count() // max(processes, 1))) if device.startswith("cuda") else 0


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Rank ``rank``'s share: indices ``rank, rank + N, ...``. Unlike DistributedSampler there is no
    padding, so when the length does not divide by N every image is still counted exactly once."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def inference_loader(dataset: Dataset, batch_size: int, workers: int | None = None, *,
                     device: str = "cpu") -> DataLoader:
    """In-order batches of :class:`~hrnet.data.Batch` (bad files dropped and listed) for ``device``;
    ``workers=None`` picks :func:`default_workers`."""
    workers = default_workers(device) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=device.startswith("cuda"), prefetch_factor=4 if workers else None)
