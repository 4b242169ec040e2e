"""Fast inference and export: the BN-folded model, backends, ONNX/.pt2 export, benchmarking, and ``hrnet.optimize`` (module optimize)."""

from .export import ExportError, export_metadata, export_onnx, export_pt2, load_pt2
from .fold import fuse_model
from .manifest import ManifestError, is_optimize_dir
from .openvino import OpenVINORunner
from .optimize import CANDIDATES, OptimizeError  # the function is hrnet.optimize (this name is the module)
from .ort import BackendError, OnnxRuntimeRunner
from .runners import BACKENDS, PRECISIONS, PrecisionWarning, Runner, make_runner, native_bf16_cpu

__all__ = [
    "BACKENDS", "CANDIDATES", "PRECISIONS", "BackendError", "ExportError", "ManifestError", "OnnxRuntimeRunner",
    "OpenVINORunner", "OptimizeError", "PrecisionWarning", "Runner", "export_metadata", "export_onnx", "export_pt2",
    "fuse_model", "is_optimize_dir", "load_pt2", "make_runner", "native_bf16_cpu",
]
