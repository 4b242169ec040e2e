"""Throughput, latency and peak memory of the inference backends.

Each backend is measured in a fresh Python process so that one backend's memory (allocator caches,
onnxruntime arenas, compiled code) cannot count against another. Inside that process the peak
resident set size is reset after the runner is built and warmed up, so ``peak_rss_mb`` is what
serving needs (weights, activations, runtime) without the one-off export or compilation.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import HRNetError, UsageError


@dataclass(frozen=True)
class BenchResult:
    backend: str
    batch_size: int
    images_per_s: float
    latency_ms_p50: float
    latency_ms_p90: float
    peak_rss_mb: float | None  # None where the platform cannot reset the peak (non-Linux)
    setup_s: float  # building the runner: fusing, exporting, compiling, first run
    precision: str = "fp32"
    device: str = "cpu"
    peak_gpu_mb: float | None = None  # on a GPU: torch.cuda.max_memory_allocated after the warm-up reset
    compile_mode: str | None = None  # the compile backend's torch.compile mode, when one was named
    input_size: tuple[int, int] | None = None  # the image size timed (H, W)

    @property
    def label(self) -> str:
        """``backend`` or ``backend:precision``, as ``hrnet compare`` names a run."""
        return self.backend if self.precision == "fp32" else f"{self.backend}:{self.precision}"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_calls(fn: Callable[[], object], iters: int, warmup: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``iters`` calls of ``fn`` after ``warmup`` untimed ones. On a GPU each call
    is timed to the end of its kernels (``torch.cuda.synchronize``), not to their launch."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter of this process (Linux); False where unsupported.

    Memory freed by setup (export, compilation) is first handed back to the OS, so it does not count.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak resident set size since start or the last reset, in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def summarize(backend: str, batch_size: int, times: list[float], setup_s: float, rss: float | None,
              precision: str = "fp32", **extra) -> BenchResult:
    """``extra``: the device fields of :class:`BenchResult` (device, peak_gpu_mb, compile_mode)."""
    return BenchResult(backend=backend, batch_size=batch_size, images_per_s=batch_size * len(times) / sum(times),
                       latency_ms_p50=1e3 * statistics.median(times), latency_ms_p90=1e3 * percentile(times, 90),
                       peak_rss_mb=rss, setup_s=setup_s, precision=precision, **extra)


def check_options(*, batch_size: int, input_size: tuple[int, int] | None, threads: int | None, iters: int,
                  warmup: int) -> None:
    """UsageError naming the first option out of range: a measurement of zero batches or images
    has no rate, and a zero or negative side or thread count fails deep inside a backend."""
    def at_least(low: int, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    sides = tuple(input_size) if isinstance(input_size, (tuple, list)) else ()
    for name, ok, value in [("batch_size", at_least(1, batch_size), batch_size), ("iters", at_least(1, iters), iters),
                            ("warmup", at_least(0, warmup), warmup),
                            ("threads", threads is None or at_least(1, threads), threads),
                            ("input_size", input_size is None or len(sides) == 2 and all(at_least(1, v) for v in sides),
                             input_size)]:
        if not ok:
            raise UsageError(f"{name} out of range: {repr(value):.60} (sizes and counts are positive integers; "
                             "warmup may be 0)")


def bench_here(name: str, backend: str, *, checkpoint: str | None = None, batch_size: int = 1,
               input_size: tuple[int, int] | None = None, threads: int | None = None, iters: int = 20,
               warmup: int = 3, onnx: str | None = None, precision: str | None = None, device: str = "cpu",
               compile_mode: str | None = None) -> BenchResult:
    """Measure one backend at ``precision`` (default fp32) on ``device`` in this process (see
    :func:`bench` for the fresh-process version). On a GPU the batch is already on the device (the
    model's throughput, not the copy's) and ``peak_gpu_mb`` is the GPU memory after the warm-up.

    Without ``checkpoint`` the model keeps its random initialisation: the weights' values do not
    change the amount of work. ``input_size`` defaults to the model's evaluation size (the one a
    trained checkpoint carries, else the record's). ``onnx``: serve this exported or quantized file (onnxruntime backend)
    instead of exporting here, as a deployment would; ``precision`` then checks the file's, and its
    recorded input size replaces ``input_size`` (an ``hrnet optimize`` directory: what it chose). Out-of-range counts or sizes raise UsageError before
    anything is built.
    """
    from ..builder import create_model
    from .engine import Classifier

    check_options(batch_size=batch_size, input_size=input_size, threads=threads, iters=iters, warmup=warmup)

    start = time.perf_counter()
    if onnx is not None:
        clf = Classifier.build(name, checkpoint=onnx, threads=threads, precision=precision, backend=backend)
        input_size = (clf.transform.input_size,) * 2
    else:
        model = create_model(name, checkpoint=checkpoint).eval()
        input_size = tuple(input_size or (model.eval_cfg.input_size,) * 2)
        clf = Classifier.build(model, device=device, backend=backend, precision=precision, threads=threads,
                               graph_size=tuple(input_size), compile_mode=compile_mode)
        del model
    run, precision, device = clf.runner, clf.precision, clf.device
    del clf  # serve from the runner alone, as a deployment would
    x = torch.randn(batch_size, 3, *input_size, device=device)
    run(x)
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    setup_s = time.perf_counter() - start
    resettable = reset_peak_rss()
    times = time_calls(lambda: run(x), iters, warmup, device)
    return summarize(backend, batch_size, times, setup_s, peak_rss_mb() if resettable else None, precision,
                     device=device, compile_mode=compile_mode, input_size=tuple(input_size),
                     peak_gpu_mb=torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None)


def bench(name: str, backend: str, **kwargs) -> BenchResult:
    """:func:`bench_here` in a fresh Python process, so peak memory is this backend's alone.

    For onnxruntime (and openvino fp32) the model is exported here first, so the exporter's own memory (it imports a
    compiler stack) does not count against serving; ``setup_s`` then includes the export. A
    ``checkpoint`` ending in ``.onnx`` is served as it is (``hrnet quantize`` files: int8).
    ``device`` defaults to cpu here (a benchmark names where it runs); a GPU is checked first.
    """
    options = {k: p.default for k, p in inspect.signature(bench_here).parameters.items()}
    check_options(**{k: kwargs.get(k, options[k]) for k in ("batch_size", "input_size", "threads", "iters", "warmup")})
    from ..distributed import check_device
    from .manifest import is_optimize_dir, read_manifest
    from .ort import is_onnx_file, onnx_info, onnx_metadata
    from .runners import check_compile_mode, check_precision

    device = kwargs["device"] = check_device(kwargs.get("device") or "cpu")
    check_compile_mode(kwargs.get("compile_mode"), backend)
    checkpoint = kwargs.get("checkpoint")
    if is_optimize_dir(checkpoint):  # what hrnet optimize chose, built in the child by the funnel
        manifest = read_manifest(checkpoint)[0]
        if backend != manifest.backend:
            raise HRNetError(f"{checkpoint}: hrnet optimize chose the {manifest.backend} backend, not {backend}")
        kwargs = {**kwargs, "checkpoint": None, "onnx": str(checkpoint)}
    elif is_onnx_file(checkpoint):
        if backend not in ("onnxruntime", "openvino"):
            raise HRNetError(f"{checkpoint}: an ONNX file runs with the onnxruntime or openvino backend, not {backend}")
        kwargs = {**kwargs, "checkpoint": None, "onnx": str(checkpoint)}
    # refuse unavailable combinations here, in one line, not as the last line of a child's traceback
    if is_optimize_dir(kwargs.get("onnx")):
        pass  # checked above
    elif kwargs.get("onnx") is not None:
        from ..models import resolve

        check_precision("fp32", "onnxruntime", torch.device(device).type)  # a GPU: onnxruntime runs on the CPU
        onnx_info(kwargs["onnx"], onnx_metadata(kwargs["onnx"]), record=resolve(name), precision=kwargs.get("precision"))
    else:
        check_precision(kwargs.get("precision") or "fp32", backend, torch.device(device).type)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        exports = backend == "onnxruntime" or (backend == "openvino" and kwargs.get("precision") in (None, "fp32"))
        if exports and kwargs.get("onnx") is None:
            from ..builder import create_model
            from .export import export_onnx

            model = create_model(name, checkpoint=kwargs.get("checkpoint")).eval()
            size = kwargs.get("input_size") or (model.eval_cfg.input_size,) * 2
            kwargs["onnx"] = str(export_onnx(model, Path(tmp) / "model.onnx", check=False, input_size=size))
        export_s = time.perf_counter() - start
        job = json.dumps({"name": name, "backend": backend, **kwargs})
        proc = subprocess.run([sys.executable, "-m", "hrnet.deploy.bench", job], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
        raise HRNetError(f"benchmark of {name} with backend {backend} failed: {lines[-1]}")
    result = BenchResult(**json.loads(proc.stdout.strip().splitlines()[-1]))
    return replace(result, setup_s=result.setup_s + export_s, input_size=tuple(result.input_size))


def _main() -> int:
    job = json.loads(sys.argv[1])
    if job.get("input_size") is not None:
        job["input_size"] = tuple(job["input_size"])
    try:
        result = bench_here(job.pop("name"), job.pop("backend"), **job)
    except (HRNetError, OSError) as e:  # the parent reports the last stderr line: make it the message alone
        print(str(e).replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
