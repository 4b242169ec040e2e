"""hrnet's own checkpoint format: a safetensors file whose string metadata names the format,
architecture, class count, class names (a JSON list), zoo model, evaluation settings, hrnet version
and (after a conversion) the source file's SHA-256. A hub directory holds the same file as
``model.safetensors`` next to a ``config.json`` for hub tooling (the weights file carries the same
metadata; the config also names the classes as timm's ``label_names`` and Hugging Face's
``id2label``/``label2id``)."""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
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
RESERVED = ("format", "arch", "num_classes", "hrnet_version", "model", "eval", "class_names")
MAX_CLASS_NAMES = 100_000
MAX_NAME_CHARS = 256
_BAD_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")  # control, format (bidi overrides), line breaks, surrogates


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


def check_class_names(names: object, where: str | os.PathLike, num_classes: int | None = None) -> tuple[str, ...]:
    """``names`` as a tuple of class names, or a one-line :class:`CheckpointError` naming ``where``: a list
    of at most 100,000 non-empty strings of at most 256 characters with no control, format or
    line-break characters (a name is printed in terminals, HTML and HTTP headers), one per class.
    Names may repeat: ImageNet's own table names two classes 'crane' and two 'maillot'."""
    if not isinstance(names, (list, tuple)):
        raise CheckpointError(f"{where}: class names must be a list of strings, not {type(names).__name__}")
    if len(names) > MAX_CLASS_NAMES:
        raise CheckpointError(f"{where}: {len(names)} class names, more than the {MAX_CLASS_NAMES:,} allowed")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{where}: class name {i} must be a non-empty string, not {name!r:.40}")
        if len(name) > MAX_NAME_CHARS:
            raise CheckpointError(f"{where}: class name {i} has {len(name)} characters, more than {MAX_NAME_CHARS}")
        bad = next((c for c in name if unicodedata.category(c) in _BAD_CATEGORIES), None)
        if bad is not None:
            raise CheckpointError(f"{where}: class name {i} ({name[:40]!r}) holds the control character {bad!r}")
    if num_classes is not None and len(names) != num_classes:
        raise CheckpointError(f"{where}: {len(names)} class names for {num_classes} classes")
    return tuple(names)


def parse_class_names(text: str, where: str | os.PathLike, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names stored as JSON text (a list), bounded before it is parsed, then checked."""
    if len(text) > MAX_CLASS_NAMES * (6 * MAX_NAME_CHARS + 4):  # every character \u-escaped, quotes, comma
        raise CheckpointError(f"{where}: the class names take {len(text):,} characters, more than allowed")
    try:
        names = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: unreadable class names ({e})") from None
    return check_class_names(names, where, num_classes)


def class_names_of(metadata: dict[str, str], path: str | os.PathLike) -> tuple[str, ...] | None:
    """The class names a checkpoint's metadata carries (hrnet's format, or what a reader found in an mmcls
    ``meta`` or a hub folder's ``config.json``), checked against its class count; None when it has none."""
    if "class_names" not in metadata:
        return None
    classes = metadata.get("num_classes")
    return parse_class_names(metadata["class_names"], path, int(classes) if classes is not None else None)


def hub_labels(names: Sequence[str] | None) -> dict:
    """The class names as hub tooling reads them: timm's ``label_names``, Hugging Face's ``id2label``
    and ``label2id`` (nothing when there are no names)."""
    if names is None:
        return {}
    return {"label_names": list(names), "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}}


def save_state_dict(sd: StateDict, arch: Arch, path: str | os.PathLike, *, num_classes: int, model: str | None,
                    eval_cfg: EvalConfig, metadata: dict[str, str] | None = None, hub: bool = False,
                    class_names: Sequence[str] | None = None) -> Path:
    """Write a state dict in hrnet's keys in hrnet's format (atomically); return the weights file's path.
    ``hub=True`` makes ``path`` a directory with ``model.safetensors`` and ``config.json``.
    ``class_names`` (one per class, see :func:`check_class_names`) are stored with the weights."""
    extra = dict(metadata or {})
    check_metadata(extra)
    target = Path(path)
    names = None if class_names is None else check_class_names(list(class_names), target, num_classes)
    meta = {"format": "hrnet", "arch": arch.name, "num_classes": str(num_classes), "hrnet_version": __version__,
            **({"model": model} if model else {}), "eval": json.dumps(eval_cfg.to_dict()),
            **({"class_names": json.dumps(names, ensure_ascii=False)} if names is not None else {}), **extra}
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if hub:
        config = {**meta, "num_classes": num_classes, "pretrained_cfg": eval_cfg.to_dict(), **hub_labels(names)}
        del config["eval"]
        config.pop("class_names", None)
        atomic_write(target / HUB_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        target = target / HUB_WEIGHTS
    data = save(sd, metadata=meta)  # in memory: the Rust writer's own I/O errors would escape as tracebacks
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target
