"""Inference backends behind one call: ``make_runner(model, backend)(images) -> logits``.

Every runner takes a float32 NCHW batch (CPU or GPU) and returns the logits as a float32 tensor on
the same device, so ``predict``/``eval`` and user code switch backends without other changes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .export import export_onnx
from .fold import fuse_model, is_folded
from .ort import BackendError, OnnxRuntimeRunner, import_onnxruntime

Runner = Callable[[torch.Tensor], torch.Tensor]

BACKENDS: tuple[str, ...] = ("eager", "fused", "compile", "onnxruntime")
"""eager: the model as built (the reference); fused: BN-folded channels_last copy in eager PyTorch;
compile: the fused copy through torch.compile (inductor, frozen weights); onnxruntime: the fused copy
exported to ONNX and run by onnxruntime (needs the ``hrnet[onnx]`` extra)."""


def _eager(model: nn.Module) -> Runner:
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def _fused(model: nn.Module) -> nn.Module:
    return model if is_folded(model) else fuse_model(model)


def _channels_last(model: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last))
    return run


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _compile(model: nn.Module, input_size: tuple[int, int]) -> Runner:
    fused = _fused(model)
    # freezing folds the (already BN-folded) weights into constants and lets inductor pick
    # oneDNN's weight-prepacked convolutions; it only applies under no_grad/inference_mode.
    compiled = torch.compile(fused, options={"freezing": True}, dynamic=False)
    if _device(fused).type == "cpu":  # inductor looks for a CUDA toolkit and warns when it finds none
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    run = _channels_last(compiled)
    run(torch.zeros(1, 3, *input_size, device=_device(fused)))  # compile now, not on the first real batch
    return run


def _onnxruntime(model: nn.Module, input_size: tuple[int, int], threads: int | None) -> OnnxRuntimeRunner:
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
