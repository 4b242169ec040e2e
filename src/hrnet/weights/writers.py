"""Writing weights in hrnet's format or another library's layout (:func:`~.layouts.to_layout`), from a
model, a state dict or (:func:`convert_checkpoint`) any checkpoint. The container follows the name and
a name never gets another container's bytes: hrnet's format is safetensors; ``official`` / ``timm`` a
torch file, or safetensors under a ``.safetensors`` name (timm reads both); ``mmcls`` a torch file only;
``paddle`` a ``.pdparams`` pickle of numpy arrays. Class names travel into every layout with room for them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from ..errors import UsageError
from ..fileio import WriteError, atomic_write, refuse_same_file
from ..models.arch import ARCHS, Arch
from ..models.imagenet import imagenet_names
from ..models.zoo import EvalConfig, models_of, resolve
from .containers import container_for_name, numpy_pickle
from .download import file_sha256, is_url
from .errors import KeyMismatchError
from .hrnet_format import HUB_WEIGHTS, check_class_names, check_metadata, class_names_of, eval_config_of, save_state_dict
from .timm_hub import save_timm_folder
from .layouts import HEAD_GROUPS, WRITABLE, StateDict, arch_of, infer_arch, to_layout
from .loading import load_checkpoint, local_path, wrong_arch


def write_checkpoint(sd_or_model: StateDict | nn.Module, path: str | os.PathLike, *, format: str = "hrnet",
                     arch: Arch | str | None = None, backbone_only: bool = False,
                     metadata: dict[str, str] | None = None, hub: bool = False,
                     class_names: Sequence[str] | None = None) -> Path:
    """Write an hrnet model's (or state dict's) weights to ``path`` in ``format``, atomically; return the file.

    ``hrnet`` is safetensors with metadata (the model's zoo name, evaluation settings and class names;
    ``hub=True``: a directory with ``model.safetensors`` and ``config.json``); ``official``, ``timm``,
    ``mmcls`` and ``paddle`` are the files those libraries load (see :func:`~hrnet.weights.to_layout`), in
    the container the name says (``paddle``: a ``.pdparams`` pickle of numpy arrays). ``timm`` with
    ``hub=True`` is timm's own folder (:mod:`.timm_hub`), which ``timm.create_model("local-dir:DIR",
    pretrained=True)`` loads with its class count, names and evaluation transform.
    ``arch`` is needed only for a state dict whose architecture should not be inferred from its shapes.
    ``class_names`` (default: the model's ``class_names``) go wherever the layout has room: hrnet's
    metadata, a hub ``config.json``, mmcls's ``meta``. ``metadata`` (string keys and values) goes into
    hrnet's metadata or mmcls's ``meta``; an official, timm or paddle file is a bare state dict with no
    room for it, so metadata there is refused.
    """
    model = sd_or_model if isinstance(sd_or_model, nn.Module) else None
    sd = model.state_dict() if model is not None else sd_or_model
    arch = _resolve_arch(sd, model, arch)
    if class_names is None and model is not None:
        class_names = getattr(model, "class_names", None)
    cfg = getattr(model, "pretrained_cfg", None)
    return _write(sd, Path(path), format=format, arch=arch, backbone_only=backbone_only, metadata=metadata,
                  hub=hub, class_names=class_names, eval_cfg=getattr(model, "eval_cfg", None) or EvalConfig(),
                  model_name=cfg.name if cfg is not None else None)


def _write(sd: StateDict, target: Path, *, format: str, arch: Arch, backbone_only: bool,
           metadata: dict[str, str] | None, hub: bool, class_names: Sequence[str] | None, eval_cfg: EvalConfig,
           model_name: str | None) -> Path:
    """:func:`write_checkpoint` once the model's properties are known (also :func:`convert_checkpoint`'s writer)."""
    extra = dict(metadata or {})
    if format not in WRITABLE:
        raise ValueError(f"cannot write the {format!r} layout; one of {', '.join(WRITABLE)}")
    _check_hub(hub, format, backbone_only)
    if extra and format in ("official", "timm", "paddle") and not hub:
        raise ValueError(f"an {format} checkpoint is a bare state dict with no room for metadata; got {sorted(extra)}")
    check_metadata(extra)
    kind = "safetensors" if hub else _container(target, format)
    _check_head(sd)
    content = to_layout(sd, arch, format, backbone_only=backbone_only)
    classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd and not backbone_only else 0
    names = None if class_names is None or not classes else check_class_names(list(class_names), target, classes)
    if format == "hrnet":
        return save_state_dict(content, arch, target, num_classes=classes, model=model_name, eval_cfg=eval_cfg,
                               metadata=extra, hub=hub, class_names=names)
    if format == "timm" and hub:
        return save_timm_folder(content, target, arch, classes, eval_cfg, names, extra)
    if format == "mmcls":
        labels = {"CLASSES": list(names), "dataset_meta": {"classes": list(names)}} if names is not None else {}
        content["meta"].update({**({"model": model_name} if model_name else {}), **labels, **extra})
    if format == "paddle":
        data = numpy_pickle({k: v.numpy() for k, v in content.items()}, target)
        return atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    if kind == "safetensors":
        data = save(content)
        return atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return atomic_write(target, lambda tmp: torch.save(content, tmp))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                    hub: bool = False, format: str = "hrnet", backbone_only: bool = False) -> Path:
    """Write ``model``'s weights in hrnet's format (atomically) and return the weights file's path.

    The file records the architecture, class count, class names (``model.class_names``), zoo name and
    the model's evaluation settings (``model.eval_cfg``), so loading it evaluates the model as it was
    meant to be (a network fine-tuned at 32x32 is evaluated at 32x32) and names its classes.
    ``metadata`` adds string entries (e.g. ``source_sha256``). ``hub=True`` makes ``path`` a directory
    with ``model.safetensors`` and ``config.json``. ``format`` ``official``, ``timm``, ``mmcls`` or
    ``paddle`` (and ``backbone_only``) write the layout another library loads instead (see
    :func:`write_checkpoint`; ``timm`` with ``hub=True``: timm's own folder).
    """
    if not hasattr(model, "arch"):
        raise TypeError(f"save_checkpoint needs an hrnet model (with .arch), got {type(model).__name__}")
    return write_checkpoint(model, path, format=format, backbone_only=backbone_only, metadata=metadata, hub=hub)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, model: str | None = None,
                       layout: str = "auto", to: str = "hrnet", backbone_only: bool = False, hub: bool = False,
                       progress: bool = True) -> dict:
    """Convert any supported checkpoint (file, hub directory or URL) to ``to``'s layout at ``dst``.

    ``to="hrnet"`` writes hrnet's format; ``official``, ``timm``, ``mmcls`` and ``paddle`` the files
    those libraries (and mmsegmentation, mmdetection, mmpose) load; ``backbone_only`` drops the
    classification head. ``hub=True`` writes a directory: hrnet's hub directory, or with ``to="timm"``
    timm's own folder (``timm.create_model("local-dir:DST", pretrained=True)``). ``model`` names the
    zoo model the weights belong to (default: the one the file names, else the first zoo model of the
    architecture found in it); its record's evaluation settings are written unless the source carries
    its own. The source's class names (a 1000-class file without any: ImageNet's) go into every layout
    with room for them. ``dst`` may never be ``src`` itself (nor a link to it). Returns what was
    written: ``{"dst", "format", "backbone_only", "model", "arch", "num_classes", "class_names"
    (None where the layout has no room for them), "source_format", "source_sha256"}``.
    """
    if to not in WRITABLE:
        raise UsageError(f"unknown target layout {to!r}; one of {', '.join(WRITABLE)}")
    _check_hub(hub, to, backbone_only)
    out_file = Path(dst) / HUB_WEIGHTS if hub else Path(dst)
    if not is_url(src):
        refuse_same_file(out_file, src, Path(src) / HUB_WEIGHTS)
    _container(out_file, "hrnet" if hub else to)  # a bad name is refused before any download
    path = local_path(src, progress=progress)
    refuse_same_file(out_file, path)  # the cache's own copy of a URL
    sd, meta = load_checkpoint(path, layout=layout)
    arch = ARCHS[meta["arch"]]
    record = resolve(model or meta.get("model") or models_of(arch)[0])
    if record.arch != arch:
        raise wrong_arch(path, arch, record.name, record.arch)
    sha = file_sha256(path / HUB_WEIGHTS if path.is_dir() else path)
    source = str(src) if is_url(src) else Path(src).name
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    classes = int(meta["num_classes"])
    names = class_names_of(meta, path)
    if names is None and classes == record.num_classes == len(imagenet_names()):
        names = imagenet_names()
    provenance = {"source": source, "source_format": meta["format"], "source_sha256": sha}
    room = not backbone_only and (to in ("hrnet", "mmcls") or hub)
    out = _write(sd, Path(dst), format=to, arch=arch, backbone_only=backbone_only,
                 metadata=provenance if to in ("hrnet", "mmcls") or hub else None, hub=hub,
                 class_names=names if room else None, eval_cfg=eval_config_of(meta, path) or record.eval,
                 model_name=record.name)
    return {"dst": str(out), "format": to, "backbone_only": backbone_only, "model": record.name, "arch": arch.name,
            "num_classes": 0 if backbone_only else classes, "class_names": list(names) if room and names else None,
            "source_format": meta["format"], "source_sha256": sha}


def _check_hub(hub: bool, format: str, backbone_only: bool) -> None:
    """A hub directory is hrnet's (hrnet's format) or timm's own folder, of a whole classifier."""
    if hub and (format not in ("hrnet", "timm") or backbone_only):
        raise UsageError("a hub directory holds hrnet's format or timm's folder of a whole classifier "
                         "(drop --hub, or use --to hrnet/timm without --backbone-only)")


def _container(path: Path, format: str) -> str:
    """The container ``format`` is written in at ``path`` ("safetensors" or "torch"), or a one-line refusal of
    a name that says another container (a torch zip named .safetensors misleads every reader that trusts it)."""
    wanted = {"hrnet": ("safetensors",), "mmcls": ("torch",), "paddle": ("pickle",)}.get(format, ("safetensors", "torch"))
    claimed = container_for_name(path)
    said = None if claimed is None else claimed.name.removesuffix("-legacy")
    if said is None or said in wanted:
        return said or wanted[-1]
    what = {"hrnet": "hrnet's format is a safetensors file",
            "paddle": "the paddle layout is a pickle of numpy arrays (PaddlePaddle's .pdparams)"}.get(
        format, f"the {format} layout is a torch file (its library reads it with torch.load)")
    suffix = {"hrnet": ".safetensors", "paddle": ".pdparams"}.get(format, ".pth")
    raise WriteError(f"{path}: {what}, not {said} as the name says; name it {path.with_suffix(suffix).name}")


def _resolve_arch(sd: StateDict, model: nn.Module | None, arch: Arch | str | None) -> Arch:
    """The given architecture, the model's, or the one ``sd``'s keys and shapes match."""
    own = getattr(model, "arch", None) if model is not None else None
    if model is not None and own is None:
        raise TypeError(f"write_checkpoint needs an hrnet model (with .arch) or a state dict, "
                        f"got {type(model).__name__}")
    if arch is not None:
        arch = arch_of(arch)
        if own is not None and own != arch:
            raise ValueError(f"arch={arch.name} but the model is {own.name}")
        return arch
    if own is not None:
        return own
    hit = infer_arch(sd, "hrnet")
    if hit is None:
        raise KeyMismatchError("state dict: its keys and shapes match no HRNet architecture (check them with arch=)")
    return hit[0]


def _check_head(sd: StateDict) -> None:
    """The classification head is whole, or cut after one of its parts (incre; downsampling and final
    layer; classifier), as a feature extractor's or backbone's weights are; never missing a middle part."""
    groups = [any(k.startswith(prefixes) for k in sd) for prefixes in HEAD_GROUPS]
    if groups not in ([False] * 3, [True, False, False], [True, True, False], [True, True, True]):
        present = ", ".join(HEAD_GROUPS[i][0].rstrip(".") for i, g in enumerate(groups) if g)
        raise KeyMismatchError(f"state dict: the classification head must be whole or cut after one of its "
                               f"parts; this one has only {present}")
