"""hrnet quantize and hrnet compare: int8 QDQ graphs calibrated on real photos, byte-identical reruns,
and agreement figures checked against the test's own count of two independently run models.

The model is test_predict's random hrnet-w18-small (fixed BN statistics, classifier bias centred on
the photos, so each photo ranks the classes differently) at 64 px.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from hrnet.cli import main
from hrnet.deploy.compare import compare, parse_spec
from hrnet.data import eval_transform, imagenet_wnids, load_image
from hrnet.deploy import export_onnx
from hrnet.deploy.quantize import QuantizeError, quantize_onnx
from test_predict import CROP, MODEL, model_and_photos

MARGIN = 1e-4  # a top-1 or top-5 decision closer than this (in log-probability) could flip with float rounding


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    model, ckpt, photos, _ = model_and_photos(d)
    int8 = quantize_onnx(model, d / "photos", d / "m.int8.onnx", input_size=CROP)
    return model, ckpt, photos, int8


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.slow
def test_graph_has_qdq_nodes_and_int8_per_channel_weights_for_every_conv(setup):
    _, _, _, int8 = setup
    graph = onnx.load(str(int8)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 100
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) > 50
    for conv in convs:
        deq = producer[conv.input[1]]  # the weight arrives dequantized from an int8 initializer
        assert deq.op_type == "DequantizeLinear"
        weight, scale = inits[deq.input[0]], inits[deq.input[1]]
        assert weight.data_type == TensorProto.INT8
        assert len(scale.dims) == 1 and scale.dims[0] == weight.dims[0]  # one scale per output channel
        act = producer[conv.input[0]]  # the activation is quantized to uint8 before the conv
        assert act.op_type == "DequantizeLinear" and inits[act.input[2]].data_type == TensorProto.UINT8


@pytest.mark.slow
def test_metadata_is_the_export_metadata_plus_precision_and_calibration(setup, tmp_path):
    model, _, photos, int8 = setup
    fp32 = metadata(export_onnx(model, tmp_path / "fp32.onnx", input_size=(CROP, CROP), check=False))
    meta = metadata(int8)
    assert {k: meta.get(k) for k in fp32} == fp32
    assert meta["hrnet.precision"] == "int8"
    assert (meta["hrnet.calibration.method"], meta["hrnet.calibration.images"]) == ("minmax", str(len(photos)))
    assert meta["hrnet.calibration.skipped"] == "0"


@pytest.mark.slow
def test_same_images_give_a_byte_identical_file(setup, tmp_path):
    model, _, photos, int8 = setup
    again = quantize_onnx(model, [str(p) for p in reversed(photos)], tmp_path / "again.onnx", input_size=CROP)
    assert again.read_bytes() == int8.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.onnx"]  # no temporary file left behind


@pytest.mark.slow
def test_unreadable_calibration_files_are_skipped_and_counted(setup, tmp_path, capsys):
    _, ckpt, photos, _ = setup
    calib = tmp_path / "calib"
    calib.mkdir()
    for p in photos:
        shutil.copy(p, calib / p.name)
    (calib / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "q.onnx"
    assert main(["quantize", MODEL, "--checkpoint", str(ckpt), "--calib", str(calib), "--num-images", "5",
                 "--method", "percentile", "--input-size", str(CROP), "-o", str(out), "--device", "cpu",
                 "--json", "-q"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["calibration_images"], info["skipped"], info["method"]) == (5, 1, "percentile")
    meta = metadata(out)
    assert (meta["hrnet.calibration.images"], meta["hrnet.calibration.skipped"]) == ("5", "1")
    assert meta["hrnet.calibration.method"] == "percentile"


@pytest.mark.parametrize("case", ["missing", "empty", "all-broken", "method", "deps"])
@pytest.mark.slow
def test_bad_calibration_input_is_a_one_line_error(setup, tmp_path, capsys, monkeypatch, case):
    model, ckpt, _, _ = setup
    calib = tmp_path / "calib"
    if case != "missing":
        calib.mkdir()
    if case == "all-broken":
        (calib / "a.png").write_bytes(b"nope")
    args = ["quantize", MODEL, "--checkpoint", str(ckpt), "--calib", str(calib), "-o", str(tmp_path / "q.onnx"),
            "--input-size", str(CROP), "-q"]
    if case == "method":
        with pytest.raises(QuantizeError, match="unknown calibration method 'kl'"):
            quantize_onnx(model, calib, tmp_path / "q.onnx", method="kl")
        return
    if case == "deps":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert main(args) == 1
    err = capsys.readouterr().err
    want = {"missing": f"{calib}: calibration folder not found",
            "empty": f"{calib}: no image files in the calibration folder",
            "all-broken": "none of the 1 calibration files could be decoded",
            "deps": "needs onnxruntime: pip install 'hrnet[onnx]'"}[case]
    assert err.startswith("hrnet: error: ") and want in err and err.count("\n") == 1
    assert not (tmp_path / "q.onnx").exists()


def independent_runs(model, photos, int8) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of the eager model and of onnxruntime on the int8 file, one photo at a time."""
    transform = eval_transform(model, CROP)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    fp32, q = [], []
    for p in photos:
        x = transform(load_image(p))[None]
        with torch.inference_mode():
            fp32.append(model(x))
        q.append(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]))
    return torch.cat(fp32).softmax(1), torch.cat(q).softmax(1)


def assert_decisive(probs: torch.Tensor) -> None:
    top = probs.log().topk(6, dim=1).values
    assert ((top[:, 0] - top[:, 1]).min() > MARGIN and (top[:, 4] - top[:, 5]).min() > MARGIN), \
        "near-tied logits: the expected counts would not be robust"


@pytest.mark.slow
def test_compare_fp32_vs_int8_gives_the_independently_counted_agreement(setup, tmp_path):
    model, _, photos, int8 = setup
    fp32, q = independent_runs(model, photos, int8)
    assert_decisive(fp32)
    assert_decisive(q)
    top5_a, top5_b = fp32.topk(5, 1).indices, q.topk(5, 1).indices
    differ = [p.name for p, a, b in zip(photos, top5_a[:, 0], top5_b[:, 0]) if a != b]
    assert 0 < len(differ) < len(photos)  # neither count is trivial (the random net is fragile under int8)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top5_a, top5_b)) / (5 * len(photos))
    # label the photos: the fp32 top-1 for even photos, the int8 runner-up for odd ones
    labels = [int(top5_a[i, 0]) if i % 2 == 0 else int(top5_b[i, 1]) for i in range(len(photos))]
    root = tmp_path / "val"
    for p, label in zip(photos, labels):
        (root / imagenet_wnids()[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / imagenet_wnids()[label] / p.name)
    r = compare(model, root, "eager", str(int8), batch_size=3)
    assert r["n"] == len(photos) and r["input_size"] == CROP  # the crop comes from the file's metadata
    assert r["top1_agreement"] == pytest.approx(100 * (1 - len(differ) / len(photos)))
    assert r["top5_overlap"] == pytest.approx(100 * overlap)
    assert r["max_prob_diff"] == pytest.approx((fp32 - q).abs().max().item(), abs=1e-5)
    assert sorted(Path(d["file"]).name for d in r["disagreements"]) == sorted(differ)
    for key, probs in (("a", fp32), ("b", q)):
        top5 = probs.topk(5, 1).indices
        hits1 = sum(int(t[0]) == y for t, y in zip(top5, labels))
        hits5 = sum(y in t.tolist() for t, y in zip(top5, labels))
        assert r["accuracy"][key] == pytest.approx({"top1": 100 * hits1 / len(photos),
                                                    "top5": 100 * hits5 / len(photos)})


@pytest.mark.slow
def test_compare_of_identical_runs_agrees_fully(setup, capsys):
    _, ckpt, photos, _ = setup
    assert main(["compare", MODEL, "--checkpoint", str(ckpt), "--data", str(photos[0].parent), "eager", "eager",
                 "--input-size", str(CROP), "--json", "-q"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["n"], r["top1_agreement"], r["top5_overlap"], r["max_prob_diff"]) == (len(photos), 100.0, 100.0, 0.0)
    assert r["accuracy"] is None and r["disagreements"] == []
    # the BN-folded channels-last model differs only by float rounding
    r = compare(setup[0], photos[0].parent, "eager", "fused", input_size=CROP)
    assert r["top1_agreement"] == 100.0 and r["max_prob_diff"] < 1e-5


@pytest.mark.slow
def test_bf16_reaches_the_kernels(setup):
    model, _, photos, _ = setup
    r = compare(model, photos[0].parent, "fused", "fused:bf16", input_size=CROP)
    assert 1e-4 < r["max_prob_diff"] < 0.5  # rounded to 8 mantissa bits, yet the same model


@pytest.mark.slow
def test_compare_text_output_names_the_runs_and_the_differences(setup, capsys):
    _, ckpt, photos, int8 = setup
    assert main(["compare", MODEL, "--checkpoint", str(ckpt), "--data", str(photos[0].parent), "eager",
                 str(int8), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"A = eager   B = {int8}   {len(photos)} images at {CROP}x{CROP}\n")
    assert "top-1 agreement" in out and "top-5 overlap" in out and "accuracy" not in out


@pytest.mark.parametrize("spec, message", [
    ("tpu", "tpu: unknown backend 'tpu'"),
    ("eager:int8", "eager:int8: int8 runs from a quantized file"),
    ("eager:fp8", "unknown precision 'fp8'"),
    ("onnxruntime:bf16", "onnxruntime:bf16: bf16 is not available with the onnxruntime backend"),
    ("fused:fp16", "fused:fp16: fp16 needs a GPU"),
    ("missing.onnx", "missing.onnx: ONNX file not found"),
])
@pytest.mark.slow
def test_bad_run_specs_are_one_line_errors(setup, spec, message, capsys):
    _, ckpt, photos, _ = setup
    assert main(["compare", MODEL, "--checkpoint", str(ckpt), "--data", str(photos[0].parent), "eager", spec]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hrnet: error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_parse_spec_reads_backend_precision_and_files(setup):
    assert (parse_spec("fused:bf16").backend, parse_spec("fused:bf16").precision) == ("fused", "bf16")
    assert parse_spec("onnxruntime").precision == "fp32"
    assert parse_spec(str(setup[3])).path == setup[3]


@pytest.mark.slow
def test_compare_rejects_an_int8_file_of_another_size(setup):
    model, _, photos, int8 = setup
    with pytest.raises(Exception, match=f"takes {CROP}x{CROP} images, not --input-size 96"):
        compare(model, photos[0].parent, "eager", str(int8), input_size=96)


@pytest.mark.slow
def test_quantize_onto_its_own_checkpoint_through_a_symlink_is_refused(setup, tmp_path, capsys):
    """Issue 22: ``hrnet quantize -o`` onto its input destroyed it; here the input is a symlink to the output."""
    _, ckpt, photos, _ = setup
    real = tmp_path / "w.safetensors"
    shutil.copy(ckpt, real)
    (tmp_path / "link.safetensors").symlink_to(real)
    assert main(["quantize", MODEL, "--checkpoint", str(tmp_path / "link.safetensors"), "--calib",
                 str(photos[0].parent), "-o", str(real), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hrnet: error: {real}: is the same file as the input") and err.count("\n") == 1
    assert real.read_bytes() == Path(ckpt).read_bytes()


def _relabelled(int8: Path, out: Path, model: str) -> Path:
    proto = onnx.load(str(int8))
    for p in proto.metadata_props:
        if p.key == "hrnet.model":
            p.value = model
    onnx.save(proto, str(out))
    return out


@pytest.mark.slow
def test_compare_refuses_an_int8_file_of_another_model_as_predict_does(setup, tmp_path, capsys):
    """Issue 22: compare reported 0 % agreement for a file written for another model; predict refused it."""
    _, ckpt, photos, int8 = setup
    other = _relabelled(int8, tmp_path / "w32.int8.onnx", "hrnet-w32")
    message = f"{other}: the file holds hrnet-w32, not {MODEL}"
    for command in (["compare", MODEL, "--data", str(photos[0].parent), "eager", str(other)],
                    ["predict", MODEL, str(photos[0])]):
        assert main([*command, "--checkpoint", str(ckpt)] if command[0] == "compare" else
                    [*command, "--checkpoint", str(other)]) == 1
        err = capsys.readouterr().err
        assert err == f"hrnet: error: {message}\n", err


@pytest.mark.slow
def test_compare_of_two_onnx_files_builds_no_pytorch_model(setup, tmp_path, monkeypatch):
    """Issue 22: two .onnx runs need no PyTorch weights and download nothing."""
    import hrnet.builder

    model, _, photos, int8 = setup
    fp32 = export_onnx(model, tmp_path / "m.onnx", input_size=(CROP, CROP), check=False)

    def refuse(*args, **kwargs):
        raise AssertionError("compare of two .onnx runs built a PyTorch model")

    monkeypatch.setattr(hrnet.builder, "create_model", refuse)
    monkeypatch.setenv("HRNET_HOME", str(tmp_path / "empty-home"))
    r = compare(MODEL, photos[0].parent, str(fp32), str(int8))
    assert r["n"] == len(photos) and r["input_size"] == CROP
    assert not (tmp_path / "empty-home").exists()
