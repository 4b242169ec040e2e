"""hrnet compare: two ways of running a model on the same images, and how much they agree."""

from __future__ import annotations

import argparse
import sys

from ._common import add_model_args, add_output_args, add_parser, nonnegative_int, print_json, show_progress
from .predict import add_inference_args


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "compare", "top-1 agreement, top-5 overlap and accuracy of two runs (backend, precision "
                   "or an .onnx file) on the same images",
                   "  hrnet compare hrnet-w18 --data val/ eager hrnet-w18.int8.onnx\n"
                   "  hrnet compare hrnet-w18 --checkpoint my.safetensors --data val/ fused fused:bf16 --json\n"
                   "  hrnet compare hrnet-w48 --data photos/ eager onnxruntime --input-size 288\n"
                   "  hrnet compare hrnet-w18 --data val/ --device cuda fused fused:fp16   # on a GPU\n"
                   "RUN is BACKEND[:PRECISION] (backends: eager, fused, compile, onnxruntime; precisions: fp32,\n"
                   "bf16 with eager and fused) or the path of an .onnx file (from hrnet quantize or export).\n"
                   "A folder of class folders is labelled (as hrnet eval reads it) and adds each run's accuracy.")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="DIR", help="folder of images, or of class folders")
    p.add_argument("a", metavar="RUN_A", help="the reference run, e.g. eager")
    p.add_argument("b", metavar="RUN_B", help="the run to judge, e.g. model.int8.onnx or fused:bf16")
    add_inference_args(p, batch_size=32, runs=False)
    p.add_argument("--show", type=nonnegative_int, default=20, metavar="K",
                   help="list at most K images where top-1 differs, in text output (default 20; --json lists all)")
    add_output_args(p)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..deploy.compare import compare

    r = compare(args.name, args.data, args.a, args.b, checkpoint=args.checkpoint, batch_size=args.batch_size,
                workers=args.workers, input_size=args.input_size, crop_pct=args.crop_pct,
                progress=show_progress(args), device=args.device or "cpu")
    for s in r["skipped"]:
        print(f"hrnet: skipped {s['error']}", file=sys.stderr)
    if args.json:
        print_json(r)
        return 0
    diff = r["disagreements"]
    print(f"A = {r['a']}   B = {r['b']}   {r['n']} images at {r['input_size']}x{r['input_size']}")
    print(f"top-1 agreement  {r['top1_agreement']:7.2f} %  ({r['n'] - len(diff)}/{r['n']})")
    print(f"top-5 overlap    {r['top5_overlap']:7.2f} %")
    print(f"largest |p_A - p_B|  {r['max_prob_diff']:.4g}")
    if r["accuracy"]:
        for key in ("a", "b"):
            acc = r["accuracy"][key]
            print(f"accuracy {key.upper()}       top-1 {acc['top1']:6.2f} %  top-5 {acc['top5']:6.2f} %")
    if diff:
        print(f"top-1 differs on {len(diff)} images" + (f" (first {args.show})" if len(diff) > args.show else "") + ":")
        for d in diff[:args.show]:
            label = f"  [label: {d['label']['label']}]" if "label" in d else ""
            print(f"  {d['file']}: A {d['a']['label']} ({100 * d['a']['score']:.1f}%), "
                  f"B {d['b']['label']} ({100 * d['b']['score']:.1f}%){label}")
    return 0
