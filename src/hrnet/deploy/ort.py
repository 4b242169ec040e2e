"""onnxruntime, in one place: the optional import, sessions, and the runner for exported files.

An hrnet ONNX file takes ``images`` (float32 NCHW, normalised) and returns ``logits``.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..errors import HRNetError

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
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the onnxruntime backend needs onnxruntime: pip install 'hrnet[onnx]'") from None
    return onnxruntime


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
        return dict(self.serial.get_modelmeta().custom_metadata_map)

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
