"""hrnet convert: any supported checkpoint to hrnet's format (safetensors + metadata), a hub directory,
timm's own folder, or the layout official/timm/mmcls/PaddleClas code loads."""

from __future__ import annotations

import argparse

from ..models.arch import ARCHS
from ..weights import LAYOUTS, WRITABLE, convert_checkpoint
from ..weights.timm_hub import timm_architecture
from ._common import add_output_args, add_parser, print_json, show_progress

EXAMPLES = """\
  hrnet convert hrnet-w18_3rdparty_8xb32_in1k_20220120-0c10b180.pth hrnet-w18.safetensors
  hrnet convert HRNet_W48_C_ssld_pretrained.pdparams hrnet-w48-ssld --model hrnet-w48-ssld --hub
  hrnet convert https://huggingface.co/timm/hrnet_w18_small.ms_in1k/resolve/main/model.safetensors \\
      small.safetensors --from timm --json
  hrnet predict hrnet-w18 photo.jpg --checkpoint hrnet-w18.safetensors   # use the result
  hrnet convert HRNet_W18_C_ssld_pretrained.pdparams w18-ssld_backbone.pth --to official --backbone-only
  hrnet convert runs/x/best.safetensors out/ --to timm --hub   # timm.create_model("local-dir:out", pretrained=True)
  hrnet convert hrnet-w18.safetensors hrnet_w18_timm.pth --to timm       # timm loads it strictly
  hrnet convert runs/x/best.safetensors best.pdparams --to paddle         # PaddleClas's HRNet loads it"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "convert", "convert any official, timm, mmcls, PaddleClas or hrnet checkpoint to hrnet's "
                   "format, or to the layout official/timm/mmcls (and mmseg, mmdet, mmpose) code loads", EXAMPLES)
    p.add_argument("src", metavar="SRC", help="checkpoint file, hub directory or http(s) URL (format read from the content)")
    p.add_argument("dst", metavar="DST", help="output .safetensors file (a directory with --hub)")
    p.add_argument("--model", metavar="NAME", help="zoo model the weights belong to (default: inferred from the keys)")
    p.add_argument("--from", dest="layout", choices=("auto", *LAYOUTS), default="auto",
                   help="the layout SRC must have (default: detected)")
    p.add_argument("--to", choices=WRITABLE, default="hrnet",
                   help="layout of DST: hrnet (safetensors, default), official or timm (.pth state dict: timm "
                        "builds it strictly only as a 1000-class model; a fine-tuned head needs --hub), mmcls "
                        "(.pth with meta), paddle (PaddleClas .pdparams)")
    p.add_argument("--backbone-only", action="store_true",
                   help="drop the classification head (incre, downsamp, final_layer, classifier) for dense-prediction "
                        "code: no 'unexpected key' warnings")
    p.add_argument("--hub", action="store_true",
                   help="write DST as a directory: config.json + model.safetensors; with --to timm, timm's own "
                        "folder (architecture, class count, class names, eval transform) that "
                        "timm.create_model('local-dir:DST', pretrained=True) loads with any class count")
    add_output_args(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    result = convert_checkpoint(args.src, args.dst, model=args.model, layout=args.layout, to=args.to,
                                backbone_only=args.backbone_only, hub=args.hub, progress=show_progress(args))
    if args.json:
        print_json(result)
    else:
        what = "backbone only" if result["backbone_only"] else f"{result['num_classes']} classes"
        names = "with their names" if result["class_names"] else "no class names"
        print(f"wrote {result['dst']}: {result['model']} in the {result['format']} layout, {what}, {names}, from "
              f"the {result['source_format']} layout, source sha256 {result['source_sha256'][:12]}")
        if args.to == "timm" and not args.hub and result["num_classes"] not in (0, 1000):
            print(f"  timm builds it with timm.create_model('{timm_architecture(ARCHS[result['arch']])}', "
                  f"num_classes={result['num_classes']}) then timm.models.load_checkpoint(model, "
                  f"'{result['dst']}'); --hub writes a folder timm loads by itself, class names included")
    return 0
