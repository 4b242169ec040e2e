"""ONNX (under onnxruntime) and torch.export (.pt2) files give the eager logits at batch 1 and 3,
and carry the preprocessing settings; the ``hrnet export`` command writes and checks them."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from hrnet.deploy import ExportError, export_onnx, export_pt2, load_pt2
from hrnet import create_model

from helpers import randomize, rel_err
from test_deploy import RTOL, assert_fused_matches_eager

SIZE = (64, 64)


@pytest.fixture(scope="module", params=["hrnet-w18", "hrnet-w30"])
def model(request) -> torch.nn.Module:
    return randomize(create_model(request.param))


def eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_fused_model_matches_eager(model):
    assert_fused_matches_eager(model)


@pytest.mark.slow
def test_onnx_has_a_dynamic_batch_and_matches_eager_under_onnxruntime(model, tmp_path):
    path = export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, symbolic batch axis
    for b in (1, 3):
        x = torch.randn(b, 3, *SIZE)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert got.shape == (b, 1000)
        assert rel_err(got, eager(model, x)) < RTOL


@pytest.mark.slow
def test_pt2_has_a_dynamic_batch_and_matches_eager(model, tmp_path):
    path = export_pt2(model, tmp_path / "m.pt2", input_size=SIZE)
    program = torch.export.load(path).module()
    for b in (1, 3):
        x = torch.randn(b, 3, *SIZE)
        assert rel_err(program(x), eager(model, x)) < RTOL


@pytest.mark.slow
def test_fixed_batch_exports_carry_the_preprocessing_settings(tmp_path):
    model = randomize(create_model("hrnet-w18-small"))
    onnx_path = export_onnx(model, tmp_path / "m.onnx", batch=2, input_size=SIZE)
    program, pt2_meta = load_pt2(export_pt2(model, tmp_path / "m.pt2", batch=2, input_size=SIZE))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, *SIZE]
    x = torch.randn(2, 3, *SIZE)
    assert rel_err(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), eager(model, x)) < RTOL
    with pytest.raises(Exception):  # a fixed batch really is fixed
        program.module()(x[:1])

    onnx_meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    for meta in (onnx_meta, pt2_meta):
        assert meta["hrnet.model"] == "hrnet-w18-small"
        assert meta["hrnet.num_classes"] == "1000"
        assert json.loads(meta["hrnet.preprocess.mean"]) == [123.675, 116.28, 103.53]  # REFERENCE.md §4
        assert json.loads(meta["hrnet.preprocess.std"]) == [58.395, 57.12, 57.375]
        assert json.loads(meta["hrnet.preprocess.resize_size"]) == 256
        assert meta["hrnet.preprocess.interpolation"] == "bilinear"  # a plain string, not JSON-quoted
        assert json.loads(meta["hrnet.input_size"]) == list(SIZE)


@pytest.mark.slow
def test_a_wrong_export_is_caught_by_the_check(tmp_path, monkeypatch):
    model = randomize(create_model("hrnet-w18-small"))
    from hrnet.deploy import fold as optimize

    real = optimize.fold_bn

    def off_by_one(conv, bn):
        out = real(conv, bn)
        out.bias.data += 1.0
        return out
    monkeypatch.setattr(optimize, "fold_bn", off_by_one)
    with pytest.raises(ExportError, match=r"m\.onnx: output differs from the eager model"):
        export_onnx(model, tmp_path / "m.onnx", input_size=SIZE)
