"""Training-state checkpoints that survive a crash at any instant.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
its final name (``os.replace`` is atomic), so a reader sees either the previous file or the
complete new one. Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import os
import random
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HRNetError
from ..fileio import atomic_write
from ..weights.errors import CheckpointError
from ..weights.preflight import check_torch_zip

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")


class ResumeError(HRNetError):
    """A training-state checkpoint that is missing, unreadable or from an incompatible run."""


REQUIRED = ("model", "optimizer", "scheduler", "scaler", "epoch", "batch_in_epoch", "step", "epoch_sums", "rng",
            "world_size", "global_batch")
NOT_STATE = "to start a new run from the weights in a file, pass --checkpoint PATH instead of --resume"


def first_nonfinite(tree: Any, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor in ``tree`` (nested dicts/lists) holding NaN or Inf."""
    if isinstance(tree, torch.Tensor):
        return (prefix or "tensor") if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        if (name := first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))) is not None:
            return name
    return None


def save_state(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically (readable as the umask allows)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_state`, loaded without unpickling arbitrary objects.

    Only a regular file is opened (a FIFO would block forever); its pickle is measured before anything
    is built (as for weights: :mod:`hrnet.weights.preflight`), so a deep or oversized pickle is refused
    instead of crashing the interpreter; and the result must hold every part of a training state, so
    a weights file or a foreign pickle is refused by name.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ResumeError(f"{path}: not a regular file; {NOT_STATE}")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # save_state writes torch's zip format, never anything else
                raise ResumeError(f"{path}: not a training checkpoint (not a torch zip file); {NOT_STATE}")
        check_torch_zip(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ResumeError(f"{path}: no such checkpoint") from None
    except CheckpointError as e:  # the preflight's own one-line reason
        raise ResumeError(f"{e}; {NOT_STATE}") from None
    except ResumeError:
        raise
    except OSError as e:  # a path through a non-directory, a directory, no permission
        raise ResumeError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ResumeError(f"{path}: not a readable training checkpoint ({type(e).__name__}); {NOT_STATE}") from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise ResumeError(f"{path}: not a training checkpoint (no {', '.join(missing[:3])}); {NOT_STATE}")
    return state


def checkpoints(folder: Path) -> list[Path]:
    """The step checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints."""
    for p in checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The state of every random generator this process uses, as tensors and plain values."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
