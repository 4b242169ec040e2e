"""Grad-CAM: equal to the closed form that global pooling + a linear classifier imply, and drawn."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hrnet.cli import main
from hrnet.inference.cam import grad_cam
from hrnet.inference.predict import predict
from test_predict import CROP, MODEL, SHORT, model_and_photos
from test_transforms import mmcls_reference


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, ckpt, photos, _ = model_and_photos(tmp_path_factory.mktemp("cam"))
    return model, ckpt, photos


def test_grad_cam_equals_class_activation_map(setup):
    """With mean pooling then a Linear layer, d logit_c / dA_k(i, j) = W[c, k] / (h w) everywhere, so
    Grad-CAM reduces to relu(sum_k W[c, k] A_k) (Zhou et al.'s CAM), up to the scale removed by the
    normalisation to [0, 1]."""
    model, _, photos = setup
    x = torch.from_numpy(mmcls_reference(Image.open(photos[0]), SHORT, CROP)).float()
    with torch.no_grad():
        feats = model.forward_features(x[None])
        logits = model(x[None])
    for c in (int(logits.argmax()), int(logits.argmin())):
        expected = F.relu(torch.einsum("k,bkhw->bhw", model.classifier.weight[c], feats))[None]
        expected = F.interpolate(expected, size=(CROP, CROP), mode="bilinear", align_corners=False)[0, 0]
        expected = expected / expected.max() if expected.max() > 0 else expected
        cam, probs = grad_cam(model, x, c)
        assert cam.shape == (CROP, CROP) and float(cam.min()) >= 0 and float(cam.max()) <= 1
        torch.testing.assert_close(cam, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(probs, logits[0].softmax(0), atol=1e-5, rtol=1e-4)
    cam_default, _ = grad_cam(model, x)
    torch.testing.assert_close(cam_default, grad_cam(model, x, int(logits.argmax()))[0])


def test_cam_cli_writes_the_picture(setup, tmp_path, capsys):
    model, ckpt, photos = setup
    out = tmp_path / "cam.png"
    argv = ["cam", MODEL, str(photos[0]), "--checkpoint", str(ckpt), "--input-size", str(CROP), "-o", str(out)]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = predict(model, photos[0], input_size=CROP, workers=0)[0]["topk"]
    assert [t["index"] for t in result["topk"]] == [t["index"] for t in expected]
    assert result["class"]["index"] == expected[0]["index"]
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (352, 700, 3)
    overlay, chart = picture[40:340, 10:310], picture[40:, 330:]
    assert overlay.std() > 10  # the photo with its heat map, not a blank panel
    bar_red = (chart[..., 0] > 180) & (chart[..., 1] < 80) & (chart[..., 2] < 80)
    assert bar_red.sum() >= 15  # the explained class's bar, one 15-pixel-high rectangle at least

    assert main([*argv, "--class", "7"]) == 0
    assert re.search(r"Grad-CAM of .* \(7, [0-9.]+%, rank [0-9]+\)", capsys.readouterr().out)
    assert main([*argv, "--class", "1000"]) == 1
    assert "--class 1000" in capsys.readouterr().err
