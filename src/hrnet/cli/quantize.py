"""hrnet quantize: a static int8 ONNX file, calibrated on the user's images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import add_model_args, add_output_args, add_parser, crop_size, positive_int, print_json, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    from ..deploy.quantize import METHODS

    p = add_parser(sub, "quantize", "write a static int8 ONNX file (onnxruntime QDQ), calibrated on your images",
                   "  hrnet quantize hrnet-w18 --calib train_images/ -o hrnet-w18.int8.onnx\n"
                   "  hrnet quantize hrnet-w18 --checkpoint my.safetensors --calib data/train --num-images 128 \\\n"
                   "      --method entropy -o my.int8.onnx --json\n"
                   "  hrnet compare hrnet-w18 --data val/ eager hrnet-w18.int8.onnx   # what it costs in accuracy")
    add_model_args(p)
    p.add_argument("--calib", required=True, type=Path, metavar="DIR",
                   help="folder of calibration images (recursive; a few hundred training images)")
    p.add_argument("--num-images", type=positive_int, default=256, metavar="N",
                   help="calibrate on a seeded sample of N images (default 256)")
    p.add_argument("--method", choices=METHODS, default="minmax",
                   help="how activation ranges are chosen from the calibration data (default minmax)")
    p.add_argument("--input-size", type=crop_size, default=None, metavar="PX",
                   help="centre-crop size, fixed in the graph (default: the model record's, 224)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the .onnx file to write")
    add_output_args(p)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..deploy.ort import onnx_metadata
    from ..deploy.quantize import quantize_onnx, require_onnx
    from ..fileio import refuse_same_file
    from ._common import load_model

    refuse_same_file(args.output, args.checkpoint)
    require_onnx()  # before loading (maybe downloading) the model
    model = load_model(args)
    if not args.quiet and not args.json:
        print(f"quantizing {args.name} to {args.output} ...", file=sys.stderr, flush=True)  # chatter
    path = quantize_onnx(model, args.calib, args.output, num_images=args.num_images, method=args.method,
                         input_size=args.input_size, progress=show_progress(args))
    meta = onnx_metadata(path)
    info = {"path": str(path), "bytes": path.stat().st_size, "method": args.method,
            "calibration_images": int(meta["hrnet.calibration.images"]),
            "skipped": int(meta["hrnet.calibration.skipped"]), "input_size": meta["hrnet.input_size"]}
    if args.json:
        print_json(info)
    else:  # the result: printed under --quiet too
        skipped = f", {info['skipped']} unreadable files skipped" if info["skipped"] else ""
        print(f"wrote {path} ({info['bytes'] / 2**20:.1f} MiB, int8, calibrated on "
              f"{info['calibration_images']} images with {args.method}{skipped})")
    return 0
