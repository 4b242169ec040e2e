"""OpenVINO, Intel's inference runtime (fast on AMD too), as a backend: ``--backend openvino``.

It runs hrnet's ONNX files as they are: the fp32 export, and the int8 QDQ file of ``hrnet quantize``
(OpenVINO turns its QuantizeLinear/DequantizeLinear pairs into FakeQuantize and runs the
convolutions in int8; no NNCF needed). fp32 means fp32: OpenVINO's CPU plugin otherwise runs in
bf16 on CPUs with AVX512_BF16/AMX, so the inference precision is always set explicitly
(``INFERENCE_PRECISION_HINT``): f32 for fp32 and int8 files (the layers left unquantized), bf16 only
when bf16 is asked for. The file's ``hrnet.*`` metadata is read with the one reader of ort.py.
Needs the ``hrnet[openvino]`` extra.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..extras import require
from .export import export_onnx
from .ort import BackendError, INPUT_NAME, onnx_metadata

HINTS = {"fp32": "f32", "int8": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT for each precision


def import_openvino():
    """openvino, or a one-line error saying how to get it (it is an optional extra)."""
    require("openvino", "the openvino backend", error=BackendError)
    import openvino

    return openvino


def openvino_available() -> bool:
    """Whether the openvino extra is installed (looked up, not imported: importing takes a second)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVINORunner:
    """OpenVINO's CPU plugin on an hrnet ONNX file (dynamic batch), at ``precision``.

    One infer request per calling thread (a request is not thread-safe; serving calls from several).
    ``threads``: OpenVINO's ``INFERENCE_NUM_THREADS`` (default: its own choice, every core).

    A single image runs on a second compilation with the batch fixed to 1, made on first need: with
    the batch dynamic, OpenVINO re-plans shapes and memory at every call, which cost hrnet-w18 int8
    about a sixth of its batch-1 speed (2.42x against 2.88x onnxruntime on timm's export, measured
    alternating on a 2-core AMD EPYC); at batch 16 a fixed batch gained nothing.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32"):
        self.ov = import_openvino()
        if not os.path.isfile(path):
            raise BackendError(f"{path}: ONNX file not found")
        self.path = Path(path)
        self.config = {"INFERENCE_PRECISION_HINT": HINTS.get(precision, "f32")}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        self.compiled = self._compile()
        self._single = None  # the batch-1 compilation
        self._lock = threading.Lock()
        self._local = threading.local()
        self._metadata: dict[str, str] | None = None
        self.owned_dir: tempfile.TemporaryDirectory | None = None  # deleted with the runner

    @property
    def metadata(self) -> dict[str, str]:
        """The file's custom metadata (``hrnet.*`` keys), as ort.py's one reader reads it."""
        if self._metadata is None:
            self._metadata = onnx_metadata(self.path)
        return self._metadata

    def _compile(self, single_shape: tuple[int, ...] | None = None):
        """The CPU plugin's compilation of the file, with the batch fixed to 1 for ``single_shape``."""
        try:
            core = self.ov.Core()
            model = core.read_model(str(self.path))
            if single_shape is not None:
                model.reshape({model.inputs[0].get_any_name(): list(single_shape)})
            return core.compile_model(model, "CPU", self.config)
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{self.path}: OpenVINO cannot load it ({type(e).__name__}: {first[:200]})") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.shape[0] == 1
        if single and self._single is None:
            with self._lock:
                if self._single is None:
                    self._single = self._compile(tuple(x.shape))
        compiled = self._single if single else self.compiled
        key = "single" if single else "request"
        request = getattr(self._local, key, None)
        if request is None:
            request = compiled.create_infer_request()
            setattr(self._local, key, request)
        images = np.ascontiguousarray(x.detach().float().cpu().numpy())
        logits = request.infer({INPUT_NAME: images})[compiled.output(0)]
        return torch.from_numpy(np.array(logits, dtype=np.float32)).to(x.device)


def openvino_runner(model: nn.Module, input_size: tuple[int, int], threads: int | None,
                    precision: str = "fp32") -> OpenVINORunner:
    """``model`` (fused here) exported to a temporary fp32 ONNX file and run by OpenVINO at ``precision``."""
    import_openvino()  # fail before a long export, not after
    tmp = tempfile.TemporaryDirectory()
    path = export_onnx(model, Path(tmp.name) / "model.onnx", input_size=input_size, check=False)
    runner = OpenVINORunner(path, threads, precision)
    runner.owned_dir = tmp
    return runner
