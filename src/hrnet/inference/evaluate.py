"""Top-1/top-5 over a labelled folder, single-process or sharded across a torchrun job.

Under torchrun each rank classifies indices ``rank, rank + N, ...`` of the sorted sample list and
the integer counts are summed, so the result equals the single-process one exactly, also when the
number of images does not divide by N. Unreadable files are skipped, listed, and left out of ``n``.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import DatasetError, ImageDataset, shard
from ..distributed import all_gather_objects, all_reduce_sum, init_distributed
from .predict import Classifier, PathLike


def evaluate(model_or_name: nn.Module | str, data: PathLike, *, ann_file: PathLike | None = None,
             checkpoint: PathLike | None = None, batch_size: int = 32, workers: int | None = None,
             device: str | None = None, input_size: int | None = None, crop_pct: float | None = None,
             per_class: bool = False, strict: bool = False, progress: bool = False,
             backend: str | None = None, precision: str | None = None, exclude_unknown: bool = False,
             compile_mode: str | None = None) -> dict:
    """Evaluate on ``data`` (ImageNet wnid folders, class folders, or ``ann_file`` lines).

    Returns ``{"top1", "top5", "n", "skipped": [{"file", "error"}], "images_per_s"}`` with accuracies in
    percent over the ``n`` images evaluated, plus ``"per_class": [{"index", "label", "n", "top1",
    "top5"}]`` (classes present in the data) when ``per_class``. Joins the torchrun job if there is one.
    ``backend`` is one of :data:`hrnet.deploy.BACKENDS`, ``precision`` one of
    :data:`hrnet.deploy.PRECISIONS`; a ``checkpoint`` ending in ``.onnx`` runs with onnxruntime (see
    :meth:`~hrnet.deploy.engine.Classifier.build`). ``exclude_unknown`` evaluates only the wnid
    folders of an ImageNet tree that also holds others (listed under ``"excluded"``) instead of refusing it.
    """
    info = init_distributed(device)
    clf = Classifier.build(model_or_name, checkpoint=checkpoint, device=info.device, input_size=input_size,
                           crop_pct=crop_pct, backend=backend, precision=precision,
                           progress=progress and info.is_main, compile_mode=compile_mode)
    num_classes = len(clf.labels)
    # Class folders are labelled by the model's own names where it has them (a subset folder is
    # labelled right, an unknown folder refused); without names their count must be the model's.
    dataset = ImageDataset(data, ann_file=ann_file, transform=clf.transform, exclude_unknown=exclude_unknown,
                           class_names=clf.names, num_classes=num_classes)
    top_label = max(label for _, label in dataset.samples)
    if top_label >= num_classes:
        raise DatasetError(f"{ann_file or data}: label {top_label} does not exist in a model with "
                           f"{num_classes} classes")
    k = min(5, num_classes)
    # per class: [images, top-1 hits, top-k hits]; summed over ranks at the end
    counts = torch.zeros(num_classes, 3, dtype=torch.long, device=clf.device)  # cpu for an ONNX file
    skipped = []
    start = time.perf_counter()
    for batch in clf.batches(shard(dataset, info.rank, info.world_size), batch_size, workers, strict=strict,
                             progress=progress and info.is_main, desc="eval"):
        skipped += [{"file": f.file, "error": f.error} for f in batch.failed]
        if not len(batch.indices):
            continue
        labels = batch.labels.to(clf.device)
        top = clf.logits(batch.images).topk(k, dim=1).indices
        hits = torch.stack([torch.ones_like(labels), top[:, 0] == labels, (top == labels[:, None]).any(1)], 1)
        counts.index_add_(0, labels, hits.long())
    elapsed = max(all_gather_objects(time.perf_counter() - start))
    counts = all_reduce_sum(counts).cpu()
    skipped = sorted((s for part in all_gather_objects(skipped) for s in part), key=lambda s: s["file"])
    n, top1, topk = counts.sum(0).tolist()
    result = {"top1": 100.0 * top1 / n if n else 0.0, "top5": 100.0 * topk / n if n else 0.0, "n": n,
              "skipped": skipped, "images_per_s": n / elapsed if elapsed > 0 else 0.0}
    if dataset.excluded:
        result["excluded"] = dataset.excluded
    if per_class:
        names = dataset.classes if dataset.layout == "folders" else clf.labels
        result["per_class"] = [{"index": c, "label": names[c], "n": cn, "top1": 100.0 * c1 / cn,
                                "top5": 100.0 * c5 / cn}
                               for c, (cn, c1, c5) in enumerate(counts.tolist()) if cn]
    return result
