"""hrnet's own checkpoint format: a safetensors file whose string metadata names the format,
architecture, class count, zoo model, evaluation settings, hrnet version and (after a conversion)
the source file's SHA-256. A hub directory holds the same file as ``model.safetensors`` next to a
``config.json`` for hub tooling (the weights file carries the same metadata)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save

from .._version import __version__
from ..fileio import atomic_write
from ..models.arch import Arch
from ..models.zoo import EvalConfig
from .errors import CheckpointError
from .layouts import StateDict

HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
RESERVED = ("format", "arch", "num_classes", "hrnet_version", "model", "eval")


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file of a checkpoint: ``path`` itself, or a hub directory's ``model.safetensors``."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / HUB_WEIGHTS).exists():
        raise CheckpointError(f"{path}: a checkpoint directory must contain {HUB_WEIGHTS}")
    return path / HUB_WEIGHTS


def check_metadata(extra: dict[str, str]) -> None:
    """User metadata: string keys and values, none of the keys hrnet writes itself."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError("metadata keys and values must be strings")
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ValueError(f"metadata keys {clash} are written by hrnet itself")


def eval_config_of(metadata: dict[str, str], path: str | os.PathLike) -> EvalConfig | None:
    """The evaluation settings an hrnet-format file carries (written by :func:`save_state_dict`), if any."""
    if "eval" not in metadata:
        return None
    try:
        return EvalConfig.from_dict(json.loads(metadata["eval"]))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable 'eval' metadata ({e})") from None


def save_state_dict(sd: StateDict, arch: Arch, path: str | os.PathLike, *, num_classes: int, model: str | None,
                    eval_cfg: EvalConfig, metadata: dict[str, str] | None = None, hub: bool = False) -> Path:
    """Write a state dict in hrnet's keys in hrnet's format (atomically); return the weights file's path.
    ``hub=True`` makes ``path`` a directory with ``model.safetensors`` and ``config.json``."""
    extra = dict(metadata or {})
    check_metadata(extra)
    meta = {"format": "hrnet", "arch": arch.name, "num_classes": str(num_classes), "hrnet_version": __version__,
            **({"model": model} if model else {}), "eval": json.dumps(eval_cfg.to_dict()), **extra}
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    target = Path(path)
    if hub:
        config = {**meta, "num_classes": num_classes, "pretrained_cfg": eval_cfg.to_dict()}
        del config["eval"]
        atomic_write(target / HUB_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        target = target / HUB_WEIGHTS
    data = save(sd, metadata=meta)  # in memory: the Rust writer's own I/O errors would escape as tracebacks
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target
