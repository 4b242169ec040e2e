"""Optional dependencies, checked before any work starts so a missing one costs seconds, not minutes.

Each check imports every module an extra provides and raises one :class:`MissingExtraError` line
that names the ``pip install 'hrnet[EXTRA]'`` command which fixes it.
"""

from __future__ import annotations

import importlib

from .errors import HRNetError

EXTRAS = {
    "onnx": ("onnx", "onnxruntime", "onnxscript"),  # export needs onnx + onnxscript, running needs onnxruntime
    "digits": ("sklearn",),  # scikit-learn ships the digit scans
}


class MissingExtraError(HRNetError, ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(extra: str, purpose: str) -> None:
    """Import every module of ``extra`` (see :data:`EXTRAS`), or raise naming what is missing and the
    one command that installs it; ``purpose`` says what needed it (e.g. ``"hrnet export"``)."""
    missing = []
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}, which {verb} not installed; "
                                f"pip install 'hrnet[{extra}]'")
