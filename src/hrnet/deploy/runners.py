"""Inference backends behind one call: ``make_runner(model, backend, precision=...)(images) -> logits``.

Every runner takes a float32 NCHW batch (CPU or GPU) and returns the logits as a float32 tensor on
the same device, so ``predict``/``eval`` and user code switch backends and precisions without other
changes. Precision is orthogonal to the backend: bf16 runs oneDNN's native kernels on CPUs with
AVX512_BF16/AMX, bf16/fp16 run autocast on GPUs; int8 comes only from an ``hrnet quantize`` file.
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .export import export_onnx
from .fold import fuse_model, is_folded
from .openvino import openvino_available, openvino_runner
from .ort import BackendError, OnnxRuntimeRunner, import_onnxruntime

Runner = Callable[[torch.Tensor], torch.Tensor]

BACKENDS: tuple[str, ...] = ("eager", "fused", "compile", "onnxruntime", "openvino")
"""eager: the model as built (the reference); fused: BN-folded channels_last copy in eager PyTorch;
compile: the fused copy through torch.compile (inductor, frozen weights); onnxruntime: the fused copy
exported to ONNX and run by onnxruntime (needs the ``hrnet[onnx]`` extra); openvino: the same export run
by OpenVINO on the CPU (``hrnet[openvino]``; fp32, int8 files, bf16 on CPUs with native bf16)."""

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
"""fp32: exact; bf16: CPUs with AVX512_BF16/AMX and GPUs; fp16: GPUs; int8: an ``hrnet quantize`` ONNX file."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")
"""torch.compile modes of the ``compile`` backend. default: inductor's kernels; reduce-overhead: the same
replayed as CUDA graphs (one graph per batch shape; pays where launches dominate, at small batches on a
GPU; on CPU it is the default mode); max-autotune: also benchmarks kernel choices while compiling
(minutes), with CUDA graphs on a GPU. The default is ``default`` everywhere: which mode wins at which
batch on a GPU is what ``benchmarks/bench_gpu.py`` measures (docs/guides/gpu.md)."""
QUANTIZE_HINT = ("int8 runs from a quantized ONNX file: run 'hrnet quantize NAME --calib DIR -o OUT.onnx' and pass "
                 "OUT.onnx as --checkpoint")


class PrecisionWarning(UserWarning):
    """A precision that runs, but without the hardware support that makes it fast."""


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag of
    /proc/cpuinfo). oneDNN emulates bf16 on other AVX-512 CPUs, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read(1 << 20).split())
    except OSError:  # not Linux: no way to tell, so no promise either
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def precision_problem(precision: str, backend: str, device: str) -> str | None:
    """The one table of which precision runs with which backend on which device ("cpu", "cuda"...):
    None where ``backend`` runs ``precision`` on ``device``, else the one-line reason it does not."""
    if precision not in PRECISIONS:
        return f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
    if backend == "openvino" and not openvino_available():
        return "the openvino backend needs openvino: pip install 'hrnet[openvino]' (not installed)"
    if backend == "openvino" and device != "cpu":
        return "the openvino backend runs on the CPU; use --device cpu"
    if backend == "openvino" and precision == "bf16" and not native_bf16_cpu():
        return "openvino:bf16 needs a CPU with native bf16 (AVX512_BF16 or AMX); use fp32 or an int8 file"
    if precision == "int8":
        return QUANTIZE_HINT
    if precision != "fp32" and backend == "onnxruntime":
        return (f"{precision} is not available with the onnxruntime backend (it runs fp32 models and "
                f"int8 files); use --backend fused or compile for {precision}")
    if backend == "onnxruntime" and device != "cpu":
        return (f"the onnxruntime backend runs on the CPU (its CPU provider), not on {device}; on a GPU use "
                "--backend eager, fused or compile")
    if precision == "fp16" and device == "cpu":
        return ("fp16 needs a GPU (it is the GPU path; PyTorch's CPU fp16 convolutions are no faster "
                "than fp32); on CPU use bf16 (AVX512_BF16/AMX) or int8 ('hrnet quantize')")
    return None


def check_precision(precision: str, backend: str, device: str) -> None:
    """Raise a one-line BackendError unless ``backend`` can run ``precision`` on ``device`` (see
    :func:`precision_problem`); warn (PrecisionWarning) where it runs without native support."""
    if (problem := precision_problem(precision, backend, device)) is not None:
        raise BackendError(problem)
    if precision == "bf16" and device == "cpu" and not native_bf16_cpu():
        warnings.warn("this CPU has no native bf16 (AVX512_BF16 or AMX): bf16 runs emulated, slower than fp32; "
                      "int8 ('hrnet quantize') is the fast path here", PrecisionWarning, stacklevel=3)


def check_compile_mode(mode: str | None, backend: str | None) -> None:
    """A one-line BackendError for an unknown ``mode``, or a mode with a backend that compiles nothing."""
    if mode is None:
        return
    if mode not in COMPILE_MODES:
        raise BackendError(f"unknown compile mode {mode!r}; choose one of: {', '.join(COMPILE_MODES)}")
    if backend != "compile":
        raise BackendError(f"--compile-mode {mode} applies to --backend compile, not {backend or 'eager'}")


def serving_backend(precision: str | None, device: str | None = None) -> str:
    """The backend to serve with unless one is named: on CPU onnxruntime, the fastest fp32 there (and the
    runner of .onnx files), or ``fused`` for bf16/fp16, which onnxruntime does not run; on a GPU
    ``fused`` (onnxruntime runs on the CPU only; ``compile`` is the user's choice, see
    :func:`hrnet.deploy.engine.device_defaults`)."""
    if device is not None and device.startswith("cuda"):
        return "fused"
    return "onnxruntime" if precision in (None, "fp32", "int8") else "fused"


def _eager(model: nn.Module) -> Runner:
    model.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)
    return run


def _autocast(run: Runner, dtype: torch.dtype) -> Runner:
    """``run`` under autocast to ``dtype`` (convolutions and matmuls in ``dtype``), float32 logits out."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=dtype):
            return run(x).float()
    return wrapped


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A ``dtype`` channels_last copy of the fused model (the caller's model is never modified)."""
    fused = _fused(model)
    if fused is model:
        fused = copy.deepcopy(model)
    return fused.to(dtype=dtype, memory_format=torch.channels_last)


def _cast_input(run: Runner, dtype: torch.dtype) -> Runner:
    """``run`` of a ``dtype`` model: the float32 batch is cast on the way in, the logits back to float32."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        return run(x.to(dtype)).float()
    return wrapped


def _fused(model: nn.Module) -> nn.Module:
    return model if is_folded(model) else fuse_model(model)


def _channels_last(model: nn.Module) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.contiguous(memory_format=torch.channels_last))
    return run


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _owned(run: Runner) -> Runner:
    """``run`` whose output is a fresh tensor: a CUDA-graph replay writes its outputs into the same memory
    every time, so logits kept by the caller would change under them at the next call."""
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        return run(x).clone()
    return wrapped


def _compile(model: nn.Module, input_size: tuple[int, int], wrap: Callable[[Runner], Runner] = lambda r: r,
             mode: str = "default") -> Runner:
    """torch.compile of the fused model (or of ``model`` if it is already folded) in ``mode`` (one of
    COMPILE_MODES); ``wrap`` adds a precision around the compiled call, and the warm-up compiles
    through it."""
    fused = _fused(model)
    # freezing folds the (already BN-folded) weights into constants (oneDNN's weight-prepacked
    # convolutions on CPU, constant-folded layouts on GPU); it only applies under no_grad/inference_mode.
    compiled = torch.compile(fused, options={"freezing": True}, dynamic=False,
                             mode=None if mode == "default" else mode)
    if _device(fused).type == "cpu":  # inductor looks for a CUDA toolkit and warns when it finds none
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    run = wrap(_channels_last(compiled))
    if mode != "default" and _device(fused).type == "cuda":
        run = _owned(run)
    run(torch.zeros(1, 3, *input_size, device=_device(fused)))  # compile now, not on the first real batch
    return run


def _onnxruntime(model: nn.Module, input_size: tuple[int, int], threads: int | None) -> OnnxRuntimeRunner:
    import_onnxruntime()  # fail before a long export, not after
    tmp = tempfile.TemporaryDirectory()
    path = export_onnx(model, Path(tmp.name) / "model.onnx", input_size=input_size, check=False)
    runner = OnnxRuntimeRunner(path, threads)
    runner.owned_dir = tmp  # the multi-threaded session may still need the file
    return runner


def _reduced(model: nn.Module, backend: str, dtype: torch.dtype, input_size: tuple[int, int],
             mode: str = "default") -> Runner:
    """bf16/fp16 runners. ``eager``: autocast over the model as built. CPU ``fused``/``compile``: a
    copy of the fused model with its weights cast to ``dtype`` in channels_last, run without autocast
    (oneDNN's native avx512_core_bf16 convolutions either way; autocast re-casts every weight on every
    call, and was no faster in rough probes). GPU: autocast over the fused channels_last model."""
    if backend == "eager":
        return _autocast(_eager(model), dtype)
    if next(model.parameters()).device.type == "cpu":
        cast = _cast(model, dtype)
        if backend == "fused":
            return _cast_input(_channels_last(cast), dtype)
        return _compile(cast, input_size, lambda run: _cast_input(run, dtype), mode)
    if backend == "fused":
        return _autocast(_channels_last(_fused(model)), dtype)
    return _compile(model, input_size, lambda run: _autocast(run, dtype), mode)


def make_runner(model: nn.Module, backend: str = "eager", *, precision: str = "fp32",
                input_size: tuple[int, int] = (224, 224), threads: int | None = None,
                compile_mode: str | None = None) -> Runner:
    """A callable mapping a float32 NCHW image batch to float32 logits with ``backend`` (one of
    BACKENDS) at ``precision`` (one of PRECISIONS).

    ``model`` is an eval-ready :class:`~hrnet.models.hrnet.HRNet` classifier (for ``eager``, any
    module). ``input_size`` is the (H, W) the ``compile`` backend is warmed up on and the
    ``onnxruntime`` graph is exported for. ``threads`` sets how many cores onnxruntime uses
    (default: all); the PyTorch backends follow ``torch.set_num_threads``. The model itself is never
    modified: the optimised backends work on a fused copy. ``bf16``/``fp16`` run the PyTorch
    backends in that dtype (see :func:`check_precision` for what is refused or warned about); int8
    is a quantized file, run by :class:`~hrnet.deploy.ort.OnnxRuntimeRunner`, not a model here.
    ``compile_mode`` (one of COMPILE_MODES, default ``default``) applies to the compile backend only.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    check_compile_mode(compile_mode, backend)
    mode = compile_mode or "default"
    check_precision(precision, backend, next(model.parameters()).device.type)
    if backend == "openvino":
        return openvino_runner(model, input_size, threads, precision)
    if precision != "fp32":
        return _reduced(model, backend, DTYPES[precision], input_size, mode)
    if backend == "eager":
        return _eager(model)
    if backend == "fused":
        return _channels_last(_fused(model))
    if backend == "compile":
        return _compile(model, input_size, mode=mode)
    return _onnxruntime(model, input_size, threads)
