"""The precision switch: bf16 reaches oneDNN's bf16 kernels and agrees with fp32 where fp32 is
decisive, int8 files run wherever a checkpoint goes (checked against onnxruntime run by the test
itself), and combinations that cannot run are one-line errors.

The model is test_predict's random hrnet-w18-small (fixed BN statistics, classifier bias centred on
the photos) at 64 px; preprocessing for the reference runs is test_predict's independent mmcls one.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

import hrnet.deploy.runners as runners
from hrnet.cli import main
from hrnet.data import imagenet_wnids
from hrnet.deploy import PrecisionWarning, export_onnx, make_runner
from hrnet.deploy.quantize import quantize_onnx
from test_predict import CROP, FAST, MODEL, SHORT, mmcls_reference, model_and_photos

DECISIVE = 0.1  # fp32 log-probability margin of top-1 over top-2 beyond which bf16 must not flip top-1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("precision")
    model, ckpt, photos, logits = model_and_photos(d)
    int8 = quantize_onnx(model, d / "photos", d / "m.int8.onnx", input_size=CROP)
    return model, ckpt, photos, logits, int8


def _inputs(photos) -> torch.Tensor:
    return torch.stack([torch.from_numpy(mmcls_reference(Image.open(f), SHORT, CROP)).float() for f in photos])


def _ort_logits(path, x: torch.Tensor) -> torch.Tensor:
    """The file run by onnxruntime directly, no hrnet code in between."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _decisive(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.log_softmax(1).topk(2, 1).values
    return (top2[:, 0] - top2[:, 1]) >= DECISIVE


@pytest.mark.slow
def test_bf16_fused_runs_bf16_convolutions_and_returns_float32(setup):
    model, _, photos, logits, _ = setup
    seen = []
    hook = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append((i[0].dtype, o.dtype)) if isinstance(m, nn.Conv2d) else None)
    try:
        out = make_runner(model, "fused", precision="bf16", input_size=(CROP, CROP))(_inputs(photos))
    finally:
        hook.remove()
    assert len(seen) > 50 and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert out.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.slow
def test_bf16_eager_autocasts_the_model_as_built(setup):
    model, _, photos, _, _ = setup
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        out = make_runner(model, "eager", precision="bf16")(_inputs(photos))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(hooks) and set(seen) == {torch.bfloat16}
    assert out.dtype == torch.float32


@pytest.mark.slow
def test_bf16_compile_compiles_a_bf16_channels_last_model(setup, monkeypatch):
    model, _, photos, logits, _ = setup
    compiled = []
    real = torch.compile
    monkeypatch.setattr(runners.torch, "compile", lambda m, **kw: compiled.append(m) or real(m, **kw))
    out = make_runner(model, "compile", precision="bf16", input_size=(CROP, CROP))(_inputs(photos))
    convs = [m for m in compiled[0].modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 50
    assert all(c.weight.dtype == torch.bfloat16 and c.weight.is_contiguous(memory_format=torch.channels_last)
               for c in convs if c.kernel_size != (1, 1))
    assert all(c.weight.dtype == torch.bfloat16 for c in convs)
    assert out.dtype == torch.float32
    decisive = _decisive(logits)
    assert (out.argmax(1) == logits.argmax(1))[decisive].all()


@pytest.mark.slow
def test_bf16_predict_agrees_with_fp32_on_decisive_photos(setup, capsys):
    model, ckpt, photos, logits, _ = setup
    decisive = _decisive(logits)
    assert decisive.sum() >= 3, "too few decisive photos to judge"
    got = make_runner(model, "fused", precision="bf16")(_inputs(photos))
    # rounded to 8 mantissa bits, yet the same model (the centred classifier amplifies the rounding)
    assert 1e-3 < (got - logits).abs().max() / logits.abs().max() < 0.15
    assert (got.argmax(1) == logits.argmax(1))[decisive].all()
    assert main(["predict", MODEL, "--checkpoint", str(ckpt), str(photos[0].parent), "--json",
                 "--backend", "fused", "--precision", "bf16", *FAST]) == 0
    records = {r["file"]: r["topk"][0]["index"] for r in json.loads(capsys.readouterr().out)}
    for i, p in enumerate(photos):
        if decisive[i]:
            assert records[str(p)] == int(logits[i].argmax())


@pytest.mark.slow
def test_int8_file_as_checkpoint_predicts_what_onnxruntime_computes(setup, capsys):
    _, _, photos, _, int8 = setup
    want = _ort_logits(int8, _inputs(photos)).softmax(1)
    assert main(["predict", MODEL, "--checkpoint", str(int8), str(photos[0].parent), "--json",
                 "--precision", "int8", "--workers", "0", "-q"]) == 0  # no --input-size: the file's metadata
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(photos)
    for r in records:
        expected = want[photos.index(next(p for p in photos if str(p) == r["file"]))].topk(5)
        assert [t["index"] for t in r["topk"]] == expected.indices.tolist()
        np.testing.assert_allclose([t["score"] for t in r["topk"]], expected.values, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_int8_file_as_checkpoint_evaluates_to_the_expected_accuracy(setup, tmp_path, capsys):
    _, _, photos, _, int8 = setup
    top1 = _ort_logits(int8, _inputs(photos)).argmax(1).tolist()
    wnids = imagenet_wnids()
    for i, (p, c) in enumerate(zip(photos, top1)):  # even photos filed under their int8 top-1, odd ones not
        folder = tmp_path / "val" / wnids[c if i % 2 == 0 else (c + 1) % 1000]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, folder / f"{i}{p.suffix}")
    assert main(["eval", MODEL, "--checkpoint", str(int8), "--data", str(tmp_path / "val"), "--json",
                 "--workers", "0", "-q"]) == 0
    r = json.loads(capsys.readouterr().out)
    evens = (len(photos) + 1) // 2
    assert (r["n"], r["top1"]) == (len(photos), pytest.approx(100.0 * evens / len(photos)))


@pytest.mark.slow
def test_serve_builds_from_an_int8_file_with_threads(setup):
    from hrnet.serve.app import build_classifier

    _, _, photos, _, int8 = setup
    before = torch.get_num_threads()
    try:
        clf = build_classifier(MODEL, checkpoint=str(int8), threads=1)
        assert torch.get_num_threads() == 1 and clf.runner.threads == 1
    finally:
        torch.set_num_threads(before)
    x = _inputs(photos[:2])
    assert clf.model is None and clf.transform.input_size == CROP
    assert torch.equal(clf.logits(x).argmax(1), _ort_logits(int8, x).argmax(1))


@pytest.mark.slow
def test_serve_defaults_to_the_fused_backend_for_bf16(setup):
    from hrnet.serve.app import build_classifier

    model, _, photos, logits, _ = setup
    clf = build_classifier(model, precision="bf16", input_size=CROP, device="cpu")  # onnxruntime would refuse
    got = clf.logits(_inputs(photos))
    assert got.dtype == torch.float32 and (got.argmax(1) == logits.argmax(1))[_decisive(logits)].all()


@pytest.mark.slow
def test_bench_runs_an_int8_file(setup, capsys):
    _, _, _, _, int8 = setup
    assert main(["bench", MODEL, "--checkpoint", str(int8), "--precision", "int8", "--iters", "1",
                 "--threads", "1", "--json"]) == 0
    [r] = json.loads(capsys.readouterr().out)
    assert (r["backend"], r["precision"]) == ("onnxruntime", "int8")


@pytest.mark.slow
def test_bf16_without_native_support_warns(setup, monkeypatch):
    model = setup[0]
    monkeypatch.setattr(runners, "native_bf16_cpu", lambda: False)
    with pytest.warns(PrecisionWarning, match="no native bf16"):
        make_runner(model, "eager", precision="bf16")


@pytest.fixture(scope="module")
def fp32_onnx(setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("fp32onnx")
    plain = export_onnx(setup[0], d / "m.onnx", input_size=(CROP, CROP), check=False)
    bare = onnx.load(str(plain))
    del bare.metadata_props[:]
    onnx.save(bare, str(d / "bare.onnx"))
    return plain, d / "bare.onnx"


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "fp16 needs a GPU"),
    (["--backend", "onnxruntime", "--precision", "bf16"], "bf16 is not available with the onnxruntime backend"),
    (["--precision", "int8"], "int8 runs from a quantized ONNX file: run 'hrnet quantize"),
    (["--precision", "int8", "CHECKPOINT=fp32"], "--precision int8 does not match this fp32 file"),
    (["--precision", "fp32", "CHECKPOINT=int8"], "--precision fp32 does not match this int8 file"),
    (["--backend", "fused", "CHECKPOINT=int8"], "an ONNX file runs with the onnxruntime backend, not fused"),
    (["CHECKPOINT=bare"], "not an ONNX file written by hrnet export or hrnet quantize"),
    (["CHECKPOINT=int8", "--input-size", "96"], f"the file takes {CROP}x{CROP} images, not --input-size 96"),
])
@pytest.mark.slow
def test_unavailable_combinations_are_one_line_errors(setup, fp32_onnx, args, message, capsys):
    _, ckpt, photos, _, int8 = setup
    files = {"CHECKPOINT=fp32": fp32_onnx[0], "CHECKPOINT=bare": fp32_onnx[1], "CHECKPOINT=int8": int8}
    checkpoint = next((str(files[a]) for a in args if a in files), str(ckpt))
    args = [a for a in args if a not in files]
    for command in (["predict", MODEL, str(photos[0])], ["eval", MODEL, "--data", str(photos[0].parent)]):
        assert main([*command, "--checkpoint", checkpoint, "--workers", "0", "-q", *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("hrnet: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "fp16 needs a GPU"),
    (["--backend", "onnxruntime", "--precision", "bf16"], "bf16 is not available with the onnxruntime backend"),
    (["--precision", "int8"], "int8 runs from a quantized ONNX file"),
])
def test_bench_refuses_unavailable_combinations_in_one_line(args, message, capsys):
    assert main(["bench", MODEL, *args]) == 1  # refused before any backend is measured
    err = capsys.readouterr().err
    assert err.startswith("hrnet: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_serve_runs_an_int8_file_and_refuses_grad_cam_for_it(setup, tmp_path):
    from test_serve import start_server

    _, _, photos, _, int8 = setup
    server = start_server(tmp_path, int8, "--precision", "int8")
    try:
        status, got = server.json("POST", "/v1/classify?top_k=3", photos[0].read_bytes())
        want = _ort_logits(int8, _inputs(photos[:1])).softmax(1)[0].topk(3)
        assert status == 200 and [t["index"] for t in got] == want.indices.tolist()
        status, answer = server.json("POST", "/v1/cam", photos[0].read_bytes())
        assert status == 501 and "Grad-CAM needs the PyTorch model" in answer["error"]
    finally:
        assert server.stop() == 0
