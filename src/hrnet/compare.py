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
from tqdm import tqdm

from .data import DatasetError, ImageDataset, ImageList, class_names, eval_transform, find_images, inference_loader
from .deploy import BACKENDS, PRECISIONS, BackendError, Runner, make_runner
from .errors import HRNetError


class SpecError(HRNetError):
    """A run spec that names no backend, precision or file we can run."""


@dataclass(frozen=True)
class RunSpec:
    """One way of running the model: a backend at a precision, or an ONNX file."""

    text: str  # as the user wrote it; names the run in reports
    backend: str  # one of BACKENDS, or "onnx-file"
    precision: str = "fp32"
    path: Path | None = None


def parse_spec(text: str) -> RunSpec:
    """``BACKEND[:PRECISION]`` or a path to an ``.onnx`` file, checked; a one-line error otherwise."""
    if text.lower().endswith(".onnx") or os.sep in text:
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
    if precision not in PRECISIONS:
        raise SpecError(f"{text}: unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    return RunSpec(text, backend, precision)  # what this machine cannot run is refused by build_runner


def _onnx_file_runner(spec: RunSpec) -> tuple[Runner, dict[str, str]]:
    from .deploy.ort import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(spec.path)
    return runner, runner.metadata


def build_runner(model: nn.Module, spec: RunSpec, input_size: int) -> Runner:
    """The runner of a backend spec (files are opened by :func:`_onnx_file_runner`)."""
    return make_runner(model, spec.backend, precision=spec.precision, input_size=(input_size, input_size))


def _onnx_input_size(spec: RunSpec, meta: dict[str, str], num_classes: int) -> int | None:
    """The square input size the file was built for (from its hrnet metadata), after checking its classes."""
    classes = meta.get("hrnet.num_classes")
    if classes is not None and int(classes) != num_classes:
        raise SpecError(f"{spec.text}: the file has {classes} classes, the model {num_classes}")
    size = meta.get("hrnet.input_size")
    if size is None:
        return None
    h, w = (int(v) for v in size.strip("[]").split(","))
    if h != w:
        raise SpecError(f"{spec.text}: the file's input is {h}x{w}; compare needs a square crop")
    return h


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
            input_size: int | None = None, crop_pct: float | None = None, progress: bool = False) -> dict:
    """Run specs ``a`` and ``b`` (see :func:`parse_spec`) over the images in ``data`` and compare them.

    ``data`` is a folder: class folders (ImageNet wnids, or any names for a model trained on them)
    add each run's accuracy; otherwise every image below it is used. CPU only. Returns
    ``{"a", "b", "n", "input_size", "top1_agreement", "top5_overlap", "max_prob_diff", "accuracy",
    "disagreements", "skipped", "seconds"}``: agreement and overlap in percent (top-5 overlap: mean
    share of the two top-5 sets in common), the largest absolute softmax difference over all images
    and classes, ``accuracy`` ``{"a": {"top1", "top5"}, "b": ...}`` or None when unlabelled, and one
    ``{"file", "a", "b"[, "label"]}`` record per image whose top-1 differs.
    """
    specs = {"a": parse_spec(a), "b": parse_spec(b)}
    if isinstance(model_or_name, nn.Module):
        if checkpoint is not None:
            raise TypeError("checkpoint applies to a model name, not to a built model")
        model = model_or_name
    else:
        from .builder import create_model

        model = create_model(model_or_name, pretrained=checkpoint is None, checkpoint=checkpoint, progress=progress)
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()  # leave the caller's model where it is
    model.eval()
    runners: dict[str, Runner] = {}
    for key, spec in specs.items():  # ONNX files first: their fixed input size sets the crop
        if spec.backend == "onnx-file":
            runners[key], meta = _onnx_file_runner(spec)
            size = _onnx_input_size(spec, meta, model.num_classes)
            if size is not None and input_size is not None and size != input_size:
                raise SpecError(f"{spec.text}: the file takes {size}x{size} images, not --input-size {input_size}")
            input_size = size or input_size
    transform = eval_transform(model, input_size, crop_pct)
    for key, spec in specs.items():
        if key not in runners:
            try:
                runners[key] = build_runner(model, spec, transform.input_size)
            except BackendError as e:
                raise SpecError(f"{spec.text}: {e}") from None
    dataset, labelled = _dataset(data, transform, model.num_classes)
    names = class_names(model.num_classes)
    if labelled and dataset.layout == "folders" and len(dataset.classes) == model.num_classes:
        names = dataset.classes  # a model trained on these folders: name its classes by them
    k = min(5, model.num_classes)
    n = agree = overlap = 0
    hits = {key: [0, 0] for key in specs}
    seconds = dict.fromkeys(specs, 0.0)
    max_diff = 0.0
    disagreements, skipped = [], []
    loader = inference_loader(dataset, batch_size, workers, device="cpu")
    with tqdm(total=len(dataset), unit="img", desc="compare", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            bar.update(len(batch.indices) + len(batch.failed))
            skipped += [{"file": f.file, "error": f.error} for f in batch.failed]
            if not len(batch.indices):
                continue
            probs = {}
            for key, run in runners.items():
                start = time.perf_counter()
                probs[key] = run(batch.images).float().softmax(dim=1)
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
