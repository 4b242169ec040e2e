"""File containers (safetensors, torch zip, legacy torch pickle, plain pickle, ONNX): recognising them and
reading them without ever executing code stored in them.

The container is recognised from the first bytes, not the file name: safetensors (a length-prefixed
JSON header), a torch zip, a legacy torch pickle (it starts with torch's pickled magic number), or
another pickle, which can only be a PaddlePaddle ``.pdparams`` dict of numpy arrays. Only regular
files are opened (a FIFO would block forever). Before anything is deserialised, :mod:`.preflight`
bounds the file's structure: pickle op count and nesting depth, and every declared tensor against
the bytes actually in the file. Torch files then go through ``torch.load(weights_only=True)``, which
also admits ``argparse.Namespace`` (timm training checkpoints keep their arguments in one) as an
inert attribute bag; Paddle pickles through an unpickler that admits numpy's array reconstruction
and nothing else. There is no fallback to a full unpickler. Finally the weights themselves are
checked (:func:`check_tensors`): non-finite values or integer parameters are refused by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, UnsafeCheckpointError
from .preflight import check_plain_pickle, check_safetensors, check_torch_legacy, check_torch_zip

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


class _NumpyOnlyPickler(pickle._Pickler):
    """The writer's side of :class:`_NumpyOnlyUnpickler`: it pickles numpy arrays, strings, numbers and plain
    containers, and refuses any other global before writing it. numpy's array rebuild function is written
    under its numpy 1.x name (``numpy.core.multiarray``), which numpy 2 still reads, so Paddle environments
    pinned to numpy 1.x load the file too."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _RECONSTRUCT:
            self.save("numpy.core.multiarray")
            self.save("_reconstruct")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
        elif obj in (np.ndarray, np.dtype):
            super().save_global(obj, name)
        else:
            raise pickle.PicklingError(f"refused to pickle {obj!r}: a .pdparams file holds numpy arrays only")


def numpy_pickle(content: dict[str, np.ndarray], path: str | os.PathLike) -> bytes:
    """``content`` (string keys, numeric numpy arrays) as a protocol-4 pickle, as ``paddle.save`` writes a
    state dict; read back through :class:`_NumpyOnlyUnpickler`, so what hrnet writes hrnet also admits."""
    for key, value in content.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            raise TypeError(f"{path}: a .pdparams file holds numeric numpy arrays only; {key!r} is "
                            f"{type(value).__name__}")
    buf = io.BytesIO()
    _NumpyOnlyPickler(buf, protocol=4).dump({k: np.ascontiguousarray(v) for k, v in content.items()})
    data = buf.getvalue()
    back = _NumpyOnlyUnpickler(io.BytesIO(data), Path(path)).load()
    if back.keys() != content.keys() or any(not np.array_equal(back[k], v) for k, v in content.items()):
        raise AssertionError("the .pdparams pickle does not read back")  # a bug, not bad input
    return data


def check_regular(path: Path, what: str = "checkpoint") -> None:
    """Refuse at once anything but a regular file (a FIFO would block the reader forever), naming it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or socket is never read as a {what})")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_torch(path: Path) -> tuple[Any, dict[str, str]]:
    try:
        # An open file, not the name: torch.load hands a name ending .safetensors to safetensors, whatever it holds.
        with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):  # inert: __dict__ only
            return torch.load(f, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error: (.+?)(?: was not| Please|\n|$)", str(e))
        detail = m.group(1).strip() if m else "a disallowed object"
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle ({detail}): a checkpoint may hold only tensors and plain "
            "containers; nothing in it was executed (a truncated file can also cause this)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        reason = re.split(r"\.\s", str(e), maxsplit=1)[0]  # torch's first sentence; the rest is advice
        raise CheckpointError(f"{path}: corrupt or truncated torch file ({reason})") from None


def _check_pickle(path: Path) -> None:
    with open(path, "rb") as f:
        check_plain_pickle(f, os.fstat(f.fileno()).st_size, str(path))


def _read_pickle(path: Path) -> tuple[Any, dict[str, str]]:
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, path).load(), {}
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # any malformed byte stream: report it as such, never as a traceback
            raise CheckpointError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from None


def _check_zip(path: Path) -> None:
    """The zip preflight, then every entry's CRC (a body cut or corrupted in the middle): for a download."""
    check_torch_zip(path)
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: corrupt torch file ({e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: entry {bad} is corrupt")


def _onnx(path: Path) -> None:
    raise CheckpointError(f"{path}: is an ONNX model, not a weights checkpoint (predict, eval and bench run it "
                          "as it is; convert reads the PyTorch or Paddle weights it was exported from)")


def _is_onnx(head: bytes) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version, a small varint), then field 2-8's tag."""
    return len(head) > 2 and head[0] == 0x08 and 0 < head[1] < 0x80 and head[2] in b"\x12\x1a\x22\x28\x32\x3a\x42"


@dataclasses.dataclass(frozen=True)
class Container:
    """One file container: how its first bytes look, its bounded preflight, its full check for a download
    (which also walks every byte), its reader (content and string metadata), and the file name it takes."""

    name: str
    matches: Callable[[bytes], bool]
    preflight: Callable[[Path], None]
    verify: Callable[[Path], None]
    read: Callable[[Path], tuple[Any, dict[str, str]]]
    suffixes: tuple[str, ...]


# The one registry of containers, in the order they are tried: every reader and the download cache use it.
CONTAINERS = (
    Container("safetensors", lambda h: h[8:9] == b"{", check_safetensors, check_safetensors, _read_safetensors,
              (".safetensors",)),  # 8-byte header length, then the JSON header
    Container("torch", lambda h: h.startswith(b"PK\x03\x04"), check_torch_zip, _check_zip, _read_torch,
              (".pth", ".pt", ".bin", ".ckpt", ".tar")),
    Container("torch-legacy", lambda h: h.startswith(_TORCH_LEGACY_MAGIC), check_torch_legacy, check_torch_legacy,
              _read_torch, (".pth", ".pt", ".bin", ".ckpt", ".tar")),
    Container("onnx", _is_onnx, _onnx, _onnx, _onnx, (".onnx",)),
    Container("pickle", lambda h: h[:1] == b"\x80" and len(h) > 2, _check_pickle, _check_pickle, _read_pickle,
              (".pdparams",)),
)


def sniff(path: str | os.PathLike) -> Container:
    """The container of a regular file, from its first bytes (never its name)."""
    path = Path(path)
    check_regular(path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    for c in CONTAINERS:
        if c.matches(head):
            return c
    raise CheckpointError(f"{path}: not a checkpoint (neither safetensors, a torch file nor a pickle)"
                          if head else f"{path}: the file is empty")


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file holding an ONNX model (from its bytes)."""
    try:
        return sniff(path).name == "onnx"
    except CheckpointError:
        return False


def container_for_name(path: str | os.PathLike) -> Container | None:
    """The container whose file names end like ``path`` (None for a name no container claims)."""
    name = os.fspath(path).lower()
    return next((c for c in CONTAINERS if name.endswith(c.suffixes)), None)


def check_tensors(sd: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights that would give silently wrong results, naming the tensors: NaN or Inf values,
    negative BatchNorm running variances, and integer or bool tensors where floats belong (every
    tensor but BatchNorm's ``num_batches_tracked`` counter)."""
    bad: list[str] = []
    for name, t in sd.items():
        if name.endswith("num_batches_tracked"):
            continue
        if not (t.is_floating_point() or t.is_complex()):
            bad.append(f"{name} is {str(t.dtype).removeprefix('torch.')}, not floating point")
        elif not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):  # the sum: no allocation
            bad.append(f"{name} holds NaN or Inf")
        elif name.endswith(("running_var", "_variance")) and bool((t < 0).any()):
            bad.append(f"{name} holds a negative variance")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: refused: {'; '.join(bad[:3])}{more}")


def read_file(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """The deserialised content of a checkpoint file and its string metadata (empty for pickled formats),
    read by the container its first bytes name, after that container's bounded preflight."""
    path = Path(path)
    kind = sniff(path)
    kind.preflight(path)
    return kind.read(path)
