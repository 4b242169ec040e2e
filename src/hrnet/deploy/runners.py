"""Inference backends behind one call: ``make_runner(model, backend)(images) -> logits``.

Every runner takes a float32 NCHW batch (CPU or GPU) and returns the logits as a float32 tensor on
the same device, so ``predict``/``eval`` and user code switch backends without other changes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import HRNetError
from .export import INPUT_NAME
from .optimize import FusedHRNet, fuse_model

Runner = Callable[[torch.Tensor], torch.Tensor]

BACKENDS: tuple[str, ...] = ("eager", "fused", "compile", "onnxruntime")
"""eager: the model as built (the reference); fused: BN-folded channels_last copy in eager PyTorch;
compile: the fused copy through torch.compile (inductor, frozen weights); onnxruntime: the fused copy
exported to ONNX and run by onnxruntime (needs the ``hrnet[onnx]`` extra)."""


class BackendError(HRNetError):
    """An unknown backend, or one whose optional dependency is missing."""


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
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _eager(model: nn.Module) -> Runner:
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def _fused(model: nn.Module) -> FusedHRNet:
    return model if isinstance(model, FusedHRNet) else fuse_model(model)


def _channels_last(model: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last))
    return run


def _compile(model: nn.Module, input_size: tuple[int, int]) -> Runner:
    fused = _fused(model)
    # freezing folds the (already BN-folded) weights into constants and lets inductor pick
    # oneDNN's weight-prepacked convolutions; it only applies under no_grad/inference_mode.
    compiled = torch.compile(fused, options={"freezing": True}, dynamic=False)
    run = _channels_last(compiled)
    ref = next(fused.parameters())
    run(torch.zeros(1, 3, *input_size, device=ref.device))  # compile now, not on the first real batch
    return run


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


def _onnxruntime(model: nn.Module, input_size: tuple[int, int], threads: int | None) -> OnnxRuntimeRunner:
    from .export import export_onnx

    import_onnxruntime()  # fail before a long export, not after
    tmp = tempfile.TemporaryDirectory()
    path = export_onnx(model, Path(tmp.name) / "model.onnx", input_size=input_size, check=False)
    runner = OnnxRuntimeRunner(path, threads)
    runner.owned_dir = tmp  # the multi-threaded session may still need the file
    return runner


def make_runner(model: nn.Module, backend: str = "eager", *, input_size: tuple[int, int] = (224, 224),
                threads: int | None = None) -> Runner:
    """A callable mapping a float32 NCHW image batch to logits with ``backend`` (one of BACKENDS).

    ``model`` is an eval-ready :class:`~hrnet.models.hrnet.HRNet` classifier (for ``eager``, any
    module). ``input_size`` is the (H, W) the ``compile`` backend is warmed up on and the
    ``onnxruntime`` graph is exported for. ``threads`` sets how many cores onnxruntime uses
    (default: all); the PyTorch backends follow ``torch.set_num_threads``. The model itself is never
    modified: the optimised backends work on a fused copy.
    """
    if backend == "eager":
        return _eager(model)
    if backend == "fused":
        return _channels_last(_fused(model))
    if backend == "compile":
        return _compile(model, input_size)
    if backend == "onnxruntime":
        return _onnxruntime(model, input_size, threads)
    raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
