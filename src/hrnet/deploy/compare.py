"""Two ways of running one model, side by side on the same images: how much do they agree?

A run is named by a spec (:func:`parse_spec`): ``BACKEND[:PRECISION]`` with a backend of
:data:`hrnet.deploy.BACKENDS` (``eager``, ``fused:bf16``, ``onnxruntime``), or the path of an ONNX
file (``w18.int8.onnx``, as written by ``hrnet quantize`` or ``hrnet export``). Each batch is decoded
once and both runners classify the same tensor, so every difference comes from the runners.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import DatasetError, ImageDataset, ImageList, find_images
from ..distributed import check_device
from ..errors import HRNetError
from .engine import Classifier, build_model
from .manifest import is_optimize_dir
from .ort import BackendError, is_onnx_file
from .runners import BACKENDS, precision_problem


class SpecError(HRNetError):
    """A run spec that names no backend, precision or file we can run."""


@dataclass(frozen=True)
class RunSpec:
    """One way of running the model: a backend at a precision, or an ONNX file."""

    text: str  # as the user wrote it; names the run in reports
    backend: str  # one of BACKENDS, "onnx-file" or "optimized" (an hrnet optimize directory)
    precision: str = "fp32"
    path: Path | None = None


def parse_spec(text: str) -> RunSpec:
    """``BACKEND[:PRECISION]``, a path to an ``.onnx`` file or an ``hrnet optimize`` directory (what it
    chose), checked; a one-line error otherwise."""
    if is_optimize_dir(text):
        return RunSpec(text, "optimized", path=Path(text))
    if is_onnx_file(text) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise SpecError(f"{text}: ONNX file not found")
        return RunSpec(text, "onnx-file", path=path)
    backend, _, precision = text.partition(":")
    precision = precision or "fp32"
    if backend not in BACKENDS:
        raise SpecError(f"{text}: unknown backend {backend!r}; use BACKEND[:PRECISION] with a backend of "
                        f"{', '.join(BACKENDS)}, or the path of an .onnx file")
    if precision == "int8":
        raise SpecError(f"{text}: int8 runs from a quantized file: 'hrnet quantize' it, then pass the .onnx path")
    if (problem := precision_problem(precision, backend, "cpu")) is not None:  # compare runs on the CPU
        raise SpecError(f"{text}: {problem}")
    return RunSpec(text, backend, precision)


def _dataset(data: str | os.PathLike, transform, num_classes: int) -> tuple[ImageDataset | ImageList, bool]:
    """Class folders (as ``hrnet eval`` reads them) give a labelled dataset; else every image under ``data``."""
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    try:
        dataset = ImageDataset(root, transform=transform)
    except DatasetError:
        files = find_images(root)
        if not files:
            raise DatasetError(f"{root}: no image files in this folder") from None
        return ImageList(files, transform=transform), False
    top = max(label for _, label in dataset.samples)
    if top >= num_classes:
        raise DatasetError(f"{root}: {len(dataset.classes)} class folders do not fit a model with "
                           f"{num_classes} classes")
    return dataset, True


def _top(probs: torch.Tensor, labels: list[str], i: int) -> dict:
    p, c = probs[i].max(0)
    return {"index": int(c), "label": labels[int(c)], "score": float(p)}


def compare(model_or_name: nn.Module | str, data: str | os.PathLike, a: str, b: str, *,
            checkpoint: str | os.PathLike | None = None, batch_size: int = 32, workers: int | None = None,
            input_size: int | None = None, crop_pct: float | None = None, progress: bool = False,
            device: str = "cpu") -> dict:
    """Run specs ``a`` and ``b`` (see :func:`parse_spec`) over the images in ``data`` and compare them.

    ``data`` is a folder: class folders (ImageNet wnids, or any names for a model trained on them)
    add each run's accuracy; otherwise every image below it is used. The PyTorch runs are on ``device``
    (default cpu; .onnx runs are on the CPU, with onnxruntime). Each run is a
    :class:`~hrnet.deploy.engine.Classifier`; an .onnx run is checked against the model as ``predict``
    checks it, and two .onnx runs load no PyTorch weights. Returns
    ``{"a", "b", "n", "input_size", "top1_agreement", "top5_overlap", "max_prob_diff", "accuracy",
    "disagreements", "skipped", "seconds"}``: agreement and overlap in percent (top-5 overlap: mean
    share of the two top-5 sets in common), the largest absolute softmax difference over all images
    and classes, ``accuracy`` ``{"a": {"top1", "top5"}, "b": ...}`` or None when unlabelled, and one
    ``{"file", "a", "b"[, "label"]}`` record per image whose top-1 differs.
    """
    specs = {"a": parse_spec(a), "b": parse_spec(b)}
    device = check_device(device)
    model = None

    def torch_model() -> nn.Module:
        """The PyTorch model on ``device`` (the caller's left where it is), built only if a run needs it:
        two .onnx runs load no weights and download nothing."""
        nonlocal model
        if model is None:
            model = build_model(model_or_name, checkpoint, progress=progress)
            if next(model.parameters()).device != torch.device(device):
                model = copy.deepcopy(model).to(device)
        return model

    runs: dict[str, Classifier] = {}
    for key, spec in specs.items():  # ONNX files first: their fixed input size sets the crop
        if spec.path is not None:
            runs[key] = Classifier.build(model_or_name, checkpoint=spec.path, input_size=input_size,
                                         crop_pct=crop_pct)
            input_size = runs[key].transform.input_size
    for key, spec in specs.items():
        if key not in runs:
            try:
                runs[key] = Classifier.build(torch_model(), device=device, input_size=input_size, crop_pct=crop_pct,
                                             backend=spec.backend, precision=spec.precision)
            except BackendError as e:
                raise SpecError(f"{spec.text}: {e}") from None
    first = runs["a"]
    transform, names = first.transform, first.labels
    num_classes = len(names)
    dataset, labelled = _dataset(data, transform, num_classes)
    if labelled and dataset.layout == "folders" and len(dataset.classes) == num_classes:
        names = dataset.classes  # a model trained on these folders: name its classes by them
    k = min(5, num_classes)
    n = agree = overlap = 0
    hits = {key: [0, 0] for key in specs}
    seconds = dict.fromkeys(specs, 0.0)
    max_diff = 0.0
    disagreements, skipped = [], []
    for batch in first.batches(dataset, batch_size, workers, strict=False, progress=progress, desc="compare"):
        skipped += [{"file": f.file, "error": f.error} for f in batch.failed]
        if not len(batch.indices):
            continue
        probs = {}
        for key, run in runs.items():
            start = time.perf_counter()
            probs[key] = run.logits(batch.images).softmax(dim=1)
            seconds[key] += time.perf_counter() - start
        tops = {key: p.topk(k, dim=1).indices for key, p in probs.items()}
        n += len(batch.indices)
        same = tops["a"][:, 0] == tops["b"][:, 0]
        agree += int(same.sum())
        overlap += sum(len(set(ra.tolist()) & set(rb.tolist())) for ra, rb in zip(tops["a"], tops["b"]))
        max_diff = max(max_diff, float((probs["a"] - probs["b"]).abs().max()))
        for key in specs:
            hits[key][0] += int((tops[key][:, 0] == batch.labels).sum())
            hits[key][1] += int((tops[key] == batch.labels[:, None]).any(1).sum())
        for row in (~same).nonzero().flatten().tolist():
            record = {"file": dataset.samples[int(batch.indices[row])][0],
                      "a": _top(probs["a"], names, row), "b": _top(probs["b"], names, row)}
            if labelled:
                label = int(batch.labels[row])
                record["label"] = {"index": label, "label": names[label]}
            disagreements.append(record)
    if not n:
        raise DatasetError(f"{data}: none of the {len(dataset)} images could be decoded")
    return {"a": a, "b": b, "n": n, "input_size": transform.input_size,
            "top1_agreement": 100.0 * agree / n, "top5_overlap": 100.0 * overlap / (n * k),
            "max_prob_diff": max_diff,
            "accuracy": {key: {"top1": 100.0 * h1 / n, "top5": 100.0 * h5 / n} for key, (h1, h5) in hits.items()}
            if labelled else None,
            "disagreements": disagreements, "skipped": skipped, "seconds": seconds}
