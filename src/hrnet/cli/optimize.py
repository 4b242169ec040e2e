"""hrnet optimize: build, time and check every way this machine can run a model; keep the fastest that agrees."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ._common import (add_model_args, add_output_args, add_parser, crop_fraction, crop_size, positive_int,
                      print_json, show_progress)


def percentage(text: str) -> float:
    """argparse type: a percentage from 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from ..deploy.optimize import CANDIDATES, OBJECTIVES

    p = add_parser(sub, "optimize", "measure every backend and precision this machine runs; keep the fastest "
                   "whose top-1 agreement with fp32 meets a threshold",
                   "  hrnet optimize hrnet-w18 --calib train_images/ -o w18-opt\n"
                   "  hrnet optimize hrnet-w18-small --checkpoint runs/digits/best.safetensors --calib digits/train \\\n"
                   "      --val digits/val --batch-size 32 --min-agreement 99 -o digits-opt --json\n"
                   "  hrnet predict hrnet-w18 --checkpoint w18-opt photos/      # runs what it chose\n"
                   "  hrnet compare hrnet-w18 --checkpoint w18-opt --data val/ eager w18-opt\n"
                   "OUT_DIR holds the chosen artefact, the reference weights, hrnet-optimize.json (the manifest)\n"
                   "and report.json, report.txt and report.png (speed against agreement).")
    add_model_args(p)
    p.add_argument("--calib", required=True, type=Path, metavar="DIR",
                   help="calibration images for int8 (recursive); a seeded 20%% is held out for the agreement "
                        "check unless --val is given; class folders add accuracy")
    p.add_argument("--val", type=Path, metavar="DIR", help="held-out images for the agreement check")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="timed at batch 1 and at N (default 16)")
    p.add_argument("--min-agreement", type=percentage, default=99.5, metavar="PCT",
                   help="top-1 agreement with fp32 a candidate needs, in percent (default 99.5)")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                   help="rank by images/s at --batch-size (throughput, default) or at batch 1 (latency)")
    p.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=None, metavar="BACKEND:PRECISION",
                   help=f"only these (default: all this machine runs: {', '.join(CANDIDATES)})")
    p.add_argument("--input-size", type=crop_size, default=None, metavar="PX",
                   help="centre-crop size, fixed in the ONNX graphs (default: the model's)")
    p.add_argument("--crop-pct", type=crop_fraction, default=None, metavar="F", help="crop / resized short edge")
    p.add_argument("--num-images", type=positive_int, default=256, metavar="N",
                   help="calibrate int8 on a seeded sample of N images (default 256)")
    p.add_argument("--rounds", type=positive_int, default=3, metavar="N", help="alternating timing rounds (default 3)")
    p.add_argument("--iters", type=positive_int, default=5, metavar="N",
                   help="timed batches per candidate, batch size and round (default 5)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: the backend's choice)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT_DIR",
                   help="folder to write (must not exist, or be empty)")
    add_output_args(p)
    p.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    from ..deploy.optimize import optimize, report_table

    if args.device not in (None, "cpu"):
        from ..errors import UsageError

        raise UsageError(f"--device {args.device}: optimize measures the CPU candidates only")
    if not args.quiet and not args.json:
        print(f"optimizing {args.name} into {args.output} ...", file=sys.stderr, flush=True)  # chatter
    report = optimize(args.name, args.output, calib=args.calib, checkpoint=args.checkpoint, val=args.val,
                      batch_size=args.batch_size, min_agreement=args.min_agreement, objective=args.objective,
                      candidates=args.candidates, input_size=args.input_size, crop_pct=args.crop_pct,
                      num_images=args.num_images, rounds=args.rounds, iters=args.iters, threads=args.threads,
                      progress=show_progress(args))
    if args.json:
        print_json({"output": str(args.output), **report})
        return 0
    held = report["held_out"]
    print(report_table(report))
    print(f"\nchosen: {report['chosen']} — the fastest ({report['objective']}) with at least "
          f"{report['min_agreement']} % top-1 agreement on {held['images']} held-out images")
    print(f"wrote {args.output}/ ({report['artefact']}, hrnet-optimize.json, report.txt, report.png)")
    print(f"run it: hrnet predict {args.name} --checkpoint {args.output} IMAGES")
    return 0
