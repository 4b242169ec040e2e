"""Training curves from a run's ``log.jsonl``, drawn with Pillow alone (no matplotlib).

Three panels over the training step: loss (log scale), accuracy (training, and validation per epoch), and the
learning rate.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_write
from .rundir import RunLogError, read_jsonl

__all__ = ["RunLogError", "plot_run", "read_log"]

Series = tuple[str, tuple[int, int, int], list[tuple[float, float]]]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 720, 230, 70, 20, 28, 32


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The JSON records of ``RUN_DIR/log.jsonl`` (or of that file, given directly); a line torn by a crash
    at the end is left out."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "log.jsonl"
    records = read_jsonl(path)
    if not any(r.get("kind") == "step" for r in records):
        raise RunLogError(f"{path}: no logged training steps yet")
    return records


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / 4 for i in range(5)]


def _draw_panel(img: Image.Image, top: int, title: str, series: list[Series], x_max: float,
                log: bool = False) -> None:
    """One panel; with ``log`` the y axis is logarithmic (an early loss spike then hides nothing)."""
    if log:
        series = [(label, colour, [(x, math.log10(max(y, 1e-8))) for x, y in pts]) for label, colour, pts in series]
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, y0, y1 = MARGIN_L, PANEL_W - MARGIN_R, top + MARGIN_T, top + PANEL_H - MARGIN_B
    values = [y for _, _, pts in series for _, y in pts]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * x / max(x_max, 1), y1 - (y1 - y0) * (y - lo) / (hi - lo)

    d.rectangle([left, y0, right, y1], outline=(160, 160, 160))
    for v in _ticks(lo, hi):
        _, y = px(0, v)
        d.line([left - 4, y, left, y], fill=(120, 120, 120))
        d.text((4, y - 6), f"{10 ** v if log else v:.3g}", fill=(60, 60, 60), font=font)
    for v in _ticks(0, x_max):
        x, _ = px(v, lo)
        d.line([x, y1, x, y1 + 4], fill=(120, 120, 120))
        d.text((x - 10, y1 + 8), f"{v:.0f}", fill=(60, 60, 60), font=font)
    d.text((left, top + 8), title, fill=(0, 0, 0), font=font)
    lx = left + 140
    for label, colour, pts in series:
        line = [px(x, y) for x, y in pts]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for x, y in line if len(line) < 40 else []:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.line([lx, top + 14, lx + 16, top + 14], fill=colour, width=2)
        d.text((lx + 20, top + 8), label, fill=(0, 0, 0), font=font)
        lx += 30 + 7 * len(label)


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draw loss / accuracy / learning rate against the step into the PNG ``out``."""
    records = read_log(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    blue, orange = (31, 119, 180), (230, 110, 20)

    def pts(rows: list[dict], key: str) -> list[tuple[float, float]]:
        return [(r["step"], v) for r in rows if isinstance(v := r.get(key), (int, float)) and math.isfinite(v)]

    panels: list[tuple[str, list[Series], bool]] = [
        ("loss (log scale)", [("train", blue, pts(steps, "loss")), ("val", orange, pts(epochs, "val_loss"))], True),
        ("accuracy (%)", [("train", blue, pts(steps, "accuracy")), ("val top-1", orange, pts(epochs, "val_top1"))],
         False),
        ("learning rate", [("lr", blue, pts(steps, "lr"))], False),
    ]
    x_max = max(r["step"] for r in steps)
    img = Image.new("RGB", (PANEL_W, PANEL_H * len(panels) + 20), "white")
    for i, (title, series, log) in enumerate(panels):
        _draw_panel(img, i * PANEL_H, title, [s for s in series if s[2]], x_max, log)
    ImageDraw.Draw(img).text((PANEL_W // 2 - 12, PANEL_H * len(panels)), "step", fill=(0, 0, 0))
    out = Path(out)
    atomic_write(out, lambda tmp: img.save(tmp, format="PNG"))
    return out
