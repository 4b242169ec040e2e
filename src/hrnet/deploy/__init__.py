"""Fast inference and export: the BN-folded model, backends, ONNX/.pt2 export, benchmarking."""

from .export import ExportError, export_metadata, export_onnx, export_pt2, load_pt2
from .fold import fuse_model
from .ort import BackendError, OnnxRuntimeRunner
from .runners import BACKENDS, PRECISIONS, PrecisionWarning, Runner, make_runner, native_bf16_cpu

__all__ = [
    "BACKENDS", "PRECISIONS", "BackendError", "ExportError", "OnnxRuntimeRunner", "PrecisionWarning", "Runner",
    "export_metadata", "export_onnx", "export_pt2", "fuse_model", "load_pt2", "make_runner", "native_bf16_cpu",
]
