"""Training-time augmentation: the mmcls ImageNet recipe's RandomResizedCrop + horizontal flip.

Randomness comes from torch's global generator, so a caller that seeds it per sample (as the
trainer does through :class:`hrnet.training.sampler.EpochSeeded`) gets reproducible crops.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from ..models.zoo import IMAGENET_MEAN, IMAGENET_STD


class TrainTransform:
    """PIL RGB image -> random crop of ``scale`` of its area (aspect 3/4..4/3) resized to
    ``input_size`` (bilinear), flipped left-right with probability 1/2 when ``hflip``, normalised
    like the eval transform (``mean``/``std`` on 0..255 values) into a float32 CHW tensor."""

    def __init__(self, input_size: int = 224, *, scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.crop = RandomResizedCrop(input_size, scale=scale, interpolation=InterpolationMode.BILINEAR)
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.crop(img)
        if self.hflip and torch.rand(1).item() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return (arr.permute(2, 0, 1).float() - self.mean) / self.std

    def __repr__(self) -> str:
        return f"TrainTransform({self.crop.size[0]}, scale={self.crop.scale}, hflip={self.hflip})"
