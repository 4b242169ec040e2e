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
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32"):
        ov = import_openvino()
        if not os.path.isfile(path):
            raise BackendError(f"{path}: ONNX file not found")
        self.path = Path(path)
        config = {"INFERENCE_PRECISION_HINT": HINTS.get(precision, "f32")}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        try:
            self.compiled = ov.Core().compile_model(str(self.path), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BackendError(f"{path}: OpenVINO cannot load it ({type(e).__name__}: {first[:200]})") from None
        self._local = threading.local()
        self._metadata: dict[str, str] | None = None
        self.owned_dir: tempfile.TemporaryDirectory | None = None  # deleted with the runner

    @property
    def metadata(self) -> dict[str, str]:
        """The file's custom metadata (``hrnet.*`` keys), as ort.py's one reader reads it."""
        if self._metadata is None:
            self._metadata = onnx_metadata(self.path)
        return self._metadata

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        images = np.ascontiguousarray(x.detach().float().cpu().numpy())
        logits = request.infer({INPUT_NAME: images})[self.compiled.output(0)]
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
