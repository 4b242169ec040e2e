"""Optional dependencies, checked before any work starts so a missing one costs seconds, not minutes.

Each check imports every module an extra provides and raises one :class:`MissingExtraError` line
that names the ``pip install 'hrnet[EXTRA]'`` command which fixes it.
"""

from __future__ import annotations

import importlib

from .errors import HRNetError

EXTRAS = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),  # export needs onnx + onnxscript, running needs onnxruntime
    "digits": ("sklearn",),
    "openvino": ("openvino",),  # the openvino backend (it runs hrnet's ONNX files; export needs the onnx extra)  # scikit-learn ships the digit scans
}


class MissingExtraError(HRNetError, ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(extra: str, purpose: str, modules: tuple[str, ...] | None = None,
            error: type[HRNetError] = MissingExtraError) -> None:
    """Import every module of ``extra`` (see :data:`EXTRAS`; or only ``modules`` of it, for a use that
    needs fewer), or raise ``error`` naming what is missing and the one command that installs it;
    ``purpose`` says what needed it (e.g. ``"hrnet export"``)."""
    missing = []
    for module in modules or EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise error(f"{purpose} needs {', '.join(missing)}: pip install 'hrnet[{extra}]' (not installed)")
