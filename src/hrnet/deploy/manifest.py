"""The manifest of an ``hrnet optimize`` directory: what was chosen, and how to run it.

``OUT_DIR/hrnet-optimize.json`` names the backend and precision chosen, the artefact that runs
(an .onnx file, or the fp32 weights for the PyTorch backends), the reference fp32 weights, the
model and its evaluation settings and, where the images were class folders, their names. It is read
as a hostile file: size-capped, known keys only, typed, and every path must stay inside the
directory. :func:`is_optimize_dir` is how the funnel recognises such a directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HRNetError
from ..fileio import atomic_write, display_path, open_regular
from .runners import BACKENDS, PRECISIONS

MANIFEST = "hrnet-optimize.json"
FORMAT = "hrnet-optimize"
VERSION = 1
MAX_BYTES = 1 << 20  # a manifest is a few KiB even with 1000 class names
MAX_CLASSES = 100_000
MAX_NAME = 256


class ManifestError(HRNetError):
    """An optimize directory whose manifest is missing, too large, malformed or points outside it."""


@dataclass(frozen=True)
class Manifest:
    """What ``hrnet optimize`` chose (paths relative to the directory)."""

    model: str  # the zoo name the weights belong to
    backend: str
    precision: str
    artefact: str  # the file that runs: .onnx, or the weights for fused/compile
    weights: str  # the reference fp32 weights (hrnet format)
    input_size: int
    crop_pct: float | None  # the --crop-pct asked for (None: the model's)
    classes: list[str] | None = None  # class-folder names, when the images had them
    format: str = FORMAT
    version: int = VERSION


_TYPES = {"model": str, "backend": str, "precision": str, "artefact": str, "weights": str, "input_size": int,
          "crop_pct": (int, float, type(None)), "classes": (list, type(None)), "format": str, "version": int}
_REQUIRED = {"model", "backend", "precision", "artefact", "weights", "input_size", "crop_pct", "format", "version"}


def is_optimize_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a directory holding an optimize manifest (else it is weights, or a hub folder)."""
    return path is not None and os.path.isdir(path) and os.path.lexists(os.path.join(path, MANIFEST))


def _inside(directory: Path, name: str, where: str) -> Path:
    """``directory/name`` if it is a regular file that stays inside ``directory`` (no ``..``, absolute
    path or symlink leading out), else a one-line error naming the manifest."""
    root = directory.resolve()
    target = (root / name).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ManifestError(f"{where}: {name!r} points outside {display_path(directory)}")
    if not target.is_file():
        raise ManifestError(f"{where}: {name!r} is not a file in {display_path(directory)}")
    return target


def read_manifest(directory: str | os.PathLike) -> tuple[Manifest, Path, Path]:
    """The manifest of ``directory``, checked, with the absolute paths of its artefact and weights."""
    directory = Path(directory)
    path = directory / MANIFEST
    where = display_path(path)
    with open_regular(path, ManifestError) as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise ManifestError(f"{where}: larger than {MAX_BYTES // 1024} KiB; not a manifest hrnet wrote")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    if unknown := sorted(set(data) - set(_TYPES)):
        raise ManifestError(f"{where}: unknown key {unknown[0][:MAX_NAME]!r}")
    if missing := sorted(_REQUIRED - set(data)):
        raise ManifestError(f"{where}: missing key {missing[0]!r}")
    for key, value in data.items():
        if not isinstance(value, _TYPES[key]) or isinstance(value, bool):
            raise ManifestError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    if data["format"] != FORMAT or data["version"] != VERSION:
        raise ManifestError(f"{where}: format {data['format'][:40]!r} version {data['version']}; this hrnet reads "
                            f"{FORMAT} version {VERSION}")
    if data["backend"] not in BACKENDS or data["precision"] not in PRECISIONS:
        raise ManifestError(f"{where}: unknown backend/precision {data['backend'][:40]!r}:{data['precision'][:40]!r}")
    if not 1 <= data["input_size"] <= 4096 or not (data["crop_pct"] is None or 0 < data["crop_pct"] <= 1):
        raise ManifestError(f"{where}: input_size or crop_pct out of range")
    classes = data.get("classes")
    if classes is not None and (len(classes) > MAX_CLASSES or
                                not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME for c in classes)):
        raise ManifestError(f"{where}: classes must be at most {MAX_CLASSES} names of 1 to {MAX_NAME} characters")
    manifest = Manifest(**data)
    return manifest, _inside(directory, manifest.artefact, where), _inside(directory, manifest.weights, where)


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``manifest`` into ``directory`` (atomically; it is written last, so its presence means complete)."""
    text = json.dumps(asdict(manifest), indent=2) + "\n"
    return atomic_write(Path(directory) / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
