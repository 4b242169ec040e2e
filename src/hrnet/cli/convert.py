"""hrnet convert: any supported checkpoint to hrnet's format (safetensors + metadata), or a hub directory."""

from __future__ import annotations

import argparse

from ..weights import LAYOUTS, WRITABLE, convert_checkpoint
from ._common import add_output_args, add_parser, print_json, show_progress

EXAMPLES = """\
  hrnet convert hrnet-w18_3rdparty_8xb32_in1k_20220120-0c10b180.pth hrnet-w18.safetensors
  hrnet convert HRNet_W48_C_ssld_pretrained.pdparams hrnet-w48-ssld --model hrnet-w48-ssld --hub
  hrnet convert https://huggingface.co/timm/hrnet_w18_small.ms_in1k/resolve/main/model.safetensors \\
      small.safetensors --from timm --json
  hrnet predict hrnet-w18 photo.jpg --checkpoint hrnet-w18.safetensors   # use the result
  hrnet convert HRNet_W18_C_ssld_pretrained.pdparams w18-ssld_backbone.pth --to official --backbone-only
  hrnet convert hrnet-w18.safetensors hrnet_w18_timm.pth --to timm       # timm loads it strictly"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "convert", "convert any official, timm, mmcls, PaddleClas or hrnet checkpoint to hrnet's "
                   "format, or to the layout official/timm/mmcls (and mmseg, mmdet, mmpose) code loads", EXAMPLES)
    p.add_argument("src", metavar="SRC", help="checkpoint file, hub directory or http(s) URL (format read from the content)")
    p.add_argument("dst", metavar="DST", help="output .safetensors file (a directory with --hub)")
    p.add_argument("--model", metavar="NAME", help="zoo model the weights belong to (default: inferred from the keys)")
    p.add_argument("--from", dest="layout", choices=("auto", *LAYOUTS), default="auto",
                   help="the layout SRC must have (default: detected)")
    p.add_argument("--to", choices=WRITABLE, default="hrnet",
                   help="layout of DST: hrnet (safetensors, default), official or timm (.pth state dict), "
                        "mmcls (.pth with meta)")
    p.add_argument("--backbone-only", action="store_true",
                   help="drop the classification head (incre, downsamp, final_layer, classifier) for dense-prediction "
                        "code: no 'unexpected key' warnings")
    p.add_argument("--hub", action="store_true", help="write DST as a directory: config.json + model.safetensors")
    add_output_args(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    result = convert_checkpoint(args.src, args.dst, model=args.model, layout=args.layout, to=args.to,
                                backbone_only=args.backbone_only, hub=args.hub, progress=show_progress(args))
    if args.json:
        print_json(result)
    else:
        what = "backbone only" if result["backbone_only"] else f"{result['num_classes']} classes"
        print(f"wrote {result['dst']}: {result['model']} in the {result['format']} layout, {what}, from the "
              f"{result['source_format']} layout, source sha256 {result['source_sha256'][:12]}")
    return 0
