"""hrnet predict: the top-k ImageNet classes of image files, directories or globs."""

from __future__ import annotations

import argparse
import os
import sys

from ..data.decode import display_path
from ..deploy import BACKENDS
from ..errors import UsageError
from ._common import (add_compile_mode_arg, add_model_args, add_output_args, add_parser, add_precision_arg,
                      crop_fraction, crop_size, positive_int, print_json, show_progress, worker_count)


def add_inference_args(p: argparse.ArgumentParser, batch_size: int | None, runs: bool = True) -> None:
    """Options shared by predict, eval and compare: preprocessing overrides, batching (``batch_size``
    None: the device's, :func:`hrnet.deploy.engine.device_defaults`); with ``runs`` (not compare, whose
    runs name them) the bad-file policy, backend, precision and compile mode."""
    p.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                   help=f"default {batch_size}" if batch_size else "default 32 on CPU, 256 on a GPU")
    p.add_argument("--workers", type=worker_count, default=None, metavar="N",
                   help="decoding processes; 0 decodes in-process (default: 0 on CPU, where the model "
                        "already uses every core; up to 8 with a GPU)")
    p.add_argument("--input-size", type=crop_size, default=None, metavar="PX",
                   help="centre-crop size (default: the model record's, 224)")
    p.add_argument("--crop-pct", type=crop_fraction, default=None, metavar="F",
                   help="crop / resized short edge (default: the record's, 224/256); the short edge "
                        "becomes floor(input_size / crop_pct)")
    if not runs:
        return
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="eager: the model as built; fused: BN folded, channels-last; compile: torch.compile of "
                        "the fused model; onnxruntime: needs hrnet[onnx], CPU only (default eager on CPU, fused "
                        "on a GPU; onnxruntime for an .onnx --checkpoint)")
    add_precision_arg(p)
    add_compile_mode_arg(p)


def inference_options(args: argparse.Namespace) -> dict:
    """The model and batching options of predict and eval, as the library takes them: one list for
    every path (predict, predict --output, eval), so none drops one."""
    from ..deploy.engine import device_defaults
    from ..distributed import check_device

    device = check_device(args.device)  # one line before anything is built or downloaded
    options = dict(checkpoint=args.checkpoint, batch_size=args.batch_size or device_defaults(device).batch_size,
                   workers=args.workers, device=args.device, input_size=args.input_size, crop_pct=args.crop_pct,
                   strict=args.strict, progress=show_progress(args), backend=args.backend, precision=args.precision,
                   compile_mode=args.compile_mode)
    return {**options, "topk": args.topk} if hasattr(args, "topk") else options


def nothing_done(what: str, files: list[str]) -> int:
    """Say, in one line, ``what`` went wrong ("no input could be classified"), with how many of the
    ``files`` tried were empty or unreadable; the exit status 1."""
    empty = sum(1 for f in files if os.path.isfile(f) and os.path.getsize(f) == 0)
    print(f"hrnet: error: {what}: {len(files)} files found, {empty} empty, "
          f"{len(files) - empty} unreadable", file=sys.stderr)
    return 1


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "predict", "classify images: top-k ImageNet classes with probabilities",
                   "  hrnet predict hrnet-w18 examples/images\n"
                   "  hrnet predict hrnet-w48-ssld photo.jpg 'shots/**/*.png' --topk 3\n"
                   "  hrnet predict hrnet-w18 --checkpoint my.safetensors img.jpg --json\n"
                   "  hrnet predict hrnet-w18 photos/ --backend onnxruntime --batch-size 32\n"
                   "  hrnet predict hrnet-w18 photos/ --backend fused --precision bf16\n"
                   "  hrnet predict hrnet-w18 --checkpoint w18.int8.onnx photos/   # from 'hrnet quantize'\n"
                   "  hrnet predict hrnet-w18 /data/photos --output preds.jsonl            # one JSON line per file\n"
                   "  hrnet predict hrnet-w18 /data/photos --output preds.jsonl --resume   # after an interruption\n"
                   "  torchrun --nproc-per-node 8 -m hrnet predict hrnet-w18 /data/photos --output preds.jsonl")
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, directories (recursive) or globs")
    p.add_argument("--topk", type=positive_int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--output", metavar="FILE",
                   help="stream one JSON record per file to FILE as results arrive (needed under torchrun, "
                        "where each process writes a part and they are merged in input order at the end)")
    p.add_argument("--resume", action="store_true",
                   help="with --output: skip the files FILE (or an interrupted run's parts) already has a "
                        "record for and append the rest; without it an existing FILE is refused")
    add_inference_args(p, batch_size=16)
    add_output_args(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    if args.output is not None:
        return predict_to_output(args)
    if args.resume:
        raise UsageError("--resume continues an --output file; pass --output FILE")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("under torchrun, predict writes its records with --output FILE")
    from ..inference.predict import predict

    records = predict(args.name, args.inputs, **inference_options(args))
    if args.json:
        print_json(records)
    for r in records:
        if "error" in r:
            print(f"hrnet: skipped {display_path(r['error'])}", file=sys.stderr)
        elif not args.json:
            print(display_path(r["file"]))
            for rank, t in enumerate(r["topk"], 1):
                print(f"  {rank}. {100 * t['score']:6.2f}%  {t['label']} ({t['index']})")
    if not any("topk" in r for r in records):
        return nothing_done("no input could be classified", [r["file"] for r in records])
    return 0


def predict_to_output(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, init_distributed
    from ..inference.batch import predict_to_file

    info = init_distributed(args.device)
    try:
        summary = predict_to_file(args.name, args.inputs, args.output, resume=args.resume,
                                  **inference_options(args))
    finally:
        cleanup()
    if not info.is_main:
        return 0
    if args.json:
        print_json(summary)
    else:
        print(f"{display_path(summary['output'])}: {summary['done']} records written ({summary['errors']} "
              f"errors), {summary['skipped']} files already done, {summary['files']} in all")
    if summary["done"] and summary["errors"] == summary["done"]:
        print("hrnet: error: no input could be classified", file=sys.stderr)
        return 1
    return 0
