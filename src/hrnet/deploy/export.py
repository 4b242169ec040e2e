"""Export to ONNX and to a ``torch.export`` program (.pt2), both verified against the eager model.

Both files carry the preprocessing settings (``model.pretrained_cfg.eval``) as metadata, so a
consumer can rebuild the exact input pipeline without hrnet. What is exported is the
BN-folded model of :func:`~hrnet.deploy.fold.fuse_model` in NCHW layout.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import HRNetError
from ..fileio import atomic_write
from .fold import fuse_model
from .ort import INPUT_NAME, OUTPUT_NAME, ort_session
METADATA_FILE = "hrnet_metadata.json"  # the .pt2 extra file holding the metadata
CHECK_BATCHES = (1, 3)  # batch sizes a dynamic-batch export is verified at
RTOL = 1e-4  # max |exported - eager| / max |eager|


class ExportError(HRNetError):
    """An export that failed, or whose output disagrees with the eager model."""


def export_metadata(model: nn.Module, input_size: tuple[int, int]) -> dict[str, str]:
    """String key/values describing the model and its preprocessing (``model.eval_cfg``; pixel values
    0..255, RGB). Strings are stored as they are, numbers and lists as JSON."""
    meta = {"hrnet.input_size": json.dumps(list(input_size)), "hrnet.input_layout": "NCHW RGB float32",
            "hrnet.output": "logits", "hrnet.num_classes": str(model.num_classes)}
    record = getattr(model, "pretrained_cfg", None)
    if record is not None:
        meta["hrnet.model"] = record.name
    if getattr(model, "class_names", None) is not None:
        meta["hrnet.class_names"] = json.dumps(list(model.class_names))
    for key, value in model.eval_cfg.to_dict().items():
        meta[f"hrnet.preprocess.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _nchw_fused(model: nn.Module) -> nn.Module:
    return fuse_model(model, channels_last=False).cpu()


def _default_input_size(model: nn.Module) -> tuple[int, int]:
    return model.eval_cfg.input_size, model.eval_cfg.input_size


def _check(name: str, reference: nn.Module, run, input_size: tuple[int, int], batches: tuple[int, ...]) -> None:
    """Raise unless ``run`` reproduces ``reference``'s logits to RTOL at every batch size."""
    if next(reference.parameters()).device.type != "cpu":
        reference = copy.deepcopy(reference).cpu()
    gen = torch.Generator().manual_seed(0)
    for b in batches:
        x = torch.randn(b, 3, *input_size, generator=gen)
        with torch.inference_mode():
            want = reference.eval()(x)
        got = torch.as_tensor(run(x))
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if got.shape != want.shape or not err <= RTOL:
            raise ExportError(f"{name}: output differs from the eager model at batch {b} "
                              f"(shape {tuple(got.shape)}, relative error {err:.2e} > {RTOL})")


def export_onnx(model: nn.Module, path: str | os.PathLike, *, batch: int | None = None,
                input_size: tuple[int, int] | None = None, opset: int | None = None, check: bool = True) -> Path:
    """Write ``model`` (an HRNet classifier, fused here if not already) as ONNX to ``path``.

    ``batch=None`` gives a dynamic batch axis, an int a fixed one. With ``check`` the file is run
    by onnxruntime and compared with the eager model (batches 1 and 3, or ``batch``).
    """
    path = Path(path)
    input_size = tuple(input_size or _default_input_size(model))
    fused = _nchw_fused(model)
    example = torch.zeros(batch or 2, 3, *input_size)
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1)},)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(fused, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False)
    except Exception as e:  # the exporter raises many types; report one line naming the target
        raise ExportError(f"{path}: ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    for key, value in export_metadata(model, input_size).items():
        program.model.metadata_props[key] = value

    def write(tmp: str) -> None:  # checked before it replaces anything at ``path``
        program.save(tmp)
        if check:
            session = ort_session(tmp)
            _check(str(path), model, lambda x: session.run(None, {INPUT_NAME: x.numpy()})[0], input_size,
                   (batch,) if batch else CHECK_BATCHES)
    return atomic_write(path, write)


def export_pt2(model: nn.Module, path: str | os.PathLike, *, batch: int | None = None,
               input_size: tuple[int, int] | None = None, check: bool = True) -> Path:
    """Write ``model`` as a ``torch.export`` program (load with ``torch.export.load``).

    The metadata is the JSON extra file ``hrnet_metadata.json``. Batch and check as in
    :func:`export_onnx`.
    """
    path = Path(path)
    input_size = tuple(input_size or _default_input_size(model))
    fused = _nchw_fused(model)
    example = torch.zeros(batch or 2, 3, *input_size)
    dynamic = None if batch else {"x": {0: torch.export.Dim("batch", min=1)}}
    try:
        program = torch.export.export(fused, (example,), dynamic_shapes=dynamic)
    except Exception as e:
        raise ExportError(f"{path}: torch.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    def write(tmp: str) -> None:
        # Serialised in memory, then written by Python: torch's file writer, on a failed write (a full
        # disk), throws again from its destructor and aborts the interpreter (torch 2.14, rc 134).
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={METADATA_FILE: json.dumps(export_metadata(model, input_size))})
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
        del buffer
        if check:
            _check(str(path), model, load_pt2(tmp)[0].module(), input_size, (batch,) if batch else CHECK_BATCHES)
    return atomic_write(path, write)


def load_pt2(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """A saved .pt2 program and its hrnet metadata."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program, json.loads(extra[METADATA_FILE] or "{}")
