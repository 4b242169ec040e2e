"""Training-state checkpoints that survive a crash at any instant.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
its final name (``os.replace`` is atomic), so a reader sees either the previous file or the
complete new one. Everything in it is a tensor or a plain Python value, so it loads with
``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import HRNetError
from ..fileio import atomic_write

CHECKPOINT_RE = re.compile(r"^step-(\d+)\.pt$")


class ResumeError(HRNetError):
    """A training-state checkpoint that is missing, unreadable or from an incompatible run."""


def save_state(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_state`, loaded without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ResumeError(f"{path}: no such checkpoint") from None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ResumeError(f"{path}: not a readable training checkpoint ({type(e).__name__})") from None


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
