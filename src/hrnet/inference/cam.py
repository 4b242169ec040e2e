"""Grad-CAM (Selvaraju et al., 2017) on HRNet's last feature map, drawn with Pillow only.

The map is ``relu(sum_k alpha_k A_k)`` over the 2048 channels ``A`` of ``final_layer`` (stride 32),
with ``alpha_k`` the spatial mean of the class score's gradient; it is upsampled to the crop the
model saw and laid over it, next to a bar chart of the top-5 classes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..data import load_image
from ..errors import HRNetError, UsageError
from ..fileio import atomic_write
from .predict import Classifier, PathLike, topk_records


class UnknownClassError(HRNetError):
    """A class index the model does not have."""


def grad_cam(model: torch.nn.Module, x: torch.Tensor,
             class_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of one normalised image ``x`` (3×H×W) for ``class_index`` (default: the top class).

    Returns ``(cam, probs)``: the H×W map scaled to [0, 1] (all zeros if nothing supports the class)
    and the softmax probabilities.
    """
    acts: list[torch.Tensor] = []
    hook = model.final_layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with torch.enable_grad():
            logits = model(x[None].requires_grad_(True))
            c = int(logits.argmax()) if class_index is None else class_index
            (grad,) = torch.autograd.grad(logits[0, c], acts[0])
    finally:
        hook.remove()
    weights = grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * acts[0]).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return (cam / peak if peak > 0 else cam), logits.detach()[0].softmax(0)


def _jet(v: np.ndarray) -> np.ndarray:
    """The classic blue-cyan-yellow-red colour map on [0, 1], as uint8 RGB."""
    rgb = [np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def render(crop: Image.Image, cam: np.ndarray, topk: list[dict], explained: dict, display: int = 320) -> Image.Image:
    """The crop with the heat map over it, and a bar chart of ``topk`` (the ``explained`` class,
    ``{"index", "label", "score", "rank"}``, highlighted; added as a last row when outside ``topk``)."""
    if all(t["index"] != explained["index"] for t in topk):
        topk = [*topk, explained]
    font = ImageFont.load_default(size=14)
    heat = Image.fromarray(_jet(cam)).resize((display, display), Image.BILINEAR)
    overlay = Image.blend(crop.resize((display, display), Image.BILINEAR), heat, 0.45)
    chart_w, pad, title_h = 380, 12, 32
    canvas = Image.new("RGB", (display + chart_w, display + title_h), "white")
    canvas.paste(overlay, (0, title_h))
    draw = ImageDraw.Draw(canvas)
    title = f"Grad-CAM: {explained['label'].split(',')[0]} ({explained['index']})"
    draw.text((pad, 8), title, fill="black", font=font)
    row_h, bar_max = (display - pad) // max(1, len(topk)), chart_w - 3 * pad - 60
    for r, t in enumerate(topk):
        x0, y0 = display + pad, title_h + pad + r * row_h
        draw.text((x0, y0), f"{t.get('rank', r + 1)}. {t['label'].split(',')[0][:36]}", fill="black", font=font)
        width = max(1, round(bar_max * t["score"]))
        colour = (214, 39, 40) if t["index"] == explained["index"] else (31, 119, 180)
        draw.rectangle((x0, y0 + 20, x0 + width, y0 + 34), fill=colour)
        draw.text((x0 + width + 6, y0 + 20), f"{100 * t['score']:.1f}%", fill="black", font=font)
    return canvas


def cam_image(model_or_name: torch.nn.Module | str, image: PathLike, output: PathLike, *,
              class_index: int | None = None, checkpoint: PathLike | None = None, device: str | None = None,
              input_size: int | None = None, crop_pct: float | None = None, topk: int = 5) -> dict:
    """Write ``image``'s Grad-CAM picture to ``output`` (PNG, JPEG... by extension).

    Returns ``{"file", "output", "class": {"index", "label", "score", "rank"}, "topk": [{"index", "label", "score"}]}``.
    """
    clf = Classifier.build(model_or_name, checkpoint=checkpoint, device=device, input_size=input_size,
                           crop_pct=crop_pct)
    if class_index is not None and not 0 <= class_index < len(clf.labels):
        raise UnknownClassError(f"--class {class_index} is not a class of this model (0..{len(clf.labels) - 1})")
    crop = clf.transform.crop(load_image(image))
    figure, explained, top = explain(clf, crop, class_index, topk)
    fmt = Image.registered_extensions().get(Path(output).suffix.lower())
    if fmt is None:
        raise UsageError(f"{output}: give the picture an image extension (.png, .jpg...)")
    atomic_write(output, lambda tmp: figure.save(tmp, format=fmt))
    return {"file": os.fspath(image), "output": os.fspath(output), "class": explained, "topk": top}


def explain(clf: Classifier, crop: Image.Image, class_index: int | None = None,
            topk: int = 5) -> tuple[Image.Image, dict, list[dict]]:
    """Grad-CAM of ``crop`` (the resized, centre-cropped image the model sees): the picture, the explained
    class ``{"index", "label", "score", "rank"}`` (default the top one), and the ``topk`` records."""
    x = clf.transform.normalize(crop).to(clf.device)
    cam, probs = grad_cam(clf.model, x, class_index)
    top = topk_records(probs[None].cpu(), clf.labels, topk)[0]
    c = top[0]["index"] if class_index is None else class_index
    explained = {"index": c, "label": clf.labels[c], "score": float(probs[c]),
                 "rank": int((probs > probs[c]).sum()) + 1}
    return render(crop, cam.cpu().numpy(), top, explained), explained, top
