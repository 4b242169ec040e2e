"""The inference-optimised model and the backends give the eager model's logits (1e-4 relative)."""

from __future__ import annotations

import sys

import pytest
import torch

from hrnet.deploy import BACKENDS, BackendError, fuse_model, make_runner
from hrnet import create_model

from helpers import randomize, rel_err

RTOL = 1e-4


@pytest.fixture(scope="module")
def w18() -> torch.nn.Module:
    return randomize(create_model("hrnet-w18"))


def test_fused_model_matches_eager_at_batch_1_and_3():
    assert_fused_matches_eager(randomize(create_model("hrnet-w18-small")))  # W18, W30: test_export.py


def assert_fused_matches_eager(model: torch.nn.Module) -> None:
    fused = fuse_model(model)
    for b in (1, 3):
        x = torch.randn(b, 3, 64, 64)
        with torch.inference_mode():
            want = model(x)
            got = fused(x.contiguous(memory_format=torch.channels_last))
        assert got.shape == (b, 1000)
        assert rel_err(got, want) < RTOL


def test_fused_model_has_no_batchnorm_and_no_training_modules(w18):
    fused = fuse_model(w18)
    kinds = {type(m) for m in fused.modules()}
    assert not kinds & {torch.nn.BatchNorm2d, torch.nn.Dropout}
    conv = next(m for m in fused.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # The same module tree: every conv stays (each now carries its BatchNorm as a bias), and each
    # of the 325 BatchNorms (one per conv, as timm's hrnet_w18) became an Identity.
    assert sum(isinstance(m, torch.nn.Conv2d) for m in w18.modules()) == 325  # as timm's hrnet_w18
    assert sum(isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in fused.modules()) == 325


def test_fused_model_leaves_the_original_untouched(w18):
    before = {k: v.clone() for k, v in w18.state_dict().items()}
    fuse_model(w18)
    after = w18.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fused_model_handles_inputs_not_divisible_by_32(w18):
    x = torch.randn(1, 3, 70, 90)
    with torch.inference_mode():
        assert rel_err(fuse_model(w18)(x), w18(x)) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_eager_logits(backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino backend needs hrnet[openvino] (not in the test extra)")
    model = randomize(create_model("hrnet-w18-small"))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
    run = make_runner(model, backend, input_size=(64, 64))
    assert rel_err(run(x[:1]), want[:1]) < RTOL
    if backend != "compile":  # another batch size means another minute-long compilation
        assert rel_err(run(x), want) < RTOL


def test_unknown_backend_names_the_choices():
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'.*onnxruntime"):
        make_runner(create_model("hrnet-w18-small"), "tensorrt")


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(BackendError, match=r"pip install 'hrnet\[onnx\]'"):
        make_runner(create_model("hrnet-w18-small"), "onnxruntime")
