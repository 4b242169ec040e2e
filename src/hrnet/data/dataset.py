"""Labelled image datasets for evaluation and training, which never die on a bad file.

Three layouts (:class:`ImageDataset` tells the first two apart by the folder names):

- ImageNet: one folder per WordNet id; the label is the wnid's index among all 1000 sorted wnids,
  so a folder holding only some classes is still labelled right;
- any class-per-folder tree: the classes are the sorted folder names, or, given the model's class
  names (``class_names=``), each folder is labelled by its name's index among them, so a folder
  holding 7 of a model's 10 classes is labelled right and a name the model does not know is refused;
- a folder plus an annotation file of ``relative/path label`` lines (the mmcls format).

An item is :class:`Sample` ``(image, label, index)``, or :class:`Failed` ``(index, file, error)`` when
the file cannot be decoded; :func:`collate` drops the failures from the batch and reports them.

Careless or hostile trees are refused rather than mislabelled: a mostly-wnid folder with stray
folders, symlink loops (each real folder is walked once, each real file counted once), annotation
files that are not regular files, too large, or hold a label of :data:`MAX_CLASSES` or more.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..errors import HRNetError
from ..fileio import atomic_write, display_path, open_regular
from .decode import ImageReadError, load_image
from .imagenet import imagenet_names, imagenet_wnids

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                              ".pgm", ".pbm", ".pnm", ".jfif", ".jpe", ".ico"})
#: Annotation labels must be below this. Per-class tables are sized by the largest label, so one
#: absurd label (``10000000000``) would allocate gigabytes; ImageNet-21k has 21,841 classes.
MAX_CLASSES = 1_000_000
#: An annotation file is refused above this size or line count (ImageNet-21k: 14.2M images, ~0.5 GB).
MAX_ANN_BYTES = 1 << 30
MAX_ANN_LINES = 20_000_000
MAX_ANN_LINE = 8192  # bytes: a path (PATH_MAX is 4096) and a label
MAX_SPLIT_BYTES = 1 << 30  # a split file (RUN_DIR/split.json): ImageNet's 1.28M relative paths are ~40 MB
_LABEL = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also accepts '²', which int() rejects


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


def _dir_key(path: str) -> tuple[int, int] | None:
    """The identity of the directory ``path`` leads to (after symlinks), or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan(top: str, visited: set[tuple[int, int] | None], hops: int = 0) -> Iterator[tuple[str, str, int]]:
    """``(path, real path, symlinks followed to reach it)`` of each image file under ``top``.

    Symlinks are followed, but a directory whose ``(st_dev, st_ino)`` is in ``visited`` is not entered
    and every directory entered is added to it: a link loop (``self -> .``) ends, and each real
    directory is read once. Hidden files and folders are skipped, and so are unreadable folders.
    """
    stack = [(top, os.path.realpath(top), hops)]
    while stack:
        folder, real, hops = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                link, is_dir = e.is_symlink(), e.is_dir()
            except OSError:
                continue
            target = os.path.realpath(e.path) if link else os.path.join(real, e.name)
            if is_dir:
                key = _dir_key(e.path)
                if key is not None and key not in visited:
                    visited.add(key)
                    subdirs.append((e.path, target, hops + link))
            elif is_image_file(e.name):
                yield e.path, target, hops + link
        stack.extend(reversed(subdirs))


def _once_each(found: Iterable[tuple[str, str, int, int]]) -> list[tuple[str, int]]:
    """``(path, label)`` once per real file: the path reached through the fewest symlinks (the first
    of those), so a file and a link to it count once, under the file's own folder."""
    chosen: dict[str, tuple[str, int, int]] = {}
    for path, real, hops, label in found:
        if real not in chosen or hops < chosen[real][1]:
            chosen[real] = (path, hops, label)
    return [(path, label) for path, _, label in chosen.values()]


def find_images(root: str | os.PathLike) -> list[str]:
    """Every image file under ``root`` (recursively, following symlinks, each real file once), sorted."""
    root = os.fspath(root)
    found = ((*entry, -1) for entry in _scan(root, {_dir_key(root)}))
    return sorted(path for path, _ in _once_each(found))


def _read_ann_file(root: Path, ann_file: Path) -> list[tuple[str, int]]:
    """The ``relative/path label`` lines of ``ann_file``, bounded before and while reading."""
    name = display_path(ann_file)
    with open_regular(ann_file, DatasetError) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_ANN_BYTES:
            raise DatasetError(f"{name}: {size} bytes is larger than an annotation file can be "
                               f"({MAX_ANN_BYTES >> 20} MB)")
        samples = []
        for n, raw in enumerate(iter(lambda: f.readline(MAX_ANN_LINE + 1), b""), 1):
            if len(raw) > MAX_ANN_LINE and not raw.endswith(b"\n"):
                raise DatasetError(f"{name}:{n}: line longer than {MAX_ANN_LINE} bytes")
            if n > MAX_ANN_LINES:
                raise DatasetError(f"{name}: more than {MAX_ANN_LINES} lines")
            line = raw.decode("utf-8", "surrogateescape").strip()  # paths keep their bytes, as os.fsdecode does
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)  # file names may contain spaces; the label is the last field
            if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
                raise DatasetError(f"{name}:{n}: expected 'relative/path label' with a label 0, 1, 2..., "
                                   f"got {display_path(line[:200])!r}")
            digits = parts[1].lstrip("0") or "0"  # int() refuses more than 4300 digits
            if len(digits) > 9 or int(digits) >= MAX_CLASSES:
                raise DatasetError(f"{name}:{n}: label {parts[1][:30]} is not below {MAX_CLASSES}; "
                                   "labels are class indices 0, 1, 2...")
            samples.append((os.path.join(root, parts[0]), int(digits)))
    if not samples:
        raise DatasetError(f"{name}: no 'relative/path label' lines")
    return samples


class ImageDataset(Dataset):
    """``(path, label)`` samples from a folder; items are decoded, transformed :class:`Sample`\\ s.

    ``transform`` is any callable on a PIL RGB image (the eval transform, or a training augmentation).
    A file that cannot be decoded yields a :class:`Failed` record, or raises ``ImageReadError`` when
    ``strict``. ``layout`` is ``"imagenet"``, ``"folders"`` or ``"annotations"``.

    Hidden files and folders are ignored. When at least half of the class folders are ImageNet wnids
    and some are not (``lost+found``, ``backup``), the folder is refused with the odd names listed,
    since treating it as class folders would shift every label; ``exclude_unknown=True`` evaluates the
    wnid folders and lists the others in :attr:`excluded`. Symlinks are followed, each real folder and
    each real file is counted once.

    ``class_names`` (a model's, in output order) labels class folders by name: :attr:`classes` is then
    that list, and a folder whose name is not in it is refused, naming it (an ImageNet wnid tree and a
    1000-name list keep the wnid order). Without names, ``num_classes`` (the model's output count)
    refuses a folder count that differs from it: folders numbered 0..6 for a 10-class model would be
    mislabelled silently.
    """

    def __init__(self, root: str | os.PathLike, *, ann_file: str | os.PathLike | None = None,
                 transform: Callable | None = None, strict: bool = False, exclude_unknown: bool = False,
                 class_names: Sequence[str] | None = None, num_classes: int | None = None):
        self.root, self.transform, self.strict = Path(root), transform, strict
        self.excluded: list[str] = []
        name = display_path(self.root)
        if not self.root.is_dir():
            raise DatasetError(f"{name}: data folder not found")
        if ann_file is not None:
            self.samples = _read_ann_file(self.root, Path(ann_file))
            self.classes = [str(i) for i in range(max(label for _, label in self.samples) + 1)]
            self.layout = "annotations"
            return
        try:
            with os.scandir(self.root) as it:
                folders = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
        except OSError as e:
            raise DatasetError(f"{name}: cannot read the data folder ({e.strerror or e})") from None
        wnids = imagenet_wnids()
        wnid_set = set(wnids)
        known, odd = [f for f in folders if f in wnid_set], [f for f in folders if f not in wnid_set]
        if known and odd and not exclude_unknown and len(known) >= len(odd):
            shown = ", ".join(display_path(f) for f in odd[:10]) + (f" and {len(odd) - 10} more" * (len(odd) > 10))
            raise DatasetError(f"{name}: {len(known)} folders are ImageNet wnids and {len(odd)} are not: {shown}; "
                               "move them away or exclude them (hrnet eval --exclude-unknown, "
                               "ImageDataset(exclude_unknown=True))")
        imagenet = bool(known) and (not odd or exclude_unknown)
        if class_names is not None and not (imagenet and len(class_names) == len(wnids)):
            names = [str(c) for c in class_names]
            unknown = [f for f in folders if f not in set(names)]
            if unknown:
                more = f"; {len(unknown) - 1} other folders neither" if len(unknown) > 1 else ""
                if tuple(names) == imagenet_names():
                    raise DatasetError(f"{name}: folder '{display_path(unknown[0])}' is neither an ImageNet wnid nor "
                                       f"one of the model's ImageNet class names{more}; an ImageNet tree has one "
                                       f"folder per wnid ({wnids[0]}, {wnids[1]}, ...)")
                shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                raise DatasetError(f"{name}: folder '{display_path(unknown[0])}' is not one of the model's "
                                   f"{len(names)} classes ({shown}){more}")
            self.classes, self.layout = names, "folders"
        elif imagenet:
            self.classes, self.layout, self.excluded = list(wnids), "imagenet", odd
        else:
            if num_classes is not None and len(folders) != num_classes:
                raise DatasetError(f"{name}: {len(folders)} class folders, but the model has {num_classes} classes "
                                   "and no class names to match folders by: give it one folder per class (all "
                                   f"{num_classes}, sorted as its outputs), or weights with class names (hrnet "
                                   "train writes them)")
            self.classes, self.layout = folders, "folders"
        index: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            index.setdefault(c, i)
        tops = [str(self.root / c) for c in folders]
        visited = {_dir_key(p) for p in [str(self.root), *tops]}  # a link into another class is not followed
        found = ((*entry, index[c]) for c, top in zip(folders, tops) if c in index
                 for entry in _scan(top, visited, int(os.path.islink(top))))
        self.samples = sorted(_once_each(found), key=lambda s: (s[1], s[0]))
        if not self.samples:
            raise DatasetError(f"{name}: no images in class folders (expected ROOT/CLASS/IMAGE; "
                               "or pass an annotation file)")

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """What a model trained on this set calls its classes: the folder names, ImageNet's names for a
        wnid tree, None for annotation files (their labels are bare numbers)."""
        if self.layout == "annotations":
            return None
        return tuple(imagenet_names()) if self.layout == "imagenet" else tuple(self.classes)

    def relative(self, path: str) -> str:
        """``path`` (a sample's) relative to the root, with ``/``: how a split file names it."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def select(self, files: Iterable[str], *, transform: Callable | None = None, source: str = "split") -> ImageDataset:
        """A copy holding only ``files`` (paths relative to the root, as :meth:`relative` gives them), in
        this set's order, with ``transform``. A file that is not among the samples is a :class:`DatasetError`."""
        by_name = {self.relative(p): (p, label) for p, label in self.samples}
        wanted = set(files)
        missing = sorted(wanted - by_name.keys())
        if missing:
            raise DatasetError(f"{source}: lists {display_path(missing[0])!r}, which is not an image of "
                               f"{display_path(self.root)} (any more); start a new run, or restore the file")
        out = object.__new__(ImageDataset)
        out.__dict__.update(self.__dict__)
        out.transform = transform
        out.samples = [s for s in self.samples if self.relative(s[0]) in wanted]
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | Failed:
        return decode_sample(self.samples[index][0], self.samples[index][1], index, self.transform, self.strict)


def split_per_class(dataset: ImageDataset, fraction: float, seed: int) -> dict[str, Any]:
    """Hold out ``fraction`` of each class of ``dataset``, reproducibly: the split record
    ``{"root", "seed", "val_fraction", "classes", "train": [...], "val": [...]}`` with paths relative to
    the root (a function of the sorted file names and ``seed`` only).

    Each class gives ``round(n x fraction)`` images to ``val``, but at least one when it has two or more
    and never its last one, so every class is both trained on and validated where it can be.
    """
    by_class: dict[int, list[str]] = {}
    for path, label in dataset.samples:
        by_class.setdefault(label, []).append(dataset.relative(path))
    train: list[str] = []
    val: list[str] = []
    for label, files in sorted(by_class.items()):
        files.sort()
        n = len(files)
        n_val = min(max(round(n * fraction), 1 if n >= 2 and fraction > 0 else 0), n - 1)
        order = np.random.default_rng([seed, label]).permutation(n)
        held = set(order[:n_val].tolist())
        val += [f for i, f in enumerate(files) if i in held]
        train += [f for i, f in enumerate(files) if i not in held]
    return {"root": str(dataset.root.resolve()), "seed": seed, "val_fraction": fraction,
            "classes": list(dataset.classes), "train": sorted(train), "val": sorted(val)}


def write_split(split: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a split record (:func:`split_per_class`) as JSON, atomically."""
    text = json.dumps(split, indent=1) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_split(path: str | os.PathLike) -> dict[str, Any]:
    """A split record written by :func:`write_split`, checked for shape and bounded in size."""
    name = display_path(path)
    with open_regular(Path(path), DatasetError) as f:
        if os.fstat(f.fileno()).st_size > MAX_SPLIT_BYTES:
            raise DatasetError(f"{name}: larger than a split file can be ({MAX_SPLIT_BYTES >> 20} MB)")
        try:
            split = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise DatasetError(f"{name}: not a split file ({type(e).__name__})") from None
    ok = isinstance(split, dict) and all(isinstance(split.get(k), list) and all(isinstance(f, str) for f in split[k])
                                         for k in ("train", "val", "classes"))
    if not ok:
        raise DatasetError(f"{name}: not a split file (expected lists 'train', 'val' and 'classes' of strings)")
    return split


def load_split(path: str | os.PathLike, part: str = "val", *, root: str | os.PathLike | None = None,
               transform: Callable | None = None, class_names: Sequence[str] | None = None) -> ImageDataset:
    """The ``part`` (``"train"`` or ``"val"``) of the split file ``path`` (``RUN_DIR/split.json``) as a
    dataset under ``root`` (default: the root the split names), labelled by ``class_names`` (default:
    the split's classes): what ``hrnet eval`` of a run's held-out images reads."""
    split = read_split(path)
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    folder = root if root is not None else split.get("root")
    if not isinstance(folder, (str, os.PathLike)):
        raise DatasetError(f"{display_path(path)}: names no data folder; pass root=")
    names = list(class_names) if class_names is not None else split["classes"]
    return ImageDataset(folder, class_names=names).select(split[part], transform=transform, source=display_path(path))


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
