"""scikit-learn's 1,797 handwritten digit scans as a class-per-folder image tree: a small real data set
that needs no download, for the digits recipe (``hrnet train digits``), the demo and the tests.

The scans are 8x8 with 17 grey levels (0..16); each is scaled to 0..255, upscaled bilinearly to
``size`` x ``size`` and saved as a greyscale PNG ``{train,val}/<digit>/<index>.png`` (``index`` is the
scan's position in ``load_digits()``). The held-out split is stratified and fixed by ``seed``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import HRNetError
from ..extras import require

NUM_DIGITS = 1797  # len(sklearn.datasets.load_digits().images)


class DatasetWriteError(HRNetError):
    """The output folder cannot take the data set (exists and is not empty, or bad options)."""


def digits_split(targets: np.ndarray, val_fraction: float = 0.2, seed: int = 0,
                 per_class: int | None = None) -> dict[str, dict[int, np.ndarray]]:
    """``{"train": {digit: indices}, "val": {...}}`` for the labels ``targets``: per digit, a seeded
    permutation of its scans, the first ``round(n * val_fraction)`` held out; ``per_class`` keeps only
    that many scans per digit."""
    rng = np.random.default_rng(seed)
    split: dict[str, dict[int, np.ndarray]] = {"train": {}, "val": {}}
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(targets == label))[:per_class]
        n_val = round(len(idx) * val_fraction)
        split["val"][label], split["train"][label] = idx[:n_val], idx[n_val:]
    return split


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One 8x8 scan (values 0..16) as a ``size`` x ``size`` 8-bit greyscale image."""
    return Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), "L").resize((size, size), Image.BILINEAR)


def write_digits(root: str | os.PathLike, *, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 per_class: int | None = None) -> tuple[Path, Path]:
    """Write the digits under ``root`` (``root/train/<digit>/*.png``, ``root/val/<digit>/*.png``) and return
    the two folders. ``root`` must not exist or be empty: the tree is built in a temporary folder next
    to it and renamed into place, so ``root`` is either complete or absent. ``val_fraction=0`` writes
    no ``val`` folder. Needs scikit-learn (``pip install 'hrnet[digits]'``)."""
    root = Path(root)
    if not 0 <= val_fraction < 1:
        raise DatasetWriteError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 8 <= size <= 1024:
        raise DatasetWriteError(f"--size must be between 8 and 1024 pixels, got {size}")
    if per_class is not None and per_class < 1:
        raise DatasetWriteError(f"--per-class must be at least 1, got {per_class}")
    _check_target(root)
    require("digits", "the digits data set")
    digits = _load()
    split = digits_split(digits.target, val_fraction, seed, per_class)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for name, parts in split.items():
            for label, indices in parts.items():
                if len(indices) == 0:
                    continue
                folder = tmp / name / str(label)
                folder.mkdir(parents=True)
                for i in indices:
                    digit_image(digits.images[i], size).save(folder / f"{i:04d}.png")
        _check_target(root)
        try:
            os.replace(tmp, root)  # replaces an empty directory atomically on POSIX
        except OSError as e:
            raise DatasetWriteError(f"{root}: cannot move the data set into place ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "train", root / "val"


def _check_target(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetWriteError(f"{root}: already exists and is not an empty folder; choose another OUT_DIR "
                                "or remove it")


def _load():
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    return load_digits()
