"""hrnet bench: images/s, latency and peak memory per inference backend."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from tqdm import tqdm

from ..extras import require
from ._common import (add_compile_mode_arg, add_input_size_arg, add_output_args, add_parser, add_precision_arg,
                      device_name, format_table, nonnegative_int, positive_int, print_json, show_progress)


def register(sub: argparse._SubParsersAction) -> None:
    from ..deploy import BACKENDS

    p = add_parser(sub, "bench", "measure images/s, latency p50/p90 and peak memory of each inference backend",
                   "  hrnet bench hrnet-w18\n"
                   "  hrnet bench hrnet-w18 --backend fused onnxruntime --batch-size 16 --threads 2\n"
                   "  hrnet bench hrnet-w48 --checkpoint w48.pth --input-size 288 288 --json\n"
                   "  hrnet bench hrnet-w18 --precision bf16 --backend fused compile --batch-size 16\n"
                   "  hrnet bench hrnet-w18 --device cuda --precision bf16 --batch-size 256   # prints the GPU defaults\n"
                   "  hrnet bench hrnet-w18 --device cuda --backend compile --compile-mode reduce-overhead\n"
                   "  hrnet bench hrnet-w18 --checkpoint w18.int8.onnx   # an 'hrnet quantize' file, with onnxruntime")
    p.add_argument("name", metavar="NAME", help="model name or alias (see 'hrnet list')")
    p.add_argument("--checkpoint", metavar="PATH_OR_URL",
                   help="weights to load (default: random weights; they do not change the speed), or an .onnx "
                        "file from 'hrnet export'/'hrnet quantize' to run with onnxruntime, or an 'hrnet optimize' "
                        "OUT_DIR to run what it chose")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                   help="backends to measure (default: all that run the precision on the device; onnxruntime for "
                        "an .onnx file)")
    add_precision_arg(p)
    p.add_argument("--device", type=device_name, default="cpu", metavar="cpu|cuda|cuda:N",
                   help="where to measure (default cpu: a benchmark names its device)")
    add_compile_mode_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="default 1")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads per backend (default: the backend's own choice)")
    add_input_size_arg(p, "input size (default: the checkpoint's evaluation size, else the model's, e.g. 224 224)")
    p.add_argument("--iters", type=positive_int, default=20, metavar="N", help="timed batches per backend (default 20)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, metavar="N",
                   help="untimed batches before them (default 3)")
    add_output_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..deploy.bench import bench
    from ..deploy.engine import device_defaults
    from ..deploy.manifest import is_optimize_dir, read_manifest
    from ..deploy.ort import is_onnx_file
    from ..deploy.runners import BACKENDS, precision_problem
    from ..distributed import check_device

    device = check_device(args.device)
    kind = torch.device(device).type
    backends = args.backend
    if backends is None:  # every backend that runs the precision here; an unrunnable one says why
        runs = [b for b in BACKENDS if precision_problem(args.precision or "fp32", b, kind) is None]
        if args.compile_mode is not None:
            runs = ["compile"]
        backends = ["onnxruntime"] if is_onnx_file(args.checkpoint) else runs or list(BACKENDS)
        if is_optimize_dir(args.checkpoint):
            backends = [read_manifest(args.checkpoint)[0].backend]
    defaults = device_defaults(device)
    if not args.json and not args.quiet:
        print(f"defaults on {device}: --backend {defaults.backend}, eval --batch-size {defaults.batch_size}, "
              f"--workers {defaults.workers}, --precision fp32 (bf16 recommended on a GPU; see docs/guides/gpu.md)")
    if "onnxruntime" in backends:  # before minutes of measuring the other backends
        require("onnx", "hrnet bench --backend onnxruntime")
    results = []
    for backend in tqdm(backends, desc="backends", disable=not show_progress(args)):
        results.append(bench(args.name, backend, checkpoint=args.checkpoint, batch_size=args.batch_size,
                             input_size=args.input_size and tuple(args.input_size), threads=args.threads,
                             iters=args.iters,
                             warmup=args.warmup, precision=args.precision, device=device,
                             compile_mode=args.compile_mode))
    if args.json:
        print_json([asdict(r) for r in results])
        return 0
    base = results[0].images_per_s
    gpu = kind == "cuda"
    rows = [[r.label, f"{r.images_per_s:.2f}", f"{r.images_per_s / base:.2f}x", f"{r.latency_ms_p50:.1f}",
             f"{r.latency_ms_p90:.1f}", "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}", f"{r.setup_s:.1f}"]
            + ([f"{r.peak_gpu_mb:.0f}"] if gpu else []) for r in results]
    h, w = results[0].input_size
    print(f"{args.name} on {device}, batch {args.batch_size}, input {h}x{w}")
    print(format_table(rows, ["backend", "images/s", f"vs {results[0].label}", "p50 ms", "p90 ms",
                              "peak RSS MiB", "setup s"] + (["peak GPU MiB"] if gpu else [])))
    return 0
