"""Static int8 quantization with onnxruntime, calibrated on the user's own images.

The model is exported as fp32 ONNX (the BN-folded graph of ``hrnet export``, dynamic batch), then
``onnxruntime.quantization.quantize_static`` rewrites it in QDQ form: per-channel symmetric int8
weights, per-tensor uint8 activations whose ranges come from running the calibration images through
the model's exact evaluation transform; the classifier stays fp32. uint8 activations because
onnxruntime's x86 kernels run u8 x s8 natively (AVX-512 VNNI); s8 x s8 ran at a third of the speed.

Deterministic: the calibration images are a seeded sample of the sorted file list, calibrated in
batches of a fixed size, so the same images give a byte-identical file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data import ImageReadError, eval_transform, find_images, load_image
from ..errors import HRNetError
from ..extras import require
from ..fileio import atomic_write
from .export import export_metadata, export_onnx
from .ort import INPUT_NAME

METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
"""minmax: the observed range of each activation; entropy: the range minimising the KL divergence of
the quantized histogram; percentile: the range covering 99.999 % of the values."""
CALIB_BATCH = 4  # images per calibration run; entropy/percentile keep every activation of a batch
SAMPLE_SEED = 0  # which images a --num-images sample takes
ACTIVATIONS = "uint8"  # activation type, "uint8" or "int8" (see the module docstring)


class QuantizeError(HRNetError):
    """Quantization that cannot start (missing extra, no usable calibration image) or failed."""


def require_onnx() -> None:
    """Raise a one-line error unless the ``hrnet[onnx]`` extra (onnx, onnxruntime, onnxscript) is installed."""
    require("onnx", "int8 quantization", error=QuantizeError)


def calibration_files(calib: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The sorted image files of a folder (recursive), or the given files sorted and de-duplicated."""
    if isinstance(calib, (str, os.PathLike)):
        root = Path(calib)
        if not root.is_dir():
            raise QuantizeError(f"{root}: calibration folder not found")
        files = find_images(root)
        if not files:
            raise QuantizeError(f"{root}: no image files in the calibration folder")
        return files
    files = sorted({os.fspath(f) for f in calib})
    if not files:
        raise QuantizeError("no calibration images given")
    return files


def calibration_batches(files: list[str], transform, num_images: int) -> tuple[list[np.ndarray], int]:
    """Up to ``num_images`` decoded, transformed images as float32 NCHW batches of CALIB_BATCH, and
    how many files failed to decode. Files are tried in a seeded shuffle of ``files`` (so a sample
    spans every class folder), skipping bad ones, until ``num_images`` have decoded."""
    order = list(files)
    random.Random(SAMPLE_SEED).shuffle(order)
    images: list[torch.Tensor] = []
    failed = 0
    first_error = ""
    for f in order:
        if len(images) == num_images:
            break
        try:
            images.append(transform(load_image(f)))
        except ImageReadError as e:
            failed += 1
            first_error = first_error or str(e)
    if not images:
        raise QuantizeError(f"none of the {len(files)} calibration files could be decoded ({first_error})")
    stacked = torch.stack(images).numpy()
    return [stacked[i:i + CALIB_BATCH] for i in range(0, len(stacked), CALIB_BATCH)], failed


class _Reader:
    """onnxruntime's calibration data reader over fixed batches. ``set_range``/``__len__`` let
    quantize_static feed one batch per ``collect_data`` call (its ``CalibStridedMinMax`` option), so
    the histogram calibrators fold each batch into their histograms instead of keeping every
    activation of every image."""

    def __init__(self, batches: list[np.ndarray], bar: tqdm):
        self.batches, self.bar = batches, bar
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.pending, None)
        if batch is None:
            return None
        self.bar.update(len(batch))
        return {INPUT_NAME: batch}


@contextlib.contextmanager
def _quiet_onnxruntime():
    """onnxruntime's quantizer prints to stdout and warns through the root logger; keep our
    stdout clean (``--json``) and our stderr to what we report."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def quantize_onnx(model: nn.Module, calib_files: str | os.PathLike | Iterable[str | os.PathLike],
                  out_path: str | os.PathLike, *, num_images: int = 256, method: str = "minmax",
                  input_size: int | None = None, progress: bool = False) -> Path:
    """Write ``model`` as a statically quantized int8 ONNX file (QDQ, per-channel weights) to ``out_path``.

    ``calib_files`` is a folder (searched recursively) or a list of image files; at most
    ``num_images`` of them, a seeded sample, calibrate the activation ranges with ``method`` (one of
    :data:`METHODS`). Images go through the model's evaluation transform at ``input_size`` (default:
    the record's crop), which is also the graph's fixed input size; the batch axis is dynamic.
    Unreadable files are skipped and counted. The file carries ``hrnet export``'s metadata plus
    ``hrnet.precision=int8`` and the calibration settings, and is written atomically.
    """
    require_onnx()
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
    if num_images < 1:
        raise QuantizeError(f"--num-images must be at least 1, got {num_images}")
    out_path = Path(out_path)
    transform = eval_transform(model, input_size)
    size = (transform.input_size, transform.input_size)
    files = calibration_files(calib_files)
    with tqdm(total=min(num_images, len(files)), unit="img", desc="calibrate", disable=not progress,
              dynamic_ncols=True) as bar:
        batches, skipped = calibration_batches(files, transform, num_images)
        bar.total = sum(len(b) for b in batches)
        with tempfile.TemporaryDirectory(prefix="hrnet-quantize-") as tmp:
            fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", input_size=size, check=False)
            prepared = Path(tmp) / "prepared.onnx"
            int8 = Path(tmp) / "int8.onnx"
            try:
                with _quiet_onnxruntime():
                    # symbolic shape inference cannot follow the dynamic batch through the fusion
                    # layers' Resize/Slice; onnx's own shape inference and the graph optimiser can
                    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
                    # the classifier (about 0.1 % of the multiply-adds) stays fp32: quantized logits take
                    # only 256 values, which ties classes in the top-5 of a 1000-way output
                    nodes = onnx.load(str(prepared)).graph.node
                    classifier = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
                    quantize_static(
                        str(prepared), str(int8), _Reader(batches, bar), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if ACTIVATIONS == "uint8" else QuantType.QInt8,
                        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[method],
                        nodes_to_exclude=classifier, extra_options={"CalibStridedMinMax": 1})
            except Exception as e:  # onnxruntime raises many types; report one line
                raise QuantizeError(f"{out_path}: quantization failed: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from e
            proto = onnx.load(str(int8))
    n = sum(len(b) for b in batches)
    meta = {**export_metadata(model, size), "hrnet.precision": "int8",
            "hrnet.quantization": f"onnxruntime static QDQ, int8 per-channel weights, {ACTIVATIONS} activations, "
                                  "fp32 classifier",
            "hrnet.calibration.method": method, "hrnet.calibration.images": str(n),
            "hrnet.calibration.skipped": str(skipped)}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    atomic_write(out_path, lambda tmp: onnx.save(proto, tmp))
    return out_path
