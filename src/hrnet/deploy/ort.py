"""ONNX files and onnxruntime, in one place: the optional import, the .onnx check, the one reader of
a file's ``hrnet.*`` metadata, sessions, and the runner for exported files.

An hrnet ONNX file takes ``images`` (float32 NCHW, normalised) and returns ``logits``.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import HRNetError, UsageError
from ..extras import require
from ..models import EvalConfig, ModelRecord
from ..weights.hrnet_format import parse_class_names

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class BackendError(HRNetError):
    """An unknown backend, or one whose optional dependency is missing."""


def check_file_precision(path: str | os.PathLike, meta: dict[str, str], precision: str | None) -> str:
    """The precision an ONNX file was written in (``hrnet.precision``, fp32 when absent); raise a one-line
    error if the user asked for another (None asks nothing): a file runs as it was written."""
    written = meta.get("hrnet.precision", "fp32")
    if precision not in (None, written):
        hint = " (make one with 'hrnet quantize')" if precision == "int8" else ""
        raise BackendError(f"{path}: --precision {precision} does not match this {written} file{hint}; an ONNX "
                           "file runs at the precision it was written in")
    return written


def import_onnxruntime():
    """onnxruntime, or a one-line error saying how to get it (it is an optional extra)."""
    require("onnx", "the onnxruntime backend", ("onnxruntime",), error=BackendError)
    import onnxruntime

    return onnxruntime


def is_onnx_file(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names an ONNX file (run by onnxruntime) rather than weights for a model."""
    return path is not None and os.fspath(path).lower().endswith(".onnx")


def onnx_metadata(source) -> dict[str, str]:
    """The custom metadata of an ONNX file (a path, or an onnxruntime session of it): the one reader."""
    session = source if hasattr(source, "get_modelmeta") else ort_session(source, 1)
    return dict(session.get_modelmeta().custom_metadata_map)


def onnx_class_names(path: str | os.PathLike, meta: dict[str, str], num_classes: int) -> tuple[str, ...] | None:
    """The class names an hrnet ONNX file's metadata carries (``hrnet.class_names``, checked like a
    checkpoint's), or None when it has none."""
    text = meta.get("hrnet.class_names")
    return None if text is None else parse_class_names(text, path, num_classes)


def onnx_info(path: str | os.PathLike, meta: dict[str, str], *, record: ModelRecord | None = None,
              num_classes: int | None = None, precision: str | None = None,
              input_size: int | None = None) -> tuple[EvalConfig, int, int, str]:
    """The preprocessing, (square) input side, class count and precision an hrnet ONNX file's metadata
    ``meta`` records, checked: one line naming the file if it has none, was written for a model other
    than ``record``, has other than ``num_classes`` classes, another ``precision`` (a file runs as it
    was written; None asks nothing) or another ``input_size``."""
    if "hrnet.num_classes" not in meta or "hrnet.input_size" not in meta:
        raise UsageError(f"{path}: not an ONNX file written by hrnet export or hrnet quantize "
                         "(no hrnet.* metadata: input size, preprocessing and classes are unknown)")
    if record is not None and meta.get("hrnet.model", record.name) != record.name:
        raise UsageError(f"{path}: the file holds {meta['hrnet.model']}, not {record.name}")
    prefix = "hrnet.preprocess."
    try:
        values = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        values = {k: v if k == "interpolation" else json.loads(v) for k, v in values.items()}
        cfg = EvalConfig.from_dict(values)
        h, w = json.loads(meta["hrnet.input_size"])
        classes = int(meta["hrnet.num_classes"])
    except (ValueError, TypeError) as e:
        raise UsageError(f"{path}: unreadable hrnet metadata ({e})") from None
    if h != w:
        raise UsageError(f"{path}: the graph's input is {h}x{w}; a centre crop is square")
    if num_classes is not None and classes != num_classes:
        raise UsageError(f"{path}: the file has {classes} classes, the model {num_classes}")
    if input_size not in (None, h):
        raise UsageError(f"{path}: the file takes {h}x{h} images, not --input-size {input_size}")
    return cfg, h, classes, check_file_precision(path, meta, precision)


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session with every graph optimisation and ``threads`` intra-op threads
    (default: onnxruntime's choice, one per physical core)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {first})") from None


class OnnxRuntimeRunner:
    """onnxruntime on an exported hrnet ONNX file, one batch chunk per core.

    A batch of at least two images is split into one chunk per thread, and each chunk runs on a
    single-threaded session concurrently (onnxruntime releases the GIL): every core then works on
    whole convolutions, with no intra-op synchronisation between the many small ones of HRNet.
    Smaller batches use a multi-threaded session, created on first need.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import_onnxruntime()
        self.path = Path(path)
        self.threads = threads or os.cpu_count() or 1
        self.serial = ort_session(self.path, 1)
        self.pool = ThreadPoolExecutor(self.threads)
        self._multi = None
        self.owned_dir: tempfile.TemporaryDirectory | None = None  # deleted with the runner

    @property
    def metadata(self) -> dict[str, str]:
        """The file's custom metadata: ``hrnet.*`` keys in files written by hrnet export/quantize."""
        return onnx_metadata(self.serial)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().float().cpu().contiguous().numpy()
        if len(images) >= 2 and self.threads > 1:
            chunks = np.array_split(images, min(self.threads, len(images)))
            outs = self.pool.map(lambda chunk: self.serial.run(None, {INPUT_NAME: chunk})[0], chunks)
            logits = np.concatenate(list(outs))
        else:
            if self._multi is None:
                self._multi = ort_session(self.path, self.threads)
            logits = self._multi.run(None, {INPUT_NAME: images})[0]
        return torch.from_numpy(logits).to(x.device)
