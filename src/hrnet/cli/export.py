"""hrnet export: ONNX or torch.export (.pt2) files of the inference-optimised model, verified."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import HRNetError, UsageError
from ..extras import require
from ..fileio import refuse_same_file
from ._common import (add_input_size_arg, add_model_args, add_output_args, add_parser, integer_arg, load_model,
                      print_json)

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}


def batch_arg(value: str) -> int | None:
    """``dynamic`` (None) or a positive batch size."""
    if value == "dynamic":
        return None
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected 'dynamic' or a positive integer, got {value!r}")


# torch's ONNX exporter writes opset 18 and converts down on request; for HRNet that conversion fails
# and the file silently keeps opset 18 (measured with torch 2.14: 17 and 13 both give 18): refuse them.
MIN_OPSET = 18


def opset_version(text: str) -> int:
    """argparse type: an ONNX opset from MIN_OPSET up (the top is checked against onnx once imported)."""
    return integer_arg(text, MIN_OPSET, 99)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "export", "export a model to ONNX or torch.export (.pt2), checked against eager PyTorch",
                   "  hrnet export hrnet-w18 --checkpoint w18.pth -o hrnet-w18.onnx\n"
                   "  hrnet export hrnet-w48 --checkpoint w48.pth --format pt2 -o w48.pt2 --batch 8\n"
                   "  hrnet export hrnet-w18-ssld -o w18-ssld.onnx --input-size 288 288 --opset 18 --json")
    add_model_args(p)
    p.add_argument("-o", "--output", required=True, type=Path, help="file to write (.onnx or .pt2)")
    p.add_argument("--format", choices=sorted(set(FORMATS.values())),
                   help="file format (default: from the output's extension)")
    p.add_argument("--batch", type=batch_arg, default=None, metavar="dynamic|N",
                   help="a dynamic batch axis (default) or a fixed batch size")
    add_input_size_arg(p, "fixed input size (default: the model's evaluation crop)")
    p.add_argument("--opset", type=opset_version,
                   help=f"ONNX opset version, {MIN_OPSET} or later (default: the exporter's)")
    p.add_argument("--no-check", action="store_true",
                   help="skip running the file and comparing its logits with the eager model")
    add_output_args(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..deploy import export_onnx, export_pt2

    refuse_same_file(args.output, args.checkpoint)
    fmt = args.format or FORMATS.get(args.output.suffix.lower())
    if fmt is None:
        raise HRNetError(f"{args.output}: cannot tell the format from the extension; pass --format onnx|pt2")
    if args.opset is not None and fmt != "onnx":
        raise HRNetError(f"{args.output}: --opset applies to ONNX only")
    if fmt == "onnx":
        require("onnx", "hrnet export to ONNX")
        import onnx

        if args.opset is not None and args.opset > onnx.defs.onnx_opset_version():
            raise UsageError(f"--opset {args.opset}: the installed onnx {onnx.__version__} knows opsets up to "
                             f"{onnx.defs.onnx_opset_version()}")
    model = load_model(args)
    if not args.quiet and not args.json:
        print(f"exporting {args.name} to {args.output} ({fmt}) ...", file=sys.stderr, flush=True)
    options = {"batch": args.batch, "input_size": tuple(args.input_size) if args.input_size else None,
               "check": not args.no_check}
    if fmt == "onnx":
        path = export_onnx(model, args.output, opset=args.opset, **options)
    else:
        path = export_pt2(model, args.output, **options)
    info = {"path": str(path), "format": fmt, "batch": args.batch or "dynamic", "bytes": path.stat().st_size,
            "checked": not args.no_check}
    if args.json:
        print_json(info)
    else:  # the result: printed under --quiet too
        check = "; logits match eager PyTorch" if info["checked"] else ""
        print(f"wrote {path} ({info['bytes'] / 2**20:.1f} MiB, batch {info['batch']}){check}")
    return 0
