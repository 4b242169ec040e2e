"""One funnel for inference: every command that takes --precision runs what was asked, at every precision.

What ran is observed from outside the code under test: a global forward hook records the dtype of every
convolution's output (bf16 must be bf16 throughout, fp32 float32), and a wrapper around onnxruntime's
runner records which file it ran, whose precision the test reads back with ``onnx`` itself. fp16 needs a
GPU and is refused in one line on this CPU. ``predict --output --precision bf16`` ran fp32 before the
funnel (``predict_to_file`` took no precision).
"""

from __future__ import annotations

import shutil
import warnings

import onnx
import pytest
import torch
from torch import nn

import hrnet.deploy.ort as ort
from hrnet.cli import main
from hrnet.deploy import PrecisionWarning
from hrnet.deploy.bench import bench_here
from hrnet.deploy.quantize import quantize_onnx
from hrnet.inference.batch import predict_to_file
from hrnet.data import imagenet_wnids
from hrnet.inference.evaluate import evaluate
from hrnet.inference.predict import predict
from test_predict import CROP, FAST, MODEL, model_and_photos

PRECISIONS = ["fp32", "bf16", "fp16", "int8"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The random model's checkpoint, its int8 file, one photo and a two-class labelled folder."""
    d = tmp_path_factory.mktemp("funnel")
    model, ckpt, photos, _ = model_and_photos(d)
    int8 = quantize_onnx(model, d / "photos", d / "m.int8.onnx", input_size=CROP, num_images=4)
    for i, photo in enumerate(photos[:4]):  # two ImageNet classes, by wnid: the model's 1000 classes have names
        (d / "val" / imagenet_wnids()[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, d / "val" / imagenet_wnids()[i % 2] / photo.name)
    return {"ckpt": ckpt, "int8": int8, "photo": photos[0], "data": d / "val"}


@pytest.fixture
def seen(monkeypatch):
    """What ran: the dtypes of convolution outputs, and the precision of each ONNX file run."""
    record = {"conv": set(), "onnx": set()}
    hook = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: record["conv"].add(o.dtype) if isinstance(m, nn.Conv2d) else None)
    call = ort.OnnxRuntimeRunner.__call__

    def spy(self, x):
        meta = {p.key: p.value for p in onnx.load(str(self.path), load_external_data=False).metadata_props}
        record["onnx"].add(meta.get("hrnet.precision", "fp32"))
        return call(self, x)

    monkeypatch.setattr(ort.OnnxRuntimeRunner, "__call__", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)  # bf16 on a CPU without native bf16: slow, still bf16
        yield record
    hook.remove()


def _ran(record: dict, precision: str) -> None:
    """Assert that what ran is ``precision`` and nothing else."""
    if precision == "int8":
        assert record == {"conv": set(), "onnx": {"int8"}}, record
    else:
        want = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        assert record == {"conv": {want}, "onnx": set()}, record


def _model_args(s: dict, precision: str) -> list[str]:
    """--checkpoint (the int8 file for int8), --backend fused for the PyTorch precisions, --precision."""
    if precision == "int8":
        return ["--checkpoint", str(s["int8"]), "--precision", "int8"]
    return ["--checkpoint", str(s["ckpt"]), "--backend", "fused", "--precision", precision]


COMMANDS = {
    "predict": lambda s, p, tmp: ["predict", MODEL, str(s["photo"]), *_model_args(s, p), *FAST],
    "predict --output": lambda s, p, tmp: ["predict", MODEL, str(s["photo"]), "--output", str(tmp / "o.jsonl"),
                                           *_model_args(s, p), *FAST],
    "eval": lambda s, p, tmp: ["eval", MODEL, "--data", str(s["data"]), *_model_args(s, p), *FAST],
    "compare": lambda s, p, tmp: ["compare", MODEL, "--checkpoint", str(s["ckpt"]), "--data", str(s["data"]),
                                  *[str(s["int8"]) if p == "int8" else f"fused:{p}"] * 2, *FAST],
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.slow
def test_every_command_runs_the_precision_asked_for(setup, seen, tmp_path, capsys, command, precision):
    code = main(COMMANDS[command](setup, precision, tmp_path))
    err = capsys.readouterr().err
    if precision == "fp16":  # the GPU path: refused on this CPU, in one line, before anything runs
        assert code == 1 and err.startswith("hrnet: error: ") and "fp16 needs a GPU" in err
        assert err.count("\n") == 1 and seen == {"conv": set(), "onnx": set()}
        return
    assert code == 0, err
    _ran(seen, precision)


def _api_calls(s: dict, tmp):
    def options(precision):
        if precision == "int8":
            return {"checkpoint": s["int8"], "precision": "int8"}
        return {"checkpoint": s["ckpt"], "backend": "fused", "precision": precision, "input_size": CROP,
                "device": "cpu"}

    def serve(p):
        pytest.importorskip("starlette")
        from hrnet.serve.app import create_app

        app = create_app(MODEL, **options(p))
        clf = app.state.server.clf
        clf.logits(torch.zeros(2, 3, clf.transform.input_size, clf.transform.input_size))

    return {
        "predict": lambda p: predict(MODEL, [s["photo"]], workers=0, **options(p)),
        "predict_to_file": lambda p: predict_to_file(MODEL, [s["photo"]], tmp / f"{p}.jsonl", workers=0,
                                                     **options(p)),
        "evaluate": lambda p: evaluate(MODEL, s["data"], workers=0, **options(p)),
        "bench": lambda p: bench_here(MODEL, "onnxruntime" if p == "int8" else "fused", iters=1, warmup=0,
                                      input_size=(CROP, CROP), precision=p,
                                      **({"onnx": str(s["int8"])} if p == "int8" else {"checkpoint": str(s["ckpt"])})),
        "serve": serve,
    }


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("call", ["predict", "predict_to_file", "evaluate", "bench", "serve"])
@pytest.mark.slow
def test_every_library_entry_point_runs_the_precision_asked_for(setup, seen, tmp_path, call, precision):
    _api_calls(setup, tmp_path)[call](precision)
    _ran(seen, precision)


@pytest.mark.slow
def test_predict_to_file_in_bf16_writes_what_predict_in_bf16_returns(setup, tmp_path):
    """The records of the streamed path and of the in-memory one, at one precision, are the same."""
    import json

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        options = dict(checkpoint=setup["ckpt"], backend="fused", precision="bf16", input_size=CROP, workers=0)
        want = predict(MODEL, [setup["photo"]], **options)
        predict_to_file(MODEL, [setup["photo"]], tmp_path / "o.jsonl", **options)
    got = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["topk"][0]["index"] for r in got] == [r["topk"][0]["index"] for r in want]
    assert got[0]["topk"][0]["score"] == pytest.approx(want[0]["topk"][0]["score"], abs=1e-6)
