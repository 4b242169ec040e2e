"""Inference speed of hrnet's backends against what users can do today, as ratio tables.

Baselines: timm's ``hrnet_w18``/``hrnet_w48`` in eager PyTorch, and the same timm model exported by
``torch.onnx.export`` (default, dynamic batch) and run by a default ``onnxruntime.InferenceSession``.
Everything is fp32 on the CPU, random weights (speed does not depend on their values), 224x224.

Timing: every runner is built first, then all are called in alternating rounds and each runner's
per-batch latency is the median over its rounds, so load from other processes hits all of them
alike. Peak memory: each runner again in a fresh process at batch 16 (peak RSS while serving, see
``hrnet.deploy.bench``; ONNX files are exported beforehand in this process, as a deployment would). The int8 section (onnxruntime static quantization of hrnet's fused graph)
is a separate, not-exact figure.

    python benchmarks/bench_inference.py              # the full table, about 5-10 minutes
    python benchmarks/bench_inference.py --models hrnet-w18 --no-memory --rounds 3
    python benchmarks/bench_inference.py --against /tmp/hrnet-before --backends fused compile onnxruntime \
        --no-memory --no-int8     # also time another checkout's backends ("before-fused", ...) in the same rounds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hrnet.deploy import BACKENDS, OnnxRuntimeRunner, make_runner
from hrnet.deploy.bench import bench, peak_rss_mb, reset_peak_rss
from hrnet import create_model

TIMM_NAMES = {"hrnet-w18": "hrnet_w18", "hrnet-w48": "hrnet_w48"}
BASELINES = ("timm-eager", "timm-onnxruntime")
SIZE = (224, 224)
PAUSE = 0.1  # seconds between timed calls, see time_alternating


def timm_onnx(name: str, tmp: Path) -> Path:
    """What a user does today: timm's model through a default ``torch.onnx.export``."""
    import timm

    path = tmp / f"{name}-timm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(timm.create_model(TIMM_NAMES[name]).eval(), (torch.zeros(1, 3, *SIZE),), str(path),
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}}, verbose=False)
    return path


def int8_onnx(name: str, tmp: Path) -> Path:
    """hrnet's fused graph quantized to int8 by onnxruntime (static, QDQ, per-channel weights),
    calibrated on 8 random images. Not exact: the speed an int8 path would give."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    from hrnet.deploy import export_onnx

    fp32 = export_onnx(create_model(name).eval(), tmp / f"{name}-fp32.onnx", input_size=SIZE, check=False)
    int8 = tmp / f"{name}-int8.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            gen = np.random.default_rng(0)
            self.batches = iter({"images": gen.standard_normal((1, 3, *SIZE), dtype=np.float32)} for _ in range(8))

        def get_next(self):
            return next(self.batches, None)

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process
    quantize_static(str(fp32), str(int8), Reader(), per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8)
    return int8


def prepare(name: str, kind: str, tmp: Path) -> Path | None:
    """The ONNX file a runner serves (exported here, so a fresh serving process need not export)."""
    return {"timm-onnxruntime": timm_onnx, "int8-onnxruntime": int8_onnx}.get(kind, lambda *_: None)(name, tmp)


BEFORE = "before-"  # runner kinds of another checkout's hrnet (--against), loaded as package hrnet_before


def load_before(checkout: Path) -> None:
    """Import ``checkout``'s ``src/hrnet`` as ``hrnet_before`` (its imports are relative), so its
    backends can be timed in the same alternating rounds as this tree's."""
    init = checkout / "src" / "hrnet" / "__init__.py"
    spec = importlib.util.spec_from_file_location("hrnet_before", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hrnet_before"] = module
    spec.loader.exec_module(module)


def serve(name: str, kind: str, onnx: Path | None) -> Callable[[torch.Tensor], object]:
    """The runner of ``kind``: timm eager, a default onnxruntime session on timm's export, hrnet's
    onnxruntime runner on the int8 graph, an hrnet backend, or (``before-*``) another checkout's."""
    if kind.startswith(BEFORE):
        before = sys.modules["hrnet_before"]
        from hrnet_before.deploy import make_runner as make_before

        return make_before(before.create_model(name).eval(), kind[len(BEFORE):], input_size=SIZE)
    if kind == "timm-eager":
        import timm

        model = timm.create_model(TIMM_NAMES[name]).eval()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x)
        return run
    if kind == "timm-onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"images": x.numpy()})
    if kind == "int8-onnxruntime":
        return OnnxRuntimeRunner(onnx)
    return make_runner(create_model(name).eval(), kind, input_size=SIZE)


def build(name: str, kind: str, tmp: Path) -> tuple[Callable, float]:
    start = time.perf_counter()
    run = serve(name, kind, prepare(name, kind, tmp))
    run(torch.zeros(1, 3, *SIZE))
    return run, time.perf_counter() - start


def time_alternating(runners: dict[str, Callable], batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per batch of each runner over ``rounds`` rounds (one warm-up call each).

    The order rotates every round, and each call waits PAUSE first: thread pools (OpenMP,
    onnxruntime) keep spinning for a while after a call, which would slow whichever runs next.
    """
    x = torch.randn(batch, 3, *SIZE)
    for run in runners.values():
        run(x)
    kinds = list(runners)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            time.sleep(PAUSE)
            start = time.perf_counter()
            runners[kind](x)
            times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_worker(job: dict) -> None:
    """Peak RSS of a baseline or int8 runner while serving, in this (fresh) process."""
    run = serve(job["name"], job["kind"], job["onnx"] and Path(job["onnx"]))
    x = torch.randn(job["batch"], 3, *SIZE)
    run(x)
    reset_peak_rss()
    for _ in range(2):
        run(x)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_memory(name: str, kind: str, batch: int) -> float:
    if kind in BACKENDS:
        return bench(name, kind, batch_size=batch, iters=2, warmup=1).peak_rss_mb
    with tempfile.TemporaryDirectory() as tmp:
        onnx = prepare(name, kind, Path(tmp))
        job = json.dumps({"name": name, "kind": kind, "batch": batch, "onnx": onnx and str(onnx)})
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", job], capture_output=True, text=True,
                              check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def table(name: str, batch: int, seconds: dict[str, float], memory: dict[str, float], setup: dict[str, float]) -> str:
    eager, ort = seconds["timm-eager"], seconds["timm-onnxruntime"]
    lines = [f"\n{name}, batch {batch}, {torch.get_num_threads()} threads",
             "| runner | images/s | latency ms | x timm eager | x onnxruntime-on-timm | peak RSS MiB | setup s |",
             "|---|---|---|---|---|---|---|"]
    for kind, s in seconds.items():
        mem = f"{memory[kind]:.0f}" if kind in memory else "-"
        lines.append(f"| {kind} | {batch / s:.2f} | {1e3 * s:.0f} | {eager / s:.2f} | {ort / s:.2f} | {mem} | "
                     f"{setup[kind]:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(TIMM_NAMES), choices=list(TIMM_NAMES))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds at batch 16 (x3 at batch 1; W48: half)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 (not exact) figure")
    p.add_argument("--against", metavar="CHECKOUT", type=Path,
                   help="another checkout of hrnet whose --backends are timed too, as before-<backend>")
    p.add_argument("--memory-worker", metavar="JOB", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        memory_worker(json.loads(args.memory_worker))
        return
    if args.against:
        load_before(args.against)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} threads, "
          f"CPU: {cpu_name()}")
    kinds = [*BASELINES, *args.backends, *([] if args.no_int8 else ["int8-onnxruntime"]),
             *([BEFORE + b for b in args.backends] if args.against else [])]
    start = time.perf_counter()
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            built = {k: build(name, k, Path(tmp)) for k in kinds}
            runners = {k: r for k, (r, _) in built.items()}
            setup = {k: s for k, (_, s) in built.items()}
            rounds = max(2, args.rounds // 2) if name == "hrnet-w48" else args.rounds
            seconds = {b: time_alternating(runners, b, rounds * (3 if b == 1 else 1)) for b in (1, 16)}
            del runners, built
        memory = {} if args.no_memory else {k: peak_memory(name, k, 16) for k in kinds if not k.startswith(BEFORE)}
        for b in (1, 16):
            print(table(name, b, seconds[b], memory if b == 16 else {}, setup), flush=True)
    print(f"\npeak RSS at batch 16, each runner in a fresh process after setup; total {time.perf_counter() - start:.0f} s")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    return f"{os.cpu_count()} logical CPUs"


if __name__ == "__main__":
    main()
