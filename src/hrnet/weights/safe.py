"""Reading checkpoint containers without ever executing code stored in them.

The container is recognised from the first bytes, not the file name: safetensors (a length-prefixed
JSON header), a torch zip, a legacy torch pickle (it starts with torch's pickled magic number), or
another pickle, which can only be a PaddlePaddle ``.pdparams`` dict of numpy arrays. Torch files go
through ``torch.load(weights_only=True)``; Paddle pickles through an unpickler that admits numpy's
array reconstruction and nothing else. There is no fallback to a full unpickler.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, UnsafeCheckpointError

HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
_TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)  # torch.save's first record
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array rebuild function, whatever module numpy keeps it in


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Protocol-2 pickles spell bytes as ``_codecs.encode(str, "latin1")``; nothing else is admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


# Everything a pickled dict of numpy arrays needs, and nothing more.
_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals needed to rebuild numpy arrays; any other global is refused before use."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _NUMPY_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.path}: refused: the pickle asks for {module}.{name}, but a plain-pickle checkpoint "
                "(PaddlePaddle .pdparams) may only hold numpy arrays; nothing in it was executed") from None


def container(path: Path) -> str:
    """'safetensors', 'torch' (zip or legacy pickle) or 'pickle', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    if head[:1] == b"\x80" and len(head) > 2:
        return "pickle"
    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors, a torch file nor a pickle)"
                          if head else f"{path}: the file is empty")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error: (.+?)(?: was not| Please|\n|$)", str(e))
        detail = m.group(1).strip() if m else "a disallowed object"
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle ({detail}): a checkpoint may hold only tensors and plain "
            "containers; nothing in it was executed (a truncated file can also cause this)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = re.split(r"\.\s", str(e), maxsplit=1)[0]  # torch's first sentence; the rest is advice
        raise CheckpointError(f"{path}: corrupt or truncated torch file ({reason})") from None


def _read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # any malformed byte stream: report it as such, never as a traceback
            raise CheckpointError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


def read_file(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The deserialised content of a checkpoint file or hub directory, and its string metadata.

    A directory must hold ``model.safetensors`` (its ``config.json`` is for hub tooling; the weights
    file carries the same metadata). Metadata is empty for pickled formats.
    """
    path = Path(path)
    if path.is_dir():
        weights = path / HUB_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{path}: a checkpoint directory must contain {HUB_WEIGHTS}")
        path = weights
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    kind = container(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    return (_read_torch(path) if kind == "torch" else _read_pickle(path)), {}

