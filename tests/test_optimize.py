"""hrnet optimize: the choice, what is built, the held-out split, the directory it writes running in every
command, hostile manifests refused, and the OpenVINO backend against the eager model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hrnet.deploy.optimize as opt
from hrnet import create_model, save_checkpoint
from hrnet.cli import main
from hrnet.data import eval_transform, load_image
from hrnet.data.digits import write_digits
from hrnet.deploy.manifest import MANIFEST, ManifestError, read_manifest
from hrnet.deploy.optimize import Measured, choose, runnable, split_held_out
from helpers import randomize

SIZE = 64
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
pytest.importorskip("onnxruntime")


def measured(label: str, agreement: float | None, b1: float, b16: float, error: str | None = None) -> Measured:
    backend, precision = label.split(":")
    return Measured(label, backend, precision, error=error, agreement=agreement,
                    speed={"1": {"images_per_s": b1}, "16": {"images_per_s": b16}})


def test_choice_is_the_fastest_meeting_the_threshold():
    """Hand-worked: at 99.5 % only A (100 %, 50/s) and C (99.6 %, 120/s) qualify, so C; at 99 % B
    (99.0 %, 200/s) joins and wins; by latency (batch 1) at 99 % A's 40/s beats B's 10/s and C's 30/s;
    D is fastest but failed to build; above 100 % nothing qualifies."""
    runs = [measured("onnxruntime:fp32", 100.0, 40, 50), measured("onnxruntime:int8", 99.0, 10, 200),
            measured("openvino:int8", 99.6, 30, 120), measured("compile:fp32", None, 99, 999, error="no compiler")]
    assert choose(runs, 99.5, "throughput", 16).label == "openvino:int8"
    assert [m.meets for m in runs] == [True, False, True, False]
    assert choose(runs, 99.0, "throughput", 16).label == "onnxruntime:int8"
    assert choose(runs, 99.0, "latency", 16).label == "onnxruntime:fp32"
    assert choose(runs, 100.5, "throughput", 16) is None


def test_tie_goes_to_the_first_listed():
    runs = [measured("onnxruntime:fp32", 100.0, 1, 70), measured("openvino:fp32", 100.0, 1, 70)]
    assert choose(runs, 99.5, "throughput", 16).label == "onnxruntime:fp32"


@pytest.mark.parametrize("native", [False, True])
def test_bf16_built_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(opt, "native_bf16_cpu", lambda: native)
    monkeypatch.setattr("hrnet.deploy.runners.native_bf16_cpu", lambda: native)
    todo, skipped = runnable()
    bf16 = {f"{b}:{p}" for b, p in todo if p == "bf16"}
    assert bf16 == ({"fused:bf16", "compile:bf16"} | ({"openvino:bf16"} if HAS_OPENVINO else set()) if native else set())
    if not native:
        assert "native bf16" in skipped["fused:bf16"] and "native bf16" in skipped["compile:bf16"]
    assert ("onnxruntime", "fp32") in todo and ("onnxruntime", "int8") in todo
    assert (("openvino", "int8") in todo) == HAS_OPENVINO


def test_unknown_candidate_refused():
    with pytest.raises(opt.OptimizeError, match="unknown candidate 'tensorrt:fp32'"):
        runnable(["tensorrt:fp32"])


def test_held_out_split_is_disjoint_seeded_and_a_fifth():
    files = [f"img{i:03d}.png" for i in range(47)]
    calib, held = split_held_out(files)
    assert not set(calib) & set(held) and sorted(calib + held) == files
    assert len(held) == round(47 * 0.2)  # 9
    assert split_held_out(files) == (calib, held)  # seeded
    assert split_held_out(files, seed=1)[1] != held
    assert len(split_held_out(files[:2])[1]) == 1
    with pytest.raises(opt.OptimizeError, match="at least 2"):
        split_held_out(files[:1])


# --- one real run on a tiny setup ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """hrnet-w18-small at 64 px with random (BN-randomised) weights, 40 digit scans as class folders,
    the held-out share split off --calib; the files calibration got and the held-out images recorded."""
    root = tmp_path_factory.mktemp("optimize")
    digits = write_digits(root / "digits", size=SIZE, val_fraction=0, per_class=4)[0]
    torch.manual_seed(0)
    model = randomize(create_model("hrnet-w18-small", num_classes=10)).eval()
    weights = save_checkpoint(model, root / "w.safetensors")
    seen: dict = {}
    real_quantize, real_agreement = opt.quantize_onnx, opt._agreement

    def quantize(model, files, *args, **kwargs):
        seen["calib"] = list(files)
        return real_quantize(model, files, *args, **kwargs)

    def agreement(reference, built, measured, dataset, *args):
        seen["held"] = list(dataset.samples)
        seen["transform"] = reference.transform
        return real_agreement(reference, built, measured, dataset, *args)

    candidates = ["onnxruntime:fp32", "onnxruntime:int8"] + (["openvino:fp32", "openvino:int8"] if HAS_OPENVINO else [])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(opt, "quantize_onnx", quantize)
        mp.setattr(opt, "_agreement", agreement)
        report = opt.optimize("hrnet-w18-small", root / "out", calib=digits, checkpoint=weights, batch_size=4,
                              min_agreement=0, candidates=candidates, input_size=SIZE, rounds=2, iters=1,
                              warmup=0)
    return {"root": root, "out": root / "out", "digits": digits, "model": model, "report": report, **seen}


@pytest.mark.slow
def test_calibration_never_sees_the_held_out_images(run):
    held = {f for f, _ in run["held"]}
    assert held and run["calib"] and not held & set(run["calib"])
    assert len(held) == round(40 * 0.2) and len(held) + len(run["calib"]) == 40
    assert run["report"]["held_out"] == {"images": 8, "source": "a seeded 20% of calib", "labelled": True}


@pytest.mark.slow
def test_report_agreement_and_accuracy_are_computed(run):
    """The reference accuracy recomputed by hand: the eager model on each held-out file, against its folder."""
    model, transform = run["model"], run["transform"]
    hits = 0
    for f, label in run["held"]:
        with torch.inference_mode():
            hits += int(model(transform(load_image(f))[None]).argmax(1)) == label
        assert Path(f).parent.name == str(label)
    report = run["report"]
    assert report["reference_accuracy"] == pytest.approx(100 * hits / 8)
    fp32 = next(c for c in report["candidates"] if c["label"] == "onnxruntime:fp32")
    assert fp32["agreement"] == 100.0 and fp32["accuracy"] == pytest.approx(100 * hits / 8)
    for c in report["candidates"]:
        assert c["error"] is None and set(c["speed"]) == {"1", "4"} and c["speed"]["4"]["images_per_s"] > 0
        assert c["agreement"] * 8 / 100 == pytest.approx(round(c["agreement"] * 8 / 100))  # a count of 8
    # the choice is the fastest at batch 4 (every candidate meets min_agreement 0)
    fastest = max(report["candidates"], key=lambda c: c["speed"]["4"]["images_per_s"])
    assert report["chosen"] == fastest["label"]


@pytest.mark.slow
def test_out_dir_holds_artefact_manifest_and_report(run):
    out, report = run["out"], run["report"]
    manifest, artefact, weights = read_manifest(out)
    assert f"{manifest.backend}:{manifest.precision}" == report["chosen"]
    assert artefact == (out / report["artefact"]).resolve() and weights.name == "weights.safetensors"
    assert manifest.classes == [str(i) for i in range(10)] and manifest.input_size == SIZE
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {MANIFEST, "report.json", "report.txt", "report.png", "weights.safetensors", report["artefact"]})
    assert json.loads((out / "report.json").read_text())["chosen"] == report["chosen"]
    assert f"chosen: {report['chosen']}" in (out / "report.txt").read_text()
    with Image.open(out / "report.png") as im:
        pixels = {tuple(p) for p in np.asarray(im.convert("RGB")).reshape(-1, 3).tolist()}
    assert im.size == (720, 480) and (255, 0, 0) in pixels  # the chosen candidate's dot is red
    assert ((0, 0, 128) in pixels) == (len(report["candidates"]) > 1)  # the others navy


def _direct_top1(run) -> dict[str, int]:
    """The chosen runner built by hand from the manifest (its backend on its file), on the held-out images."""
    manifest, artefact, _ = read_manifest(run["out"])
    if manifest.backend == "openvino":
        from hrnet.deploy.openvino import OpenVINORunner
        runner = OpenVINORunner(artefact, precision=manifest.precision)
    else:
        from hrnet.deploy.ort import OnnxRuntimeRunner
        runner = OnnxRuntimeRunner(artefact)
    transform = eval_transform(run["model"], SIZE)
    return {f: int(runner(transform(load_image(f))[None]).argmax(1)) for f, _ in run["held"]}


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_out_dir_runs_in_predict_eval_compare_and_bench(run, capsys):
    out, held = str(run["out"]), run["held"]
    direct = _direct_top1(run)
    files = [f for f, _ in held]
    code, stdout, _ = _cli(capsys, "predict", "hrnet-w18-small", "--checkpoint", out, *files, "--topk", "1", "--json")
    assert code == 0
    got = {r["file"]: r["topk"][0] for r in json.loads(stdout)}
    assert {f: t["index"] for f, t in got.items()} == direct
    assert all(t["label"] == str(t["index"]) for t in got.values())  # the manifest's class names
    val = run["root"] / "val"
    for digit in range(10):  # every class folder, so a folder's label is its digit
        (val / str(digit)).mkdir(parents=True, exist_ok=True)
    for f, label in held:
        os.symlink(f, val / str(label) / Path(f).name)
    code, stdout, _ = _cli(capsys, "eval", "hrnet-w18-small", "--checkpoint", out, "--data", str(val), "--json")
    assert code == 0
    assert json.loads(stdout)["top1"] == pytest.approx(100 * sum(direct[f] == lab for f, lab in held) / len(held))
    code, stdout, _ = _cli(capsys, "compare", "hrnet-w18-small", "--checkpoint", out, "--data", str(val),
                           "onnxruntime", out, "--json")
    assert code == 0
    r = json.loads(stdout)
    chosen = next(c for c in run["report"]["candidates"] if c["label"] == run["report"]["chosen"])
    assert r["n"] == 8 and r["top1_agreement"] == pytest.approx(chosen["agreement"])
    assert r["accuracy"]["b"]["top1"] == pytest.approx(chosen["accuracy"])
    code, stdout, _ = _cli(capsys, "bench", "hrnet-w18-small", "--checkpoint", out, "--iters", "1", "--warmup", "0",
                           "--json")
    assert code == 0
    [b] = json.loads(stdout)
    assert f"{b['backend']}:{b['precision']}" == run["report"]["chosen"] and b["images_per_s"] > 0


@pytest.mark.slow
def test_out_dir_refuses_another_backend_or_model(run, capsys):
    code, _, err = _cli(capsys, "predict", "hrnet-w18-small", "--checkpoint", str(run["out"]), run["held"][0][0],
                        "--backend", "fused")
    assert code == 1 and "does not apply" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli(capsys, "predict", "hrnet-w18", "--checkpoint", str(run["out"]), run["held"][0][0])
    assert code == 1 and "optimized for hrnet-w18-small" in err


@pytest.mark.slow
def test_out_dir_must_be_new_or_empty(run):
    with pytest.raises(opt.OptimizeError, match="not empty"):
        opt.optimize("hrnet-w18-small", run["out"], calib=run["digits"], checkpoint=run["root"] / "w.safetensors",
                     candidates=["onnxruntime:fp32"], input_size=SIZE)


@pytest.mark.parametrize("damage", ["escape", "symlink", "absolute", "huge", "unknown", "deep", "type", "missing"])
@pytest.mark.slow
def test_hostile_manifest_refused_in_one_line(run, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in run["out"].iterdir():
        os.symlink(p, bad / p.name) if p.name != MANIFEST else None
    data = json.loads((run["out"] / MANIFEST).read_text())
    (tmp_path / "outside.onnx").write_bytes((run["out"] / data["artefact"]).read_bytes()[:100])
    if damage == "escape":
        data["artefact"] = "../outside.onnx"
    elif damage == "symlink":
        os.symlink(tmp_path / "outside.onnx", bad / "link.onnx")
        data["artefact"] = "link.onnx"
    elif damage == "absolute":
        data["artefact"] = str(tmp_path / "outside.onnx")
    elif damage == "unknown":
        data["exec"] = "rm -rf /"
    elif damage == "type":
        data["input_size"] = "64"
    elif damage == "missing":
        del data["backend"]
    text = json.dumps(data)
    if damage == "huge":
        text = json.dumps({**data, "classes": ["x" * 200] * 6000})
    if damage == "deep":
        text = "[" * 100_000 + "]" * 100_000
    (bad / MANIFEST).write_text(text)
    with pytest.raises(ManifestError):
        read_manifest(bad)
    code, _, err = _cli(capsys, "predict", "hrnet-w18-small", "--checkpoint", str(bad), run["held"][0][0])
    assert code == 1 and err.startswith("hrnet: error: ") and len(err.strip().splitlines()) == 1
    expect = {"escape": "outside", "symlink": "outside", "absolute": "outside", "huge": "larger than",
              "unknown": "unknown key 'exec'", "deep": "not valid JSON", "type": "input_size has the wrong type",
              "missing": "missing key 'backend'"}[damage]
    assert expect in err


@pytest.mark.slow
def test_cli_optimize_json_and_summary(tmp_path):
    digits = write_digits(tmp_path / "d", size=SIZE, val_fraction=0.25, per_class=4)
    torch.manual_seed(1)
    weights = save_checkpoint(randomize(create_model("hrnet-w18-small", num_classes=10)), tmp_path / "w.safetensors")
    cmd = [sys.executable, "-m", "hrnet", "optimize", "hrnet-w18-small", "--checkpoint", str(weights), "--calib",
           str(digits[0]), "--val", str(digits[1]), "--input-size", str(SIZE), "--batch-size", "2", "--rounds", "1",
           "--iters", "1", "--candidates", "onnxruntime:fp32", "onnxruntime:int8", "--min-agreement", "0"]
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "a"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["held_out"]["source"] == "val" and report["held_out"]["images"] == 10
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "chosen: onnxruntime:" in proc.stdout and "hrnet predict hrnet-w18-small --checkpoint" in proc.stdout


# --- the OpenVINO backend ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    from hrnet.deploy.export import export_onnx
    from hrnet.deploy.quantize import quantize_onnx

    root = tmp_path_factory.mktemp("ov")
    digits = write_digits(root / "digits", size=SIZE, val_fraction=0, per_class=2)[0]
    torch.manual_seed(2)
    model = randomize(create_model("hrnet-w18-small", num_classes=10)).eval()
    return (model, export_onnx(model, root / "fp32.onnx", input_size=(SIZE, SIZE)),
            quantize_onnx(model, digits, root / "int8.onnx", input_size=SIZE, num_images=8))


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (pip install 'hrnet[openvino]')")
def test_openvino_fp32_logits_match_eager(onnx_files):
    """Within the ONNX export's own tolerance (RTOL of max |eager|), at batch 1 and 3: OpenVINO's CPU
    plugin would run bf16 on this kind of CPU unless told f32."""
    from hrnet.deploy.export import RTOL
    from hrnet.deploy.openvino import OpenVINORunner
    from hrnet.deploy.runners import make_runner

    model, fp32, _ = onnx_files
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x)
    for runner in (OpenVINORunner(fp32), make_runner(model, "openvino", input_size=(SIZE, SIZE))):
        for batch in (x[:1], x):
            got = runner(batch)
            assert got.dtype == torch.float32 and got.shape == (len(batch), 10)
            assert float((got - want[:len(batch)]).abs().max() / want.abs().max()) <= RTOL


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (pip install 'hrnet[openvino]')")
def test_openvino_int8_runs_the_quantized_file_and_carries_metadata(onnx_files):
    """OpenVINO on hrnet quantize's QDQ file computes what onnxruntime computes on it (both int8: close,
    not equal), the metadata is the file's, and the funnel reports the file's precision."""
    from hrnet.deploy.engine import Classifier
    from hrnet.deploy.ort import OnnxRuntimeRunner, onnx_metadata

    model, _, int8 = onnx_files
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    clf = Classifier.build(model, checkpoint=int8, backend="openvino")
    assert clf.precision == "int8" and clf.transform.input_size == SIZE
    assert clf.runner.metadata == onnx_metadata(int8) and clf.runner.metadata["hrnet.precision"] == "int8"
    ov, ort = clf.runner(x), OnnxRuntimeRunner(int8)(x)
    with torch.inference_mode():
        eager = model(x)
    scale = float(eager.abs().max())
    assert float((ov - ort).abs().max()) / scale < 0.05
    assert float((ov - eager).abs().max()) / scale < 0.1  # int8, not a copy of the fp32 graph's output...
    assert float((ov - eager).abs().max()) / scale > 1e-4  # ...which would be within RTOL
    one = clf.runner(x[:1])  # a single image runs on the batch-1 compilation
    assert clf.runner._single is not None and float((one - ov[:1]).abs().max()) / scale < 0.05
    with pytest.raises(Exception, match="does not match this int8 file"):
        Classifier.build(model, checkpoint=int8, backend="openvino", precision="fp32")


def test_openvino_missing_is_one_line(monkeypatch):
    from hrnet.deploy.runners import precision_problem

    monkeypatch.setattr("hrnet.deploy.runners.openvino_available", lambda: False)
    assert "pip install 'hrnet[openvino]'" in precision_problem("fp32", "openvino", "cpu")
    monkeypatch.setattr("hrnet.deploy.runners.openvino_available", lambda: True)
    assert "runs on the CPU" in precision_problem("fp32", "openvino", "cuda")
    assert precision_problem("fp32", "openvino", "cpu") is None
