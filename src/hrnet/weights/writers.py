"""Writing hrnet's weights in other libraries' layouts: the inverse of :func:`~hrnet.weights.formats.convert`.

Most users of these ImageNet weights start a segmentation, detection or pose model from them in a
codebase that loads the official ``cls_hrnet.py`` names (REFERENCE.md §8). Every layout here is
renamed by the same tables :mod:`.formats` reads with, and each result is read back by them before
it is returned, so anything written converts back to the identical hrnet state dict:

- ``official`` / ``timm``: a plain state dict in the official names (timm uses the same), plus the
  biases the official head convs ``downsamp_modules.{i}.0`` and ``final_layer.0`` carry. hrnet keeps
  no such bias (it was folded into BatchNorm's running_mean on reading); writing bias 0 with BatchNorm
  unchanged is exact, and reading folds 0 back. timm builds ``hrnet_w18_ssld``/``hrnet_w48_ssld`` without
  those biases: an ssld model's ``timm`` file loads strictly into ``hrnet_w18``/``hrnet_w48`` (same trunk).
- ``mmcls``: ``{"meta": {...}, "state_dict": {...}}``, the backbone under ``backbone.``, the head
  under ``neck.0.`` and ``head.fc.``; no head-conv biases (mmcls builds those convs with ``bias=False``).
- ``hrnet``: our own names, unchanged.

``backbone_only`` drops the classification head (incre modules, downsampling, final layer,
classifier): dense-prediction code then loads the file with no unexpected keys.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import atomic_write
from ..models.arch import ARCHS, Arch
from ..models.zoo import EvalConfig
from .checkpoint import RESERVED, save_checkpoint, save_state_dict
from .errors import KeyMismatchError
from .formats import (FOLDED_BIAS, HEAD_GROUPS, MMCLS_PREFIXES, StateDict, _rename, check, convert, infer_arch,
                      prefix_rules)

WRITABLE = ("hrnet", "official", "timm", "mmcls")
HEAD_PREFIXES = tuple(p for group in HEAD_GROUPS for p in group)
_MMCLS_WRITE_RULES = prefix_rules(MMCLS_PREFIXES, inverse=True)


def to_layout(sd: StateDict, arch: Arch | str, layout: str, *, backbone_only: bool = False) -> dict[str, Any]:
    """hrnet's state dict ``sd`` of ``arch`` as the content of a ``layout`` checkpoint file.

    ``sd`` must have ``arch``'s complete key set and shapes (a head group may be absent as a whole, as
    in a feature extractor's). Returns plain CPU tensors (``torch.load(weights_only=True)`` reads the
    saved result); for ``mmcls`` wrapped as ``{"meta": {arch, num_classes, hrnet_version}, "state_dict": ...}``.
    """
    from .._version import __version__

    arch = _arch(arch)
    if layout not in WRITABLE:
        raise ValueError(f"cannot write the {layout!r} layout; one of {', '.join(WRITABLE)}")
    check(sd, arch, "state dict", arch.name)
    sd = {k: _plain(v) for k, v in sd.items() if not (backbone_only and k.startswith(HEAD_PREFIXES))}
    if layout in ("official", "timm"):
        out = _with_head_biases(sd)
    elif layout == "mmcls":
        out = {_rename(k, _MMCLS_WRITE_RULES): v for k, v in sd.items()}
    else:
        out = sd
    back = convert(out, layout, arch)
    if back.keys() != sd.keys() or any(back[k] is not v and not torch.equal(back[k], v) for k, v in sd.items()):
        raise AssertionError(f"the {layout} key map does not read back to hrnet's keys")  # a bug, not bad input
    if layout == "mmcls":
        classes = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else 0
        return {"meta": {"arch": arch.name, "num_classes": classes, "hrnet_version": __version__}, "state_dict": out}
    return out


def write_checkpoint(sd_or_model: StateDict | nn.Module, path: str | os.PathLike, *, format: str = "hrnet",
                     arch: Arch | str | None = None, backbone_only: bool = False,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write an hrnet model's (or state dict's) weights to ``path`` in ``format``, atomically; return ``path``.

    ``hrnet`` goes to :func:`~hrnet.weights.save_checkpoint` (safetensors with metadata); ``official``,
    ``timm`` and ``mmcls`` are ``torch.save`` d dicts of plain tensors (see :func:`to_layout`).
    ``arch`` is needed only for a state dict whose architecture should not be inferred from its shapes.
    ``metadata`` (string keys and values) goes into hrnet's metadata or mmcls's ``meta``; an official or
    timm file is a bare state dict with no room for it, so metadata there is refused.
    """
    model = sd_or_model if isinstance(sd_or_model, nn.Module) else None
    sd = model.state_dict() if model is not None else sd_or_model
    arch = _resolve_arch(sd, model, arch)
    target = Path(path)
    extra = dict(metadata or {})
    if extra and format in ("official", "timm"):
        raise ValueError(f"an {format} checkpoint is a bare state dict with no room for metadata; got {sorted(extra)}")
    _check_head(sd)
    cfg = getattr(model, "pretrained_cfg", None)
    if format == "hrnet":
        if model is not None and not backbone_only:
            return save_checkpoint(model, target, metadata=metadata)
        out = to_layout(sd, arch, "hrnet", backbone_only=backbone_only)
        classes = out["classifier.weight"].shape[0] if "classifier.weight" in out else 0
        return save_state_dict(out, arch, target, num_classes=classes, model=cfg.name if cfg is not None else None,
                               eval_cfg=getattr(model, "eval_cfg", EvalConfig()), metadata=metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError("metadata keys and values must be strings")
    clash = [k for k in extra if k in RESERVED]
    if clash:
        raise ValueError(f"metadata keys {clash} are written by hrnet itself")
    content = to_layout(sd, arch, format, backbone_only=backbone_only)
    if format == "mmcls":
        content["meta"].update({**({"model": cfg.name} if cfg is not None else {}), **extra})
    atomic_write(target, lambda tmp: torch.save(content, tmp))
    return target


def _arch(arch: Arch | str) -> Arch:
    if isinstance(arch, Arch):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def _resolve_arch(sd: StateDict, model: nn.Module | None, arch: Arch | str | None) -> Arch:
    """The given architecture, the model's, or the one ``sd``'s keys and shapes match."""
    own = getattr(model, "arch", None) if model is not None else None
    if model is not None and own is None:
        raise TypeError(f"write_checkpoint needs an hrnet model (with .arch) or a state dict, "
                        f"got {type(model).__name__}")
    if arch is not None:
        arch = _arch(arch)
        if own is not None and own != arch:
            raise ValueError(f"arch={arch.name} but the model is {own.name}")
        return arch
    if own is not None:
        return own
    hit = infer_arch(sd, "hrnet")
    if hit is None:
        raise KeyMismatchError("state dict: its keys and shapes match no HRNet architecture (check them with arch=)")
    return hit[0]


def _plain(v: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU tensor that owns its storage (torch.save writes a view's whole storage)."""
    v = v.detach().cpu().contiguous()
    return v.clone() if v.untyped_storage().nbytes() != v.nbytes else v


def _with_head_biases(sd: StateDict) -> StateDict:
    """The official head convs' zero biases, each after its weight (the official key order)."""
    out = {}
    for key, value in sd.items():
        out[key] = value
        bias = key.removesuffix("weight") + "bias"
        if key.endswith(".weight") and re.fullmatch(FOLDED_BIAS, bias):
            out[bias] = torch.zeros(value.shape[0], dtype=value.dtype)
    return out


def _check_head(sd: StateDict) -> None:
    """The classification head is whole, or cut after one of its parts (incre; downsampling and final
    layer; classifier), as a feature extractor's or backbone's weights are; never missing a middle part."""
    groups = [any(k.startswith(prefixes) for k in sd) for prefixes in HEAD_GROUPS]
    if groups not in ([False] * 3, [True, False, False], [True, True, False], [True, True, True]):
        present = ", ".join(HEAD_GROUPS[i][0].rstrip(".") for i, g in enumerate(groups) if g)
        raise KeyMismatchError(f"state dict: the classification head must be whole or cut after one of its "
                               f"parts; this one has only {present}")
