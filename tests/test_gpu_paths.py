"""The GPU path's choices, checked on any machine (tests/test_cuda.py runs it where a GPU is).

Without a GPU nothing can run on CUDA, but every decision on the way there can be checked: which
device string is accepted and which refused (in one line, by every command), which precision runs
with which backend on which device, what a GPU run picks by default (backend, batch, workers, pinned
memory), that GPU timings wait for the kernels, that the compile modes reach torch.compile, and that
``train.compile`` trains like the eager model. ``torch.cuda.is_available`` is patched where a test is
about what happens with or without a GPU, so these tests mean the same on a GPU machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hrnet import create_model
from hrnet.cli import main
from hrnet.data import Sample, inference_loader
from hrnet.data.loader import default_workers
from hrnet.deploy import bench as bench_module
from hrnet.deploy import runners
from hrnet.deploy.engine import Classifier, device_defaults
from hrnet.deploy.ort import BackendError
from hrnet.deploy.runners import COMPILE_MODES, make_runner, precision_problem, serving_backend
from hrnet.distributed import DeviceError, check_device
from hrnet.training.config import load_config
from hrnet.training.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
CAT = str(ROOT / "examples" / "images" / "cat.jpg")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def commands(tmp_path: Path) -> dict[str, list[str]]:
    """Every command that runs a model, with arguments that would otherwise get it going."""
    return {
        "predict": ["predict", "hrnet-w18", CAT],
        "predict --output": ["predict", "hrnet-w18", CAT, "--output", str(tmp_path / "p.jsonl")],
        "eval": ["eval", "hrnet-w18", "--data", str(tmp_path)],
        "bench": ["bench", "hrnet-w18", "--iters", "1"],
        "compare": ["compare", "hrnet-w18", "--data", str(tmp_path), "eager", "fused"],
        "cam": ["cam", "hrnet-w18", CAT, "-o", str(tmp_path / "cam.png")],
        "serve": ["serve", "hrnet-w18", "--port", "0"],
        "export": ["export", "hrnet-w18", "-o", str(tmp_path / "m.onnx")],
        "train": ["train", str(ROOT / "configs" / "digits.yaml")],
    }


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
@pytest.mark.parametrize("command", list(commands(Path("."))))
def test_every_command_refuses_a_missing_gpu_in_one_line_before_building_anything(
        tmp_path, capsys, home, no_gpu, command, device):
    code, err = run_cli(capsys, [*commands(tmp_path)[command], "--device", device])
    assert code == 1, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"hrnet: error: --device {device}: no CUDA GPU is available here"), err
    assert "use --device cpu" in err
    assert not (home).exists()  # nothing was downloaded on the way to the refusal
    assert not list(tmp_path.iterdir())  # and nothing was written


@pytest.mark.parametrize("command", list(commands(Path("."))))
def test_every_command_refuses_what_is_not_a_device_as_a_usage_error(tmp_path, capsys, command):
    code, err = run_cli(capsys, [*commands(tmp_path)[command], "--device", "tpu:0"])
    assert code == 2
    assert "argument --device: not a device: use cpu, cuda or cuda:N (got 'tpu:0')" in err
    assert "Traceback" not in err


def test_a_device_string_parses_on_a_machine_without_that_gpu():
    """Syntax is argparse's business (a docs command line with --device cuda parses anywhere); whether
    the GPU is there is the run's."""
    from hrnet.cli import build_parser

    args = build_parser().parse_args(["eval", "hrnet-w18", "--data", "val", "--device", "cuda:3"])
    assert args.device == "cuda:3"


def test_check_device_takes_the_gpus_this_machine_has_and_names_the_count_otherwise(two_gpus):
    assert check_device("cuda") == "cuda" and check_device("cuda:1") == "cuda:1"
    assert check_device(None) == "cuda"  # the default where a GPU is
    with pytest.raises(DeviceError, match=r"^--device cuda:2: this machine has 2 GPU\(s\), cuda:0 to cuda:1$"):
        check_device("cuda:2")
    with pytest.raises(DeviceError, match=r"^train.device=mps: not a device"):
        check_device("mps", "train.device")


def test_no_gpu_means_cpu_by_default(no_gpu):
    assert check_device(None) == "cpu" and check_device("cpu") == "cpu"


# ---- the precision and backend table ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "fused", "compile"])
def test_fp16_and_bf16_run_with_every_pytorch_backend_on_a_gpu_and_fp16_never_on_the_cpu(backend):
    for precision in ("fp32", "bf16", "fp16"):
        assert precision_problem(precision, backend, "cuda") is None
    assert "fp16 needs a GPU" in precision_problem("fp16", backend, "cpu")
    assert precision_problem("bf16", backend, "cpu") is None


def test_onnxruntime_is_refused_on_a_gpu_because_it_runs_on_the_cpu():
    problem = precision_problem("fp32", "onnxruntime", "cuda")
    assert "runs on the CPU" in problem and "eager, fused or compile" in problem
    assert precision_problem("fp32", "onnxruntime", "cpu") is None
    assert "int8" in precision_problem("int8", "fused", "cuda")  # int8 stays a quantized ONNX file


def test_gpu_defaults_are_the_fused_model_large_batches_and_decoding_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # a 16-core GPU machine
    gpu, cpu = device_defaults("cuda:0"), device_defaults("cpu")
    assert (gpu.backend, gpu.batch_size, gpu.workers) == ("fused", 256, 8)
    assert (cpu.backend, cpu.batch_size, cpu.workers) == ("eager", 32, 0)
    assert default_workers("cuda") == 8
    # serving: onnxruntime (CPU only) is never the default on a GPU
    assert serving_backend(None, "cuda") == serving_backend("fp16", "cuda:1") == "fused"
    assert serving_backend(None, "cpu") == serving_backend(None) == "onnxruntime"


def test_eval_batch_default_follows_the_device(no_gpu):
    from hrnet.cli import build_parser
    from hrnet.cli.predict import inference_options

    args = build_parser().parse_args(["eval", "hrnet-w18", "--data", "val"])
    assert args.batch_size is None and inference_options(args)["batch_size"] == 32
    args = build_parser().parse_args(["predict", "hrnet-w18", "x.jpg"])
    assert inference_options(args)["batch_size"] == 16  # predict keeps its own


def test_gpu_loaders_pin_their_batches_and_cpu_loaders_do_not():
    data = [Sample(torch.zeros(3, 4, 4), 0, i) for i in range(4)]
    assert inference_loader(data, 2, 0, device="cuda").pin_memory is True
    assert inference_loader(data, 2, 0, device="cuda:1").pin_memory is True
    assert inference_loader(data, 2, 0, device="cpu").pin_memory is False


def test_classifier_copies_batches_to_the_device_without_blocking(monkeypatch):
    """Pinned batches only overlap with the model when the copy is asynchronous."""
    seen = {}
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    clf = Classifier.build(create_model("hrnet-w18-small", num_classes=3), device="cpu")
    monkeypatch.setattr(torch.Tensor, "to", spy)
    clf.logits(torch.zeros(1, 3, 32, 32))
    assert seen.get("non_blocking") is True


def test_gpu_timings_wait_for_the_kernels(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    times = bench_module.time_calls(lambda: None, iters=3, warmup=2, device="cuda")
    assert len(times) == 3 and len(syncs) == 1 + 3  # after the warm-up, then after every timed call
    syncs.clear()
    bench_module.time_calls(lambda: None, iters=3, warmup=2, device="cpu")
    assert not syncs


def test_threads_are_a_cpu_setting_and_never_set_for_a_gpu_model(monkeypatch, two_gpus):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: self)  # no GPU to move to: stay put
    monkeypatch.setattr(runners, "make_runner", lambda model, backend, **kw: (backend, kw))
    monkeypatch.setattr("hrnet.deploy.engine.make_runner", runners.make_runner)
    clf = Classifier.build(create_model("hrnet-w18-small", num_classes=3), device="cuda", threads=4)
    assert calls == [] and clf.device == "cuda"
    assert clf.runner[0] == "fused"  # the GPU default backend
    Classifier.build(create_model("hrnet-w18-small", num_classes=3), device="cpu", threads=4)
    assert calls == [4]


# ---- torch.compile modes -----------------------------------------------------------------------


def test_compile_modes_reach_torch_compile(monkeypatch):
    asked = []

    def fake_compile(module, **kwargs):
        asked.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = create_model("hrnet-w18-small", num_classes=3).eval()
    for mode in COMPILE_MODES:
        make_runner(model, "compile", compile_mode=mode, input_size=(32, 32))
    make_runner(model, "compile", input_size=(32, 32))
    assert [a["mode"] for a in asked] == [None, "reduce-overhead", "max-autotune", None]
    assert all(a["options"] == {"freezing": True} and a["dynamic"] is False for a in asked)


def test_a_compile_mode_without_the_compile_backend_is_refused(capsys):
    model = create_model("hrnet-w18-small", num_classes=3).eval()
    with pytest.raises(BackendError, match="--compile-mode reduce-overhead applies to --backend compile, not fused"):
        make_runner(model, "fused", compile_mode="reduce-overhead")
    with pytest.raises(BackendError, match="unknown compile mode 'fast'"):
        make_runner(model, "compile", compile_mode="fast")
    code, err = run_cli(capsys, ["predict", "hrnet-w18", CAT, "--device", "cpu", "--compile-mode", "max-autotune"])
    assert code == 1 and "applies to --backend compile, not eager" in err and "Traceback" not in err


def test_cuda_graph_outputs_are_copied_so_kept_logits_do_not_change():
    buffer = torch.zeros(2)

    def replay(x):  # what a CUDA-graph replay does: the same output memory every call
        buffer.copy_(x)
        return buffer

    run = runners._owned(replay)
    first = run(torch.ones(2))
    run(torch.full((2,), 5.0))
    assert torch.equal(first, torch.ones(2))


# ---- bench on a device -------------------------------------------------------------------------


def test_bench_refuses_onnxruntime_on_a_gpu_in_one_line(two_gpus):
    with pytest.raises(BackendError, match="runs on the CPU"):
        bench_module.bench("hrnet-w18-small", "onnxruntime", device="cuda")


@pytest.mark.slow
def test_bench_prints_the_device_defaults(capsys, no_gpu):
    code = main(["bench", "hrnet-w18-small", "--backend", "fused", "--input-size", "32", "32", "--iters", "1",
                 "--warmup", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("defaults on cpu: --backend eager, eval --batch-size 32, --workers 0")
    assert "hrnet-w18-small on cpu, batch 1, input 32x32" in out


# ---- train.compile -----------------------------------------------------------------------------


class Noise:
    classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> Sample:
        return Sample(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 10, i)


@pytest.mark.slow
def test_train_compile_trains_like_the_eager_model_and_saves_the_plain_weights(tmp_path):
    """Two steps of hrnet-w18-small with and without torch.compile. The first step's loss is the
    forward pass on the same initial weights: equal to float rounding. The second follows a compiled
    backward and update; in float32 a random HRNet on tiny inputs amplifies rounding (tests/test_train.py),
    so it is held to 1 %. Slow: inductor compiles forward and backward on the CPU (about 3 minutes on 2 cores)."""
    import json

    losses, keys = {}, {}
    for compiled in (False, True):
        run = tmp_path / str(compiled)
        cfg = load_config(None, ["model.name=hrnet-w18-small", "model.pretrained=false", "data.input_size=32",
                                 "data.batch_size=8", "data.workers=0", "schedule.epochs=1", "output.log_every=1",
                                 f"output.dir={run}", f"train.compile={str(compiled).lower()}"])
        trainer = Trainer(cfg, quiet=True, train_set=Noise())
        assert isinstance(trainer.train_model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        trainer.fit()
        keys[compiled] = set(trainer.model.state_dict())
        losses[compiled] = [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                            if r["kind"] == "step"]
    assert keys[True] == keys[False]  # no "_orig_mod." prefix: checkpoints hold the plain model
    assert len(losses[True]) == len(losses[False]) == 2
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=1e-2)


# ---- the device script and the GPU benchmark, here without a GPU -------------------------------


@pytest.mark.slow
def test_gpu_check_script_says_there_is_no_gpu_and_its_tests_skip(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "SKIPPED" in log and "no CUDA GPU" in log and "failed" not in log.split("short test summary")[-1]
    assert "gpu_check: no CUDA GPU is visible" in proc.stderr


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_in_its_quick_form(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["inference"] and figures["training"] and figures["eval"]
    assert all(r["images_per_s"] > 0 for r in figures["inference"])
