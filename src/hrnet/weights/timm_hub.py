"""timm's own model folder: ``config.json`` (architecture, class count, ``label_names`` and the
``pretrained_cfg`` with the evaluation transform in timm's keys) next to ``model.safetensors`` in timm's
key layout, so that ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``hf-hub:`` once the
folder is uploaded) builds the classifier with its own class count, weights, names and transform.

timm's ``load_model_config_from_path`` reads the config; its builder takes ``num_classes`` from the
``pretrained_cfg``, so a fine-tuned 3-class head loads as such instead of being dropped for a mismatch
with ImageNet's 1000.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save

from ..fileio import atomic_write
from ..models.arch import Arch
from ..models.zoo import EvalConfig

TIMM_WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"


def timm_architecture(arch: Arch) -> str:
    """timm's model name for ``arch`` (hrnet_w18, hrnet_w18_small_v2...). ssld weights take the plain trunk's
    name: hrnet writes the official head-conv biases, which timm's hrnet_w*_ssld lacks."""
    return "hrnet_" + arch.name.replace("-", "_")


def timm_crop_pct(cfg: EvalConfig) -> float:
    """The ``crop_pct`` for which timm's eval transform (resize to ``floor(size / crop_pct)``, centre crop
    ``size``) resizes to exactly ``cfg.resize_size``: ``size / resize`` nudged down where rounding errs."""
    pct = cfg.input_size / cfg.resize_size
    while math.floor(cfg.input_size / pct) < cfg.resize_size:
        pct = math.nextafter(pct, 0.0)
    return pct


def timm_pretrained_cfg(cfg: EvalConfig, num_classes: int) -> dict:
    """hrnet's evaluation settings as timm's ``pretrained_cfg`` (mean/std on timm's 0..1 scale)."""
    size = cfg.input_size
    return {"input_size": [3, size, size], "interpolation": cfg.interpolation, "crop_pct": timm_crop_pct(cfg),
            "crop_mode": "center", "mean": [m / 255 for m in cfg.mean], "std": [s / 255 for s in cfg.std],
            "num_classes": num_classes, "pool_size": [math.ceil(size / 32)] * 2, "first_conv": "conv1",
            "classifier": "classifier", "fixed_input_size": False}


def timm_config(arch: Arch, num_classes: int, cfg: EvalConfig, class_names: Sequence[str] | None,
                provenance: dict[str, str] | None = None) -> str:
    """The text of timm's ``config.json`` for a model of ``arch`` with ``num_classes`` outputs. timm moves
    the top-level ``label_names`` into the model's ``pretrained_cfg``, where they stay after loading."""
    config = {"architecture": timm_architecture(arch), "num_classes": num_classes,
              "num_features": arch.num_features, "global_pool": "avg",
              **({"label_names": list(class_names)} if class_names is not None else {}),
              "pretrained_cfg": timm_pretrained_cfg(cfg, num_classes), **({"hrnet": provenance} if provenance else {})}
    return json.dumps(config, indent=2) + "\n"


def save_timm_folder(content: dict[str, torch.Tensor], folder: Path, arch: Arch, num_classes: int, cfg: EvalConfig,
                     class_names: Sequence[str] | None, provenance: dict[str, str] | None = None) -> Path:
    """Write timm's folder (``content`` already in timm's keys), each file atomically; return the weights file."""
    config = timm_config(arch, num_classes, cfg, class_names, provenance)
    atomic_write(folder / TIMM_CONFIG, lambda tmp: Path(tmp).write_text(config, encoding="utf-8"))
    data = save(content)
    return atomic_write(folder / TIMM_WEIGHTS, lambda tmp: Path(tmp).write_bytes(data))
