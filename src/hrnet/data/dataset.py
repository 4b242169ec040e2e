"""Labelled image datasets for evaluation and training, which never die on a bad file.

Three layouts (:class:`ImageDataset` tells the first two apart by the folder names):

- ImageNet: one folder per WordNet id; the label is the wnid's index among all 1000 sorted wnids,
  so a folder holding only some classes is still labelled right;
- any class-per-folder tree: the classes are the sorted folder names;
- a folder plus an annotation file of ``relative/path label`` lines (the mmcls format).

An item is :class:`Sample` ``(image, label, index)``, or :class:`Failed` ``(index, file, error)`` when
the file cannot be decoded; :func:`collate` drops the failures from the batch and reports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, default_collate

from ..errors import HRNetError
from .decode import ImageReadError, load_image
from .imagenet import imagenet_wnids

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm", ".jfif", ".jpe", ".ico"})


class DatasetError(HRNetError):
    """A data folder or annotation file that cannot describe a dataset."""


class Sample(NamedTuple):
    image: Any
    label: int
    index: int


class Failed(NamedTuple):
    """A file that could not be decoded: which one and a one-line reason."""
    index: int
    file: str
    error: str


class Batch(NamedTuple):
    """A collated batch: the good images, their labels and dataset indices, and what was dropped."""
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    failed: list[Failed]


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(root: str | os.PathLike) -> list[str]:
    """Every image file under ``root`` (recursively, following symlinks), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(out)


def _read_ann_file(root: Path, ann_file: Path) -> list[tuple[str, int]]:
    if not ann_file.is_file():
        raise DatasetError(f"{ann_file}: annotation file not found")
    samples = []
    for n, line in enumerate(ann_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)  # file names may contain spaces; the label is the last field
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise DatasetError(f"{ann_file}:{n}: expected 'relative/path label', got {line.strip()!r}")
        samples.append((str(root / parts[0]), int(parts[1])))
    if not samples:
        raise DatasetError(f"{ann_file}: no 'relative/path label' lines")
    return samples


class ImageDataset(Dataset):
    """``(path, label)`` samples from a folder; items are decoded, transformed :class:`Sample`\\ s.

    ``transform`` is any callable on a PIL RGB image (the eval transform, or a training augmentation).
    A file that cannot be decoded yields a :class:`Failed` record, or raises ``ImageReadError`` when
    ``strict``. ``layout`` is ``"imagenet"``, ``"folders"`` or ``"annotations"``.
    """

    def __init__(self, root: str | os.PathLike, *, ann_file: str | os.PathLike | None = None,
                 transform: Callable | None = None, strict: bool = False):
        self.root, self.transform, self.strict = Path(root), transform, strict
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: data folder not found")
        if ann_file is not None:
            self.samples = _read_ann_file(self.root, Path(ann_file))
            self.classes = [str(i) for i in range(max(label for _, label in self.samples) + 1)]
            self.layout = "annotations"
            return
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        wnids = imagenet_wnids()
        if folders and set(folders) <= set(wnids):
            self.classes, self.layout = list(wnids), "imagenet"
        else:
            self.classes, self.layout = folders, "folders"
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(f, index[c]) for c in folders for f in find_images(self.root / c)]
        if not self.samples:
            raise DatasetError(f"{self.root}: no images in class folders (expected ROOT/CLASS/IMAGE; "
                               "or pass an annotation file)")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | Failed:
        return decode_sample(self.samples[index][0], self.samples[index][1], index, self.transform, self.strict)


class ImageList(Dataset):
    """Unlabelled files (label -1) with the same items as :class:`ImageDataset`; for prediction."""

    def __init__(self, files: Sequence[str | os.PathLike], *, transform: Callable | None = None,
                 strict: bool = False):
        self.samples = [(os.fspath(f), -1) for f in files]
        self.transform, self.strict = transform, strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | Failed:
        return decode_sample(self.samples[index][0], -1, index, self.transform, self.strict)


def decode_sample(path: str, label: int, index: int, transform: Callable | None, strict: bool) -> Sample | Failed:
    """Decode and transform one file; a bad file becomes a :class:`Failed` (raised when ``strict``)."""
    try:
        img = load_image(path)
    except ImageReadError as e:
        if strict:
            raise
        return Failed(index, path, str(e))
    return Sample(img if transform is None else transform(img), label, index)


def collate(items: Sequence[Sample | Failed]) -> Batch:
    """Stack the decoded samples; the failed ones are dropped and listed in ``Batch.failed``."""
    good = [s for s in items if isinstance(s, Sample)]
    failed = [s for s in items if isinstance(s, Failed)]
    if not good:
        return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed)
    images = default_collate([s.image for s in good])
    return Batch(images, torch.tensor([s.label for s in good]), torch.tensor([s.index for s in good]), failed)
