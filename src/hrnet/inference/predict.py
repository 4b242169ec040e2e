"""Classify image files: top-k ImageNet classes with probabilities, bad files reported, never fatal.

The model is run by :class:`hrnet.deploy.engine.Classifier`, the funnel every command goes through."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from torch import nn

from ..data import ImageReadError, find_images
from ..deploy.engine import Classifier, PathLike, check_topk, topk_records

__all__ = ["Classifier", "PathLike", "expand_inputs", "predict", "topk_records"]


def expand_inputs(inputs: PathLike | Iterable[PathLike], strict: bool = False) -> tuple[list[str], list[dict]]:
    """Files, directories (recursive, image extensions only) and globs → (files, error records).

    A file named explicitly is always tried, whatever its extension; an input that matches nothing
    becomes ``{"file": input, "error": ...}`` (raised instead when ``strict``). Order is kept,
    duplicates are dropped.
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
    if strict and missing:
        raise ImageReadError(missing[0]["error"])
    return list(files), missing


def predict(model_or_name: nn.Module | str, inputs: PathLike | Iterable[PathLike], *, topk: int = 5,
            checkpoint: PathLike | None = None, batch_size: int = 16, workers: int | None = None,
            device: str | None = None, input_size: int | None = None, crop_pct: float | None = None,
            strict: bool = False, progress: bool = False, backend: str | None = None,
            precision: str | None = None, compile_mode: str | None = None) -> list[dict]:
    """Classify every image in ``inputs`` (files, directories, globs).

    Returns one record per file, in input order: ``{"file", "topk": [{"index", "label", "score"}]}``
    with softmax probabilities, or ``{"file", "error"}`` for a file that could not be read (raised
    instead when ``strict``). Inputs that match nothing come last as error records. ``backend`` is
    one of :data:`hrnet.deploy.BACKENDS` (``eager``, ``fused``, ``compile``, ``onnxruntime``),
    ``precision`` one of :data:`hrnet.deploy.PRECISIONS`; a ``checkpoint`` ending in ``.onnx`` runs
    with onnxruntime (see :meth:`hrnet.deploy.engine.Classifier.build`).
    """
    check_topk(topk)
    clf = Classifier.build(model_or_name, checkpoint=checkpoint, device=device, input_size=input_size,
                           crop_pct=crop_pct, backend=backend, precision=precision, progress=progress,
                           compile_mode=compile_mode)
    files, missing = expand_inputs(inputs, strict)
    records = [r for _, r in clf.predictions(files, topk=topk, batch_size=batch_size, workers=workers,
                                             strict=strict, progress=progress)]
    return records + missing
