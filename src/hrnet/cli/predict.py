"""hrnet predict: the top-k ImageNet classes of image files, directories or globs."""

from __future__ import annotations

import argparse
import sys

from ..data.decode import display_path
from ..deploy import BACKENDS, PRECISIONS
from ._common import add_model_args, add_output_args, add_parser, print_json


def _integer(text: str, low: int, high: int | None = None) -> int:
    digits = text.strip()  # ASCII digits only: int() takes '+5' and '٥', and str.isdigit() takes '²'
    if not (digits.isascii() and digits.isdigit() and len(digits) < 10 and low <= int(digits) <= (high or 10**9)):
        bound = f"from {low} to {high}" if high else f">= {low}"
        raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
    return int(digits)


def positive_int(text: str) -> int:
    """argparse type: a batch size or a top-k, 1 or more."""
    return _integer(text, 1)


def worker_count(text: str) -> int:
    """argparse type: decoding processes, 0 (decode in-process) to 256."""
    return _integer(text, 0, 256)


def crop_size(text: str) -> int:
    """argparse type: a crop side in pixels, 1 to 4096 (larger would only exhaust memory)."""
    return _integer(text, 1, 4096)


def crop_fraction(text: str) -> float:
    """argparse type: a float in (0, 1], the fraction of the resized short edge that is cropped."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_inference_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """Options shared by predict and eval: preprocessing overrides, batching, bad-file policy."""
    p.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N", help=f"default {batch_size}")
    p.add_argument("--workers", type=worker_count, default=None, metavar="N",
                   help="decoding processes; 0 decodes in-process (default: 0 on CPU, where the model "
                        "already uses every core; up to 8 with a GPU)")
    p.add_argument("--input-size", type=crop_size, default=None, metavar="PX",
                   help="centre-crop size (default: the model record's, 224)")
    p.add_argument("--crop-pct", type=crop_fraction, default=None, metavar="F",
                   help="crop / resized short edge (default: the record's, 224/256); the short edge "
                        "becomes floor(input_size / crop_pct)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="eager: the model as built; fused: BN folded, channels-last; compile: torch.compile of "
                        "the fused model; onnxruntime: needs hrnet[onnx] (default eager; onnxruntime for an "
                        ".onnx --checkpoint)")
    add_precision_arg(p)


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """--precision, shared by predict, eval, bench and serve."""
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (exact, default); bf16: CPUs with AVX512_BF16/AMX and GPUs; fp16: GPUs; int8: "
                        "a file from 'hrnet quantize' passed as --checkpoint OUT.onnx (an .onnx checkpoint "
                        "runs at the precision it was written in; --precision checks it)")


def show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "predict", "classify images: top-k ImageNet classes with probabilities",
                   "  hrnet predict hrnet-w18 examples/images\n"
                   "  hrnet predict hrnet-w48-ssld photo.jpg 'shots/**/*.png' --topk 3\n"
                   "  hrnet predict hrnet-w18 --checkpoint my.safetensors img.jpg --json\n"
                   "  hrnet predict hrnet-w18 photos/ --backend onnxruntime --batch-size 32\n"
                   "  hrnet predict hrnet-w18 photos/ --backend fused --precision bf16\n"
                   "  hrnet predict hrnet-w18 --checkpoint w18.int8.onnx photos/   # from 'hrnet quantize'")
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, directories (recursive) or globs")
    p.add_argument("--topk", type=positive_int, default=5, metavar="K", help="classes per image (default 5)")
    add_inference_args(p, batch_size=16)
    add_output_args(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..inference.predict import predict

    records = predict(args.name, args.inputs, topk=args.topk, checkpoint=args.checkpoint,
                      batch_size=args.batch_size, workers=args.workers, device=args.device,
                      input_size=args.input_size, crop_pct=args.crop_pct, strict=args.strict,
                      progress=show_progress(args), backend=args.backend, precision=args.precision)
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
        print("hrnet: error: no input could be classified", file=sys.stderr)
        return 1
    return 0
