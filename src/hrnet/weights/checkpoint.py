"""Loading weights into a model from any supported source, and hrnet's own checkpoint format.

hrnet's format is a safetensors file whose string metadata names the format, architecture,
class count, hrnet version and (after a conversion) the source file's SHA-256. A hub directory
holds the same file as ``model.safetensors`` next to a ``config.json``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from safetensors.torch import save
from torch import nn

from ..errors import UsageError
from ..fileio import atomic_write
from ..models.arch import ARCHS, Arch
from ..models.zoo import EvalConfig, ModelRecord, models_of, resolve
from .download import fetch, is_url
from .errors import CheckpointError, KeyMismatchError
from .formats import (LAYOUTS, StateDict, check, convert, describe_mismatch, detect_layout, infer_arch, mismatch,
                      state_dict_of)
from .safe import HUB_CONFIG, HUB_WEIGHTS, read_file

Source = ModelRecord | str | os.PathLike
RESERVED = ("format", "arch", "num_classes", "hrnet_version", "model", "eval")
CLASSIFIER = ("classifier.weight", "classifier.bias")


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
    obj, metadata = read_file(path)
    sd = state_dict_of(obj, str(path))
    found = detect_layout(sd, metadata, str(path))
    if layout != "auto" and found != layout and {found, layout} != {"official", "timm"}:
        raise CheckpointError(f"{path}: is a checkpoint in the {found} layout, not {layout}")
    return sd, metadata, found


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
    naming that width. Returns the checkpoint's metadata (see :func:`eval_config_of` for what it
    says about evaluation).
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


def eval_config_of(metadata: dict[str, str], path: str | os.PathLike) -> EvalConfig | None:
    """The evaluation settings an hrnet-format file carries (written by :func:`save_checkpoint`), if any."""
    if "eval" not in metadata:
        return None
    try:
        return EvalConfig.from_dict(json.loads(metadata["eval"]))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable 'eval' metadata ({e})") from None


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


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                    hub: bool = False, format: str = "hrnet", backbone_only: bool = False) -> Path:
    """Write ``model``'s weights in hrnet's format (atomically) and return the weights file's path.

    The file records the architecture, class count, zoo name and the model's evaluation settings
    (``model.eval_cfg``), so loading it evaluates the model as it was meant to be (a network
    fine-tuned at 32x32 is evaluated at 32x32). ``metadata`` adds string entries (e.g.
    ``source_sha256``). ``hub=True`` makes ``path`` a directory with ``model.safetensors`` and
    ``config.json``. ``format`` ``official``, ``timm`` or ``mmcls`` (and ``backbone_only``) write the
    layout another library loads instead (see :func:`hrnet.weights.writers.write_checkpoint`).
    """
    if format != "hrnet" or backbone_only:
        if hub:
            raise UsageError("hub=True writes hrnet's format only")
        from .writers import write_checkpoint

        return write_checkpoint(model, path, format=format, backbone_only=backbone_only, metadata=metadata)
    if not hasattr(model, "arch"):
        raise TypeError(f"save_checkpoint needs an hrnet model (with .arch), got {type(model).__name__}")
    cfg = getattr(model, "pretrained_cfg", None)
    return save_state_dict(model.state_dict(), model.arch, path, num_classes=getattr(model, "num_classes", 0),
                           model=cfg.name if cfg is not None else None, eval_cfg=model.eval_cfg,
                           metadata=metadata, hub=hub)


def save_state_dict(sd: StateDict, arch: Arch, path: str | os.PathLike, *, num_classes: int, model: str | None,
                    eval_cfg: EvalConfig, metadata: dict[str, str] | None = None, hub: bool = False) -> Path:
    """:func:`save_checkpoint` for a state dict in hrnet's keys (no model needed)."""
    from .._version import __version__

    extra = dict(metadata or {})
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ValueError(f"metadata keys {clash} are written by hrnet itself")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError("metadata keys and values must be strings")
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


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, model: str | None = None,
                       layout: str = "auto", to: str = "hrnet", backbone_only: bool = False, hub: bool = False,
                       progress: bool = True) -> dict:
    """Convert any supported checkpoint (file, hub directory or URL) to ``to``'s layout at ``dst``.

    ``to="hrnet"`` writes hrnet's format; ``official``, ``timm`` and ``mmcls`` the files those
    libraries (and mmsegmentation, mmdetection, mmpose) load; ``backbone_only`` drops the
    classification head. ``model`` names the zoo model the weights belong to (default: the one the
    file names, else the first zoo model of the architecture found in it); its record's evaluation
    settings are written unless the source carries its own. Returns what was written: ``{"dst",
    "format", "backbone_only", "model", "arch", "num_classes", "source_format", "source_sha256"}``.
    """
    from .download import file_sha256
    from .writers import WRITABLE, write_checkpoint

    if to not in WRITABLE:
        raise UsageError(f"unknown target layout {to!r}; one of {', '.join(WRITABLE)}")
    if hub and (to != "hrnet" or backbone_only):
        raise UsageError("a hub directory holds hrnet's format only (drop --hub, or --to/--backbone-only)")

    path = local_path(src, progress=progress)
    sd, meta = load_checkpoint(path, layout=layout)
    arch = ARCHS[meta["arch"]]
    record = resolve(model or meta.get("model") or models_of(arch)[0])
    if record.arch != arch:
        raise wrong_arch(path, arch, record.name, record.arch)
    sha = file_sha256(path / HUB_WEIGHTS if path.is_dir() else path)
    source = str(src) if is_url(src) else Path(src).name
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    provenance = {"source": source, "source_format": meta["format"], "source_sha256": sha}
    if to == "hrnet" and not backbone_only:
        out = save_state_dict(sd, arch, dst, num_classes=int(meta["num_classes"]), model=record.name,
                              eval_cfg=eval_config_of(meta, path) or record.eval, hub=hub, metadata=provenance)
    else:
        out = write_checkpoint(sd, dst, format=to, arch=arch, backbone_only=backbone_only,
                               metadata=provenance if to in ("hrnet", "mmcls") else None)
    return {"dst": str(out), "format": to, "backbone_only": backbone_only, "model": record.name, "arch": arch.name,
            "num_classes": 0 if backbone_only else int(meta["num_classes"]), "source_format": meta["format"],
            "source_sha256": sha}
