"""The ``hrnet export`` and ``hrnet bench`` commands."""

from __future__ import annotations

import json
import os

import onnxruntime as ort
import pytest
import torch

from hrnet.cli import main
from hrnet import create_model
from hrnet.weights import save_checkpoint

from helpers import randomize, rel_err
from test_deploy import RTOL


@pytest.mark.slow
def test_export_command_writes_a_checked_onnx_file_from_a_checkpoint(tmp_path, capsys):
    model = randomize(create_model("hrnet-w18-small"))
    ckpt = save_checkpoint(model, tmp_path / "w.safetensors")
    out = tmp_path / "m.onnx"
    assert main(["export", "hrnet-w18-small", "--checkpoint", str(ckpt), "-o", str(out), "--input-size", "64", "64",
                 "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {"path": str(out), "format": "onnx", "batch": "dynamic", "bytes": out.stat().st_size,
                    "checked": True}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
    assert rel_err(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), want) < RTOL


def test_export_command_rejects_an_unknown_extension_and_opset_for_pt2(tmp_path, capsys):
    assert main(["export", "hrnet-w18-small", "-o", str(tmp_path / "m.bin")]) == 1
    assert "m.bin: cannot tell the format" in capsys.readouterr().err
    assert main(["export", "hrnet-w18-small", "-o", str(tmp_path / "m.pt2"), "--opset", "18"]) == 1
    assert "--opset applies to ONNX only" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_command_reports_every_key_per_backend(capsys):
    assert main(["bench", "hrnet-w18-small", "--backend", "eager", "fused", "--input-size", "64", "64",
                 "--batch-size", "2", "--iters", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in rows] == ["eager", "fused"]
    for r in rows:
        assert r["batch_size"] == 2
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"]
        # 2 images per batch: throughput and latency describe the same timings
        assert r["images_per_s"] < 2 / (r["latency_ms_p50"] / 1e3) * 3
        assert 50 < r["peak_rss_mb"] < 8000


@pytest.mark.slow
def test_bench_times_at_the_size_a_checkpoint_or_onnx_file_carries(tmp_path, capsys):
    """A checkpoint trained at 48 px was timed at 224 unless --input-size was given, and an ONNX file's
    own size was timed but the header said 224x224."""
    from dataclasses import replace

    model = create_model("hrnet-w18-small")
    model.eval_cfg = replace(model.eval_cfg, input_size=48, resize_size=55)
    ckpt = save_checkpoint(model, tmp_path / "w.safetensors")
    fast = ["--batch-size", "1", "--iters", "1", "--warmup", "0"]
    assert main(["bench", "hrnet-w18-small", "--checkpoint", str(ckpt), "--backend", "eager", *fast, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["input_size"] == [48, 48]
    assert main(["bench", "hrnet-w18-small", "--checkpoint", str(ckpt), "--backend", "eager", *fast,
                 "--input-size", "40", "56", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["input_size"] == [40, 56]  # an explicit size wins
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "hrnet-w18-small", "--checkpoint", str(ckpt), "-o", str(onnx_file), "-q"]) == 0
    assert main(["bench", "hrnet-w18-small", "--checkpoint", str(onnx_file), *fast, "-q"]) == 0
    assert "batch 1, input 48x48" in capsys.readouterr().out


def test_export_onto_its_own_checkpoint_is_refused_and_the_checkpoint_kept(tmp_path, capsys, monkeypatch):
    """Issue 22: ``-o`` naming the checkpoint (here as ``./w.safetensors`` against ``w.safetensors``)
    replaced the user's weights with an ONNX file."""
    ckpt = save_checkpoint(randomize(create_model("hrnet-w18-small")), tmp_path / "w.safetensors")
    before = ckpt.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["export", "hrnet-w18-small", "--checkpoint", "w.safetensors", "-o", "./w.safetensors",
                 "--format", "onnx", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hrnet: error: w.safetensors: is the same file as the input w.safetensors")
    assert err.count("\n") == 1 and ckpt.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["w.safetensors"]
