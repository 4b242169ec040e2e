"""hrnet eval: top-1/top-5 on a labelled folder, in one process or sharded under torchrun."""

from __future__ import annotations

import argparse
import sys

from ..data.decode import display_path
from ._common import add_model_args, add_output_args, add_parser, format_table, print_json
from .predict import add_inference_args, inference_options, nothing_done


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "eval", "top-1/top-5 accuracy on ImageNet-style folders or an mmcls annotation file",
                   "  hrnet eval hrnet-w18 --data /data/imagenet/val          # wnid folders\n"
                   "  hrnet eval hrnet-w18 --data /data/val --ann-file val.txt  # 'relative/path label' lines\n"
                   "  hrnet eval hrnet-w48-ssld --data val --per-class --json --backend fused\n"
                   "  hrnet eval hrnet-w18 --data val --backend compile --precision bf16\n"
                   "  hrnet eval hrnet-w18 --data val --device cuda --precision bf16   # fused, batch 256, 8 workers\n"
                   "  hrnet eval hrnet-w18 --checkpoint w18.int8.onnx --data val   # from 'hrnet quantize'\n"
                   "  torchrun --nproc-per-node 8 -m hrnet eval hrnet-w18 --data /data/imagenet/val")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageNet val layout (one folder per wnid), any class-per-folder tree, or the root "
                        "that --ann-file paths are relative to")
    p.add_argument("--ann-file", metavar="FILE", help="lines of 'relative/path label' (mmcls format)")
    p.add_argument("--per-class", action="store_true", help="also report each class's accuracy")
    p.add_argument("--exclude-unknown", action="store_true",
                   help="skip non-wnid folders (lost+found, backups...) of an ImageNet tree instead of refusing it")
    add_inference_args(p, batch_size=None)
    add_output_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, init_distributed
    from ..inference.evaluate import evaluate

    info = init_distributed(args.device)
    try:
        result = evaluate(args.name, args.data, ann_file=args.ann_file, per_class=args.per_class,
                          exclude_unknown=args.exclude_unknown, **inference_options(args))
    finally:
        cleanup()
    if not info.is_main:
        return 0
    for s in result["skipped"]:
        print(f"hrnet: skipped {display_path(s['error'])}", file=sys.stderr)
    if args.json:
        print_json(result)
        return 0 if result["n"] else 1
    if not result["n"]:
        return nothing_done("no image could be evaluated", [s["file"] for s in result["skipped"]])
    if args.per_class:
        rows = [[str(c["index"]), display_path(c["label"]), str(c["n"]), f"{c['top1']:.2f}", f"{c['top5']:.2f}"]
                for c in result["per_class"]]
        print(format_table(rows, ["index", "class", "images", "top-1", "top-5"]))
    print(f"{args.name}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['n']} images "
          f"({len(result['skipped'])} skipped), {result['images_per_s']:.1f} images/s")
    return 0
