"""Loading weights from any supported source (a zoo record, a file or hub directory in any container
and layout, a URL) as hrnet's state dict, or into a model."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..models.arch import ARCHS, Arch
from ..models.zoo import ModelRecord, models_of
from .containers import check_regular, check_tensors, read_file
from .download import fetch, is_url
from .errors import CheckpointError, KeyMismatchError
from .hrnet_format import HUB_CONFIG, check_class_names, weights_file
from .layouts import (LAYOUTS, StateDict, check, convert, describe_mismatch, detect_layout, infer_arch, mismatch,
                      state_dict_of)

Source = ModelRecord | str | os.PathLike
CLASSIFIER = ("classifier.weight", "classifier.bias")
MAX_CONFIG_BYTES = 64 * 2**20  # a hub config.json: 100,000 class names fit several times over


def local_path(source: Source, *, progress: bool = True) -> Path:
    """A local file or directory for ``source``: a record's or URL's weights are fetched into the cache."""
    if isinstance(source, ModelRecord):
        return fetch(source.url, source.filename, progress=progress)
    if is_url(source):
        return fetch(str(source), progress=progress)
    return Path(source)


def read_state_dict(path: Path, layout: str = "auto") -> tuple[StateDict, dict[str, str], str]:
    """The tensors of a checkpoint in its writer's names, its metadata, and the layout found in it."""
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}; one of auto, {', '.join(LAYOUTS)}")
    file = weights_file(path)
    obj, metadata = read_file(file)
    if "class_names" not in metadata:
        names = stored_class_names(obj, path)
        if names is not None:
            metadata = {**metadata, "class_names": json.dumps(names, ensure_ascii=False)}
    sd = state_dict_of(obj, str(file))
    check_tensors(sd, file)
    found = detect_layout(sd, metadata, str(path))
    if layout != "auto" and found != layout and {found, layout} != {"official", "timm"}:
        raise CheckpointError(f"{path}: is a checkpoint in the {found} layout, not {layout}")
    return sd, metadata, found


def stored_class_names(obj: Any, path: Path) -> tuple[str, ...] | None:
    """Class names a checkpoint keeps outside hrnet's metadata: an mmcls/mmpretrain ``meta``
    (``CLASSES``, ``dataset_meta.classes``), or a hub folder's ``config.json`` (``label_names``, as
    timm and hrnet write it); None when there are none. Checked (:func:`check_class_names`)."""
    names = None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if isinstance(meta, dict):
        dataset = meta.get("dataset_meta")
        names = meta.get("CLASSES", dataset.get("classes") if isinstance(dataset, dict) else None)
    elif path.is_dir() and (path / HUB_CONFIG).exists():
        config = path / HUB_CONFIG
        check_regular(config, "config")
        if config.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{config}: {config.stat().st_size:,} bytes, more than a config may take")
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{config}: not valid JSON ({e})") from None
        names = data.get("label_names") if isinstance(data, dict) else None
        path = config
    return None if names is None else check_class_names(names, path)


def load_checkpoint(source: str | os.PathLike, *, layout: str = "auto",
                    progress: bool = True) -> tuple[StateDict, dict[str, str]]:
    """Any supported checkpoint as hrnet's state dict, and its metadata.

    The architecture is found from the keys and shapes (every key and shape must match one); the
    metadata always holds ``format`` (the layout read), ``arch`` and ``num_classes`` (0 without a
    classifier), plus whatever an hrnet-format file stored.
    """
    path = local_path(source, progress=progress)
    sd, metadata, found = read_state_dict(path, layout)
    hit = infer_arch(sd, found)
    if hit is None:
        closest = min(ARCHS.values(), key=lambda a: sum(map(len, mismatch(convert(sd, found, a), a))))
        raise KeyMismatchError(describe_mismatch(str(path), f"any HRNet architecture (closest: {closest.name})",
                                                 *mismatch(convert(sd, found, closest), closest)))
    arch, out = hit
    classes = out["classifier.weight"].shape[0] if "classifier.weight" in out else 0
    return out, {**metadata, "format": found, "arch": arch.name, "num_classes": str(classes)}


def load_weights(model: nn.Module, source: Source, *, progress: bool = True,
                 fit_classifier: bool = False) -> dict[str, str]:
    """Load ``source`` (a zoo record, a file or hub directory in any supported format, or a URL) into ``model``.

    Strict about the model's own keys and shapes. A classifier with another class count (or none in the
    checkpoint) is skipped with a warning, the fine-tuning case, unless ``fit_classifier`` asks to
    resize the model's classifier to the checkpoint's (a fine-tuned file loaded without ``num_classes``).
    A feature extractor ignores the head it lacks. Weights of another width are refused with a message
    naming that width. Returns the checkpoint's metadata (see :func:`~hrnet.weights.eval_config_of` for
    what it says about evaluation).
    """
    path = local_path(source, progress=progress)
    sd, metadata, found = read_state_dict(path)
    arch: Arch = model.arch
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.name if cfg is not None else arch.name
    out = convert(sd, found, arch)
    if any(mismatch(out, arch)):
        other = infer_arch(sd, found)
        if other is not None:
            raise wrong_arch(path, other[0], name, arch)
        check(out, arch, str(path), name)
    current = model.state_dict().get(CLASSIFIER[0]) if fit_classifier else None
    if current is not None and CLASSIFIER[0] in out and out[CLASSIFIER[0]].shape[0] != current.shape[0]:
        model.reset_classifier(out[CLASSIFIER[0]].shape[0])
    load_into(model, out, path)
    return metadata


def wrong_arch(path: Path, found: Arch, name: str, arch: Arch) -> KeyMismatchError:
    """The error for weights of another architecture: it names the one they belong to."""
    return KeyMismatchError(f"{path}: holds {found.name} weights ({', '.join(models_of(found))}), but the model is "
                            f"{name} ({arch.name}); build that model instead")


def load_into(model: nn.Module, sd: StateDict, path: Path) -> None:
    """Load a converted, checked state dict: the model's own keys strictly, the classifier only if it fits."""
    target = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in target or k in CLASSIFIER}  # a feature extractor lacks the head
    has_classifier = CLASSIFIER[0] in target
    if not has_classifier or CLASSIFIER[0] not in sd or sd[CLASSIFIER[0]].shape != target[CLASSIFIER[0]].shape:
        if has_classifier:
            found = f"{sd[CLASSIFIER[0]].shape[0]} classes" if CLASSIFIER[0] in sd else "no classifier"
            warnings.warn(f"{path}: the checkpoint has {found}, the model {target[CLASSIFIER[0]].shape[0]}: "
                          "loaded everything but the classifier, which keeps its fresh initialisation", stacklevel=3)
        sd = {k: v for k, v in sd.items() if k not in CLASSIFIER}
    # Adopt the loaded tensors (on the model's device and dtype) instead of copying into fresh ones:
    # for a 300 MB checkpoint the copy costs more than reading the file.
    sd = {k: v.to(device=target[k].device, dtype=target[k].dtype) for k, v in sd.items() if k in target}
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in CLASSIFIER]
    if missing or result.unexpected_keys:
        raise KeyMismatchError(describe_mismatch(str(path), type(model).__name__, missing,
                                                 list(result.unexpected_keys), []))
