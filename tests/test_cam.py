"""Grad-CAM: equal to the closed form that global pooling + a linear classifier imply, on a map fine enough
for small inputs, and drawn so that it reads at a glance (a titled prediction, a colour scale, greyscale too)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from hrnet.cli import main
from hrnet.inference.cam import grad_cam, jet
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
        cam, probs = grad_cam(model, x, c, min_cells=1)  # final_layer, whatever its size
        assert cam.shape == (CROP, CROP) and float(cam.min()) >= 0 and float(cam.max()) <= 1
        torch.testing.assert_close(cam, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(probs, logits[0].softmax(0), atol=1e-5, rtol=1e-4)
    cam_default, _ = grad_cam(model, x, min_cells=1)
    torch.testing.assert_close(cam_default, grad_cam(model, x, int(logits.argmax()), min_cells=1)[0])


def test_small_inputs_get_a_map_that_shows_where(setup):
    """At 32 px (the digits) the stride-32 map is one cell, so a Grad-CAM there is one flat colour (what the
    demo drew before). The default uses the finest map with 7+ cells: at 32 px the head's stride-4 map, the
    output of incre_modules.0, whose Grad-CAM is computed here by hand."""
    model, _, photos = setup
    x = torch.from_numpy(mmcls_reference(Image.open(photos[1]), 36, 32)).float()
    c = 0  # a class with some positive evidence at stride 4 in this random model (for many, all is negative)
    flat, _ = grad_cam(model, x, c, min_cells=1)
    assert float(flat.std()) == 0, "one cell upsampled: no spatial information"
    acts = []
    hook = model.incre_modules[0].register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with torch.enable_grad():
            logits = model(x[None].requires_grad_(True))
            (grad,) = torch.autograd.grad(logits[0, c], acts[0])
    finally:
        hook.remove()
    assert acts[0].shape[2:] == (8, 8)
    expected = F.relu((grad.mean((2, 3), keepdim=True) * acts[0].detach()).sum(1, keepdim=True))
    expected = F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    cam, _ = grad_cam(model, x, c)
    assert float(expected.max()) > 0
    torch.testing.assert_close(cam, expected / expected.max(), atol=1e-4, rtol=0)
    assert float(cam.std()) > 0.05


def colour_bar_columns(picture: np.ndarray) -> list[int]:
    """The columns holding the colour map's two ends, jet(1) (dark red) above jet(0) (dark blue), each over
    5 rows at least: a colour scale, high at the top."""
    rgb = picture.astype(int)
    ends = jet(np.array([1.0, 0.0])).astype(int)
    assert ends.tolist() == [[127, 0, 0], [0, 0, 127]]
    red = (np.abs(rgb[..., 0] - 127) <= 25) & (rgb[..., 1] < 30) & (rgb[..., 2] < 30)
    blue = (np.abs(rgb[..., 2] - 127) <= 25) & (rgb[..., 0] < 30) & (rgb[..., 1] < 30)
    return [c for c in range(picture.shape[1]) if red[:, c].sum() >= 5 and blue[:, c].sum() >= 5
            and np.flatnonzero(red[:, c]).max() < np.flatnonzero(blue[:, c]).min()]


def title_band(text: str, width: int) -> np.ndarray:
    """``text`` drawn as the picture's first title line is: Pillow's default font at 16 px, at (12, 8)."""
    band = Image.new("RGB", (width, 30), "white")
    ImageDraw.Draw(band).text((12, 8), text, fill="black", font=ImageFont.load_default(size=16))
    return np.asarray(band)


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
    top = result["topk"][0]
    # the title says what was predicted, by name and probability, in words (drawn here independently)
    expected = title_band(f"predicted: {top['label'].split(',')[0]} (p={top['score']:.2f})", picture.shape[1])
    assert (expected < 128).sum() > 200
    np.testing.assert_array_equal(picture[:30], expected)
    # a colour scale: a strip of at least 10 columns running from the map's high end down to its low end
    columns = colour_bar_columns(picture)
    assert len(columns) >= 10 and columns[-1] - columns[0] == len(columns) - 1
    left = picture[80:330, : columns[0]]
    assert left.std() > 10  # the crop and its heat map, not blank panels
    chart = picture[80:, columns[-1] + 1:]
    bar_red = (chart[..., 0] > 180) & (chart[..., 1] < 80) & (chart[..., 2] < 80)
    assert bar_red.sum() >= 15  # the explained class's bar, one 15-pixel-high rectangle at least

    assert main([*argv, "--class", "7"]) == 0
    assert re.search(r"Grad-CAM of .* \(7, [0-9.]+%, rank [0-9]+\)", capsys.readouterr().out)
    assert main([*argv, "--class", "1000"]) == 1
    assert "--class 1000" in capsys.readouterr().err


def test_a_greyscale_scan_gets_a_coloured_heat_map_over_a_visible_image(setup, tmp_path, capsys):
    """A greyscale input at 32 px, as the digits are: the overlay is coloured (the heat map), varies
    (a map with several cells), and the scan shows through it (the overlay follows the input's strokes)."""
    _, ckpt, photos = setup
    scan = tmp_path / "scan.png"
    Image.open(photos[2]).convert("L").resize((32, 32)).save(scan)
    out = tmp_path / "scan_cam.png"
    assert main(["cam", MODEL, str(scan), "--checkpoint", str(ckpt), "--input-size", "32", "-o", str(out),
                 "--json"]) == 0
    json.loads(capsys.readouterr().out)
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    columns = colour_bar_columns(picture.astype(np.uint8))
    assert len(columns) >= 10, "no colour bar"
    panels = picture[80:330, 12: columns[0] - 12]
    half = panels.shape[1] // 2
    crop, heat = panels[:, :half - 6], panels[:, half + 6:]
    assert np.abs(crop.max(-1) - crop.min(-1)).max() <= 2, "the input panel shows the scan as it is: grey"
    spread = heat.max(-1) - heat.min(-1)
    assert spread.mean() > 30, "the overlay is coloured, not grey"
    assert heat.reshape(-1, 3).std(0).max() > 20, "the heat map varies over the image"
