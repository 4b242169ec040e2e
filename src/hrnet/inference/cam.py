"""Grad-CAM (Selvaraju et al., 2017) on HRNet's head, drawn with Pillow only.

The map is ``relu(sum_k alpha_k A_k)`` over the channels ``A`` of one of the head's feature maps, with
``alpha_k`` the spatial mean of the class score's gradient. The map is the deepest one fine enough to
show where the model looks: ``final_layer``'s 2048 channels at stride 32 for a 224-pixel crop (7×7),
and for a small input such as the 32-pixel digits, whose stride-32 map is one cell, the head's running
sum at stride 16, 8 or 4. It is upsampled to the crop the model saw and drawn over a greyscale copy of
it (so every colour in the overlay is the heat map's, whatever the photo's), with a colour bar, next
to the crop itself and a bar chart of the top classes, under a title naming the prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..data import load_image
from ..errors import HRNetError, UsageError
from ..fileio import atomic_write
from .predict import Classifier, PathLike, topk_records

MIN_CELLS = 7  # the coarsest map Grad-CAM uses has at least this many cells on its short side


class UnknownClassError(HRNetError):
    """A class index the model does not have."""


def _head_maps(model: torch.nn.Module, acts: list[torch.Tensor]) -> list:
    """Hooks that append the head's maps to ``acts`` in forward order: the running sum at strides
    4, 8, 16 (the inputs of ``downsamp_modules``, where the model has them), then ``final_layer``'s output."""
    hooks = [down.register_forward_pre_hook(lambda _m, inputs: acts.append(inputs[0]))
             for down in getattr(model, "downsamp_modules", [])]
    return [*hooks, model.final_layer.register_forward_hook(lambda _m, _i, out: acts.append(out))]


def grad_cam(model: torch.nn.Module, x: torch.Tensor, class_index: int | None = None,
             min_cells: int = MIN_CELLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of one normalised image ``x`` (3×H×W) for ``class_index`` (default: the top class), on
    the deepest head map with at least ``min_cells`` cells on its short side (the finest one if none
    has; ``min_cells=1``: always ``final_layer``).

    Returns ``(cam, probs)``: the H×W map scaled to [0, 1] (all zeros if nothing supports the class)
    and the softmax probabilities.
    """
    acts: list[torch.Tensor] = []
    hooks = _head_maps(model, acts)
    try:
        with torch.enable_grad():
            logits = model(x[None].requires_grad_(True))
            c = int(logits.argmax()) if class_index is None else class_index
            fine_enough = [a for a in acts if min(a.shape[2:]) >= min_cells]
            target = fine_enough[-1] if fine_enough else acts[0]
            (grad,) = torch.autograd.grad(logits[0, c], target)
    finally:
        for hook in hooks:
            hook.remove()
    weights = grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * target).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    return (cam / peak if peak > 0 else cam), logits.detach()[0].softmax(0)


def jet(v: np.ndarray) -> np.ndarray:
    """The classic colour map on [0, 1], dark blue (0, 0, 127) - cyan - yellow - dark red (127, 0, 0),
    as uint8 RGB."""
    rgb = [np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def _name(record: dict) -> str:
    """A class's short name: ImageNet's first synonym ("tench" of "tench, Tinca tinca")."""
    return record["label"].split(",")[0].strip()[:36]


def overlay(crop: Image.Image, cam: np.ndarray, size: int, alpha: float = 0.4) -> Image.Image:
    """The heat map over a greyscale copy of ``crop`` (autocontrasted, so a dark or faint scan shows),
    both ``size`` × ``size``."""
    grey = ImageOps.autocontrast(crop.convert("L")).resize((size, size), Image.BICUBIC).convert("RGB")
    heat = Image.fromarray(jet(cam)).resize((size, size), Image.BILINEAR)
    return Image.blend(grey, heat, alpha)


def render(crop: Image.Image, cam: np.ndarray, topk: list[dict], explained: dict, display: int = 256) -> Image.Image:
    """The picture: a title naming the prediction (and the explained class when it is another), the crop,
    the heat map over it with a low-high colour bar, and a bar chart of ``topk`` (the ``explained`` class,
    ``{"index", "label", "score", "rank"}``, highlighted; added as a last row when outside ``topk``)."""
    predicted = topk[0]
    if all(t["index"] != explained["index"] for t in topk):
        topk = [*topk, explained]
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    pad, title_h, caption_h, bar_w, chart_w = 12, 56, 22, 14, 330
    top = title_h + caption_h
    cbar_x = pad + 2 * (display + pad)
    chart_x = cbar_x + bar_w + 48
    canvas = Image.new("RGB", (chart_x + chart_w, top + display + pad), "white")
    draw = ImageDraw.Draw(canvas)

    draw.text((pad, 8), f"predicted: {_name(predicted)} (p={predicted['score']:.2f})", fill="black", font=font)
    why = "" if explained["index"] == predicted["index"] else \
        f" (p={explained['score']:.2f}, rank {explained['rank']})"
    draw.text((pad, 32), f"heat map: where the model sees {_name(explained)}{why}", fill=(70, 70, 70), font=small)

    canvas.paste(crop.convert("RGB").resize((display, display), Image.BICUBIC), (pad, top))
    canvas.paste(overlay(crop, cam, display), (2 * pad + display, top))
    draw.text((pad, title_h + 2), "input (the crop the model saw)", fill=(70, 70, 70), font=small)
    draw.text((2 * pad + display, title_h + 2), "Grad-CAM", fill=(70, 70, 70), font=small)

    scale = jet(np.linspace(1, 0, display)[:, None].repeat(bar_w, 1))  # high at the top
    canvas.paste(Image.fromarray(scale), (cbar_x, top))
    draw.rectangle((cbar_x - 1, top - 1, cbar_x + bar_w, top + display), outline=(120, 120, 120))
    draw.text((cbar_x + bar_w + 5, top), "high", fill="black", font=small)
    draw.text((cbar_x + bar_w + 5, top + display - 14), "low", fill="black", font=small)

    draw.text((chart_x, title_h + 2), "top classes", fill=(70, 70, 70), font=small)
    row_h, bar_max = min(48, display // max(1, len(topk))), chart_w - 2 * pad - 56
    for r, t in enumerate(topk):
        x0, y0 = chart_x, top + r * row_h
        draw.text((x0, y0), f"{t.get('rank', r + 1)}. {_name(t)}", fill="black", font=small)
        width = max(1, round(bar_max * t["score"]))
        colour = (214, 39, 40) if t["index"] == explained["index"] else (31, 119, 180)
        draw.rectangle((x0, y0 + 18, x0 + width, y0 + 32), fill=colour)
        draw.text((x0 + width + 6, y0 + 18), f"{100 * t['score']:.1f}%", fill="black", font=small)
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
