"""Classify image files: top-k ImageNet classes with probabilities, bad files reported, never fatal."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..data import (Batch, EvalTransform, ImageList, ImageReadError, class_names, eval_transform, find_images,
                    inference_loader)
from ..deploy import Runner, make_runner
from ..distributed import default_device
from ..errors import UsageError
from ..models import EvalConfig, resolve

PathLike = str | os.PathLike


def is_onnx_file(checkpoint: PathLike | None) -> bool:
    """Whether ``checkpoint`` names an ONNX file (run by onnxruntime) rather than weights for a model."""
    return checkpoint is not None and os.fspath(checkpoint).lower().endswith(".onnx")


def _onnx_config(path: PathLike, meta: dict[str, str], name: str) -> tuple[EvalConfig, int, int]:
    """The evaluation pipeline, the graph's (square) input size and the class count an hrnet ONNX file
    carries (``hrnet export``/``quantize`` metadata), checked against the model ``name`` the user gave.
    The input size may differ from the pipeline's crop (exported with ``--input-size``): the crop then
    follows it at the pipeline's crop_pct, as ``--input-size`` does for a model."""
    record = resolve(name)  # an unknown name fails as it would without the file
    if "hrnet.num_classes" not in meta or "hrnet.input_size" not in meta:
        raise UsageError(f"{path}: not an ONNX file written by hrnet export or hrnet quantize "
                         "(no hrnet.* metadata: input size, preprocessing and classes are unknown)")
    if meta.get("hrnet.model", record.name) != record.name:
        raise UsageError(f"{path}: the file holds {meta['hrnet.model']}, not {record.name}")
    prefix = "hrnet.preprocess."
    try:
        values = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        values = {k: v if k == "interpolation" else json.loads(v) for k, v in values.items()}
        cfg = EvalConfig.from_dict(values)
        h, w = json.loads(meta["hrnet.input_size"])
        num_classes = int(meta["hrnet.num_classes"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: unreadable hrnet metadata ({e})") from None
    if h != w:
        raise UsageError(f"{path}: the graph's input is {h}x{w}; a centre crop is square")
    return cfg, h, num_classes


@dataclass
class Classifier:
    """A model ready for inference: where batches go, how images are prepared, what outputs mean."""

    model: nn.Module | None  # None for an ONNX file: onnxruntime holds the weights
    device: str
    transform: EvalTransform
    labels: list[str]
    runner: Runner

    @classmethod
    def build(cls, model_or_name: nn.Module | str, *, checkpoint: PathLike | None = None,
              device: str | None = None, input_size: int | None = None, crop_pct: float | None = None,
              backend: str | None = None, precision: str | None = None, threads: int | None = None,
              progress: bool = False) -> Classifier:
        """A model object as is, or a zoo name with ``checkpoint`` (else its published weights, with a
        download bar if ``progress``), run by ``backend`` (see :data:`hrnet.deploy.BACKENDS`, default
        eager) at ``precision`` (:data:`hrnet.deploy.PRECISIONS`, default fp32).

        A ``checkpoint`` ending in ``.onnx`` (``hrnet export`` or ``hrnet quantize``) runs with
        onnxruntime on CPU, with the input size, preprocessing and classes its metadata records;
        ``precision`` then checks the file (``int8`` insists on a quantized file). ``threads``: CPU
        threads for the model (``torch.set_num_threads``, and onnxruntime's sessions).
        """
        if threads:
            torch.set_num_threads(threads)
        if isinstance(model_or_name, nn.Module):
            if checkpoint is not None:
                raise TypeError("checkpoint applies to a model name, not to a built model")
            model = model_or_name
        elif is_onnx_file(checkpoint):
            return cls._from_onnx(model_or_name, checkpoint, input_size=input_size,
                                  crop_pct=crop_pct, backend=backend, precision=precision, threads=threads)
        else:
            from ..builder import create_model

            model = create_model(model_or_name, pretrained=checkpoint is None, checkpoint=checkpoint,
                                 progress=progress)
        device = device or default_device()
        model = model.to(device).eval()
        transform = eval_transform(model, input_size, crop_pct)
        runner = make_runner(model, backend or "eager", precision=precision or "fp32", threads=threads,
                             input_size=(transform.input_size, transform.input_size))
        return cls(model, device, transform, class_names(model.num_classes), runner)

    @classmethod
    def _from_onnx(cls, name: str, path: PathLike, *, input_size: int | None,
                   crop_pct: float | None, backend: str | None, precision: str | None,
                   threads: int | None) -> Classifier:
        """An hrnet ONNX file run by onnxruntime on the CPU (whatever the device); options that cannot
        apply to it are refused."""
        from ..deploy.ort import OnnxRuntimeRunner, check_file_precision, import_onnxruntime

        if backend not in (None, "onnxruntime"):
            raise UsageError(f"{path}: an ONNX file runs with the onnxruntime backend, not {backend}")
        if not os.path.isfile(path):
            raise UsageError(f"{path}: ONNX file not found")
        import_onnxruntime()  # a missing extra is its own one-line error
        try:
            runner = OnnxRuntimeRunner(path, threads)
        except Exception as e:  # onnxruntime raises its own types for a damaged file
            raise UsageError(f"{path}: onnxruntime cannot load it ({type(e).__name__})") from None
        meta = runner.metadata
        cfg, size, num_classes = _onnx_config(path, meta, name)
        check_file_precision(path, meta, precision)
        if input_size not in (None, size):
            raise UsageError(f"{path}: the file takes {size}x{size} images, not --input-size {input_size}")
        transform = eval_transform(cfg, size, crop_pct)
        return cls(None, "cpu", transform, class_names(num_classes), runner)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.runner(images.to(self.device, non_blocking=True)).float()

    def batches(self, dataset, batch_size: int, workers: int | None, *, strict: bool,
                progress: bool, desc: str) -> Iterator[Batch]:
        """The dataset's batches in order, with a progress bar over images; ``strict`` raises the
        first unreadable file (raised here, not in a worker, so the message stays one line)."""
        loader = inference_loader(dataset, batch_size, workers, device=self.device)
        with tqdm(total=len(dataset), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for batch in loader:
                if strict and batch.failed:
                    raise ImageReadError(batch.failed[0].error)
                bar.update(len(batch.indices) + len(batch.failed))
                yield batch


def expand_inputs(inputs: PathLike | Iterable[PathLike]) -> tuple[list[str], list[dict]]:
    """Files, directories (recursive, image extensions only) and globs → (files, error records).

    A file named explicitly is always tried, whatever its extension; an input that matches nothing
    becomes ``{"file": input, "error": ...}``. Order is kept, duplicates are dropped.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: dict[str, None] = {}
    missing = []
    for item in map(os.fspath, inputs):
        if os.path.isdir(item):
            found = find_images(item)
            if not found:
                missing.append({"file": item, "error": f"{item}: no image files in this directory"})
            files.update(dict.fromkeys(found))
        elif os.path.lexists(item):
            files[item] = None
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append({"file": item, "error": f"{item}: no such file, directory or glob match"})
            for m in matches:
                files.update(dict.fromkeys(find_images(m) if os.path.isdir(m) else [m]))
    return list(files), missing


def topk_records(probs: torch.Tensor, labels: list[str], k: int) -> list[list[dict]]:
    """``[{"index", "label", "score"}, ...]`` of the ``k`` most probable classes, per row."""
    scores, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"index": int(i), "label": labels[int(i)], "score": float(s)} for s, i in zip(srow, irow)]
            for srow, irow in zip(scores, idx)]


def predict(model_or_name: nn.Module | str, inputs: PathLike | Iterable[PathLike], *, topk: int = 5,
            checkpoint: PathLike | None = None, batch_size: int = 16, workers: int | None = None,
            device: str | None = None, input_size: int | None = None, crop_pct: float | None = None,
            strict: bool = False, progress: bool = False, backend: str | None = None,
            precision: str | None = None) -> list[dict]:
    """Classify every image in ``inputs`` (files, directories, globs).

    Returns one record per file, in input order: ``{"file", "topk": [{"index", "label", "score"}]}``
    with softmax probabilities, or ``{"file", "error"}`` for a file that could not be read (raised
    instead when ``strict``). Inputs that match nothing come last as error records. ``backend`` is
    one of :data:`hrnet.deploy.BACKENDS` (``eager``, ``fused``, ``compile``, ``onnxruntime``),
    ``precision`` one of :data:`hrnet.deploy.PRECISIONS`; a ``checkpoint`` ending in ``.onnx`` runs
    with onnxruntime (see :meth:`Classifier.build`).
    """
    if topk < 1:
        raise ValueError("topk must be at least 1")
    clf = Classifier.build(model_or_name, checkpoint=checkpoint, device=device, input_size=input_size,
                           crop_pct=crop_pct, backend=backend, precision=precision, progress=progress)
    files, missing = expand_inputs(inputs)
    if strict and missing:
        raise ImageReadError(missing[0]["error"])
    records: list[dict] = [{"file": f} for f in files]
    dataset = ImageList(files, transform=clf.transform)
    for batch in clf.batches(dataset, batch_size, workers, strict=strict, progress=progress, desc="predict"):
        for bad in batch.failed:
            records[bad.index]["error"] = bad.error
        if len(batch.indices):
            probs = clf.logits(batch.images).softmax(dim=1).cpu()
            for i, top in zip(batch.indices.tolist(), topk_records(probs, clf.labels, topk)):
                records[i]["topk"] = top
    return records + missing
