"""The eval transform equals an independent re-implementation of mmcls's documented test pipeline."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

from hrnet.data import EvalTransform, TransformConfigError, eval_transform
from hrnet import create_model
from hrnet.models.zoo import MODELS, EvalConfig

SITE = os.path.dirname(os.path.dirname(np.__file__))
PHOTOS = sorted(glob.glob(os.path.join(SITE, "sklearn/datasets/images/*.jpg"))) + \
    [os.path.join(SITE, "skimage/data", f) for f in ("astronaut.png", "chelsea.png", "coffee.png")]
SIZES = [(500, 375), (375, 500), (257, 300), (300, 257), (256, 256), (256, 300), (224, 224), (225, 1000),
         (1, 1), (7, 3)]
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def mmcls_reference(img: Image.Image, short: int = 256, crop: int = 224) -> np.ndarray:
    """mmcls 0.x ``Resize(size=(short, -1), backend='pillow')``, ``CenterCrop(crop)``, ``Normalize``,
    rewritten from mmcls/mmcv's source: numpy HWC uint8 through ``Image.fromarray(..).resize``."""
    arr = np.asarray(img.convert("RGB"))
    h, w = arr.shape[:2]
    if not ((w <= h and w == short) or (h <= w and h == short)):  # mmcls skips a no-op resize
        if w < h:
            size = (short, int(short * h / w))
        else:
            size = (int(short * w / h), short)
        arr = np.array(Image.fromarray(arr).resize(size, Image.BILINEAR))
    h, w = arr.shape[:2]
    y1, x1 = max(0, int(round((h - crop) / 2.0))), max(0, int(round((w - crop) / 2.0)))
    arr = arr[y1:min(h, y1 + crop), x1:min(w, x1 + crop)]
    out = (arr.astype(np.float64) - MEAN) * (1.0 / STD)
    return out.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    assert len(PHOTOS) >= 4, PHOTOS
    return [Image.open(p).convert("RGB") for p in PHOTOS]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_eval_transform_matches_mmcls_pipeline(photos, size):
    t = eval_transform(create_model("hrnet-w18-small"))
    for photo in photos:
        img = photo.resize(size, Image.LANCZOS)
        got = t(img)
        assert got.dtype == torch.float32 and got.shape == (3, 224, 224)
        np.testing.assert_allclose(got.numpy(), mmcls_reference(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("input_size,crop_pct,short", [(288, 1.0, 288), (224, 0.95, 235), (160, None, 182),
                                                       (None, 0.875, 256)])
def test_input_size_and_crop_pct_override(photos, input_size, crop_pct, short):
    t = EvalTransform.from_config(EvalConfig(), input_size=input_size, crop_pct=crop_pct)
    crop = input_size or 224
    assert (t.resize_size, t.input_size) == (short, crop)
    img = photos[0].resize((500, 375), Image.LANCZOS)
    np.testing.assert_allclose(t(img).numpy(), mmcls_reference(img, short, crop), rtol=0, atol=1e-6)


def test_every_zoo_record_is_the_mmcls_224_from_256_pipeline():
    for record in MODELS.values():
        t = EvalTransform.from_config(record.eval)
        assert (t.resize_size, t.input_size) == (256, 224), record.name


def test_extreme_panorama_does_not_materialise_the_huge_resize():
    t = EvalTransform.from_config(EvalConfig())
    img = Image.new("RGB", (200_000, 2), (10, 200, 30))  # resized exactly: 25.6M x 256 pixels
    out = t(img)
    expected = (np.array([10, 200, 30]) - MEAN) / STD
    np.testing.assert_allclose(out[:, 100, 100].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"crop_pct": 1.2}, {"crop_pct": 0.0}, {"input_size": 0}])
def test_bad_overrides_are_one_line_errors(kwargs):
    with pytest.raises(TransformConfigError):
        EvalTransform.from_config(EvalConfig(), **kwargs)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (257, 300)], ids=["500x375", "375x500", "257x300"])
def test_eval_transform_matches_the_official_repos_torchvision_pipeline(photos, size):
    """The official HRNet repo evaluates with torchvision Resize(256) + CenterCrop(224): same pixels."""
    from torchvision import transforms as T

    official = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize(MEAN / 255, STD / 255)])
    t = EvalTransform.from_config(EvalConfig())
    for photo in photos:
        img = photo.resize(size, Image.LANCZOS)
        np.testing.assert_allclose(t(img).numpy(), official(img).numpy(), rtol=0, atol=1e-5)
