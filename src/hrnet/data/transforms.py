"""The evaluation transform of MMClassification, pixel for pixel.

mmcls's test pipeline for the HRNet zoo is ``Resize(size=(256, -1), backend='pillow')``,
``CenterCrop(224)``, ``Normalize(mean, std, to_rgb=True)``. Concretely:

1. the short edge becomes ``resize_size`` and the long edge ``int(resize_size * long / short)``
   (truncated), with PIL's bilinear ``Image.resize`` (what mmcv's ``imresize(backend='pillow')`` calls);
2. a centre crop of ``input_size`` whose offset is ``int(round((size - crop) / 2))`` (Python rounding);
3. float32 ``(x - mean) / std`` on 0..255 values, as a CHW tensor.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from ..errors import HRNetError
from ..models.zoo import EvalConfig

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}

# Above this many resized pixels (an extreme panorama), resample only the crop window through
# PIL's ``box`` argument instead of materialising the whole resized image.
_MAX_RESIZED_PIXELS = 1 << 24


class TransformConfigError(HRNetError):
    """An --input-size or --crop-pct that cannot describe a crop."""


def resize_dims(width: int, height: int, short: int) -> tuple[int, int]:
    """mmcls ``Resize(size=(short, -1))``: the short edge to ``short``, the long edge truncated."""
    if width < height:
        return short, int(short * height / width)
    return int(short * width / height), short


def crop_offset(size: int, crop: int) -> int:
    """mmcls ``CenterCrop``'s offset: ``int(round((size - crop) / 2))``, never negative."""
    return max(0, int(round((size - crop) / 2.0)))


class EvalTransform:
    """PIL RGB image -> normalised float32 CHW tensor, exactly as mmcls evaluates: built from an
    :class:`~hrnet.models.zoo.EvalConfig` only (torchvision's ``Weights.transforms`` form), so the
    record is the one home of every preprocessing default."""

    def __init__(self, cfg: EvalConfig):
        if not 0 < cfg.input_size <= cfg.resize_size:
            raise TransformConfigError(
                f"crop {cfg.input_size} must be positive and no larger than the resized short edge {cfg.resize_size}")
        self.cfg = cfg
        self.input_size, self.resize_size, self.interpolation = cfg.input_size, cfg.resize_size, cfg.interpolation
        self.resample = RESAMPLE[cfg.interpolation]
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_config(cls, cfg: EvalConfig, input_size: int | None = None,
                    crop_pct: float | None = None) -> EvalTransform:
        """The record's pipeline; ``input_size`` and/or ``crop_pct`` override it, and the resize
        becomes ``floor(input_size / crop_pct)`` (timm's rule) when either is given."""
        if input_size is None and crop_pct is None:
            return cls(cfg)
        size = cfg.input_size if input_size is None else input_size
        pct = cfg.crop_pct if crop_pct is None else crop_pct
        if not 0 < pct <= 1:
            raise TransformConfigError(f"--crop-pct must be in (0, 1], got {pct}")
        return cls(dataclasses.replace(cfg, input_size=size, resize_size=math.floor(size / pct)))

    def crop(self, img: Image.Image) -> Image.Image:
        """Resize and centre-crop: the pixels the model sees, before normalisation."""
        w, h = img.size
        nw, nh = resize_dims(w, h, self.resize_size)
        c = self.input_size
        x, y = crop_offset(nw, c), crop_offset(nh, c)
        if nw * nh <= _MAX_RESIZED_PIXELS:
            return img.resize((nw, nh), self.resample).crop((x, y, x + c, y + c))
        sx, sy = w / nw, h / nh
        return img.resize((c, c), self.resample, box=(x * sx, y * sy, (x + c) * sx, (y + c) * sy))

    def normalize(self, crop: Image.Image) -> torch.Tensor:
        """An RGB image → float32 CHW ``(x - mean) / std``."""
        hwc = torch.from_numpy(np.array(crop, dtype=np.uint8))  # a copy: torch wants it writable
        return hwc.permute(2, 0, 1).contiguous().float().sub_(self.mean).div_(self.std)  # in place: 10x faster

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.crop(img))

    def __repr__(self) -> str:
        return f"EvalTransform(resize_short={self.resize_size}, {self.interpolation}, center_crop={self.input_size})"


def eval_transform(model_or_cfg, input_size: int | None = None, crop_pct: float | None = None) -> EvalTransform:
    """The evaluation transform of an hrnet model (its ``eval_cfg``) or of an ``EvalConfig``."""
    cfg = model_or_cfg if isinstance(model_or_cfg, EvalConfig) else model_or_cfg.eval_cfg
    return EvalTransform.from_config(cfg, input_size, crop_pct)
