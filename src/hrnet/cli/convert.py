"""hrnet convert: any supported checkpoint to hrnet's format (safetensors + metadata), or a hub directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models import ARCHS, MODELS, create_model, resolve
from ..weights import LAYOUTS, load_checkpoint
from ..weights.checkpoint import load_into, local_path, save_checkpoint, wrong_arch
from ..weights.download import file_sha256, is_url
from ..weights.safe import HUB_WEIGHTS
from ._common import add_output_args, add_parser, print_json

EXAMPLES = """\
  hrnet convert hrnet-w18_3rdparty_8xb32_in1k_20220120-0c10b180.pth hrnet-w18.safetensors
  hrnet convert HRNet_W48_C_ssld_pretrained.pdparams hrnet-w48-ssld --model hrnet-w48-ssld --hub
  hrnet convert https://huggingface.co/timm/hrnet_w18_small.ms_in1k/resolve/main/model.safetensors \\
      small.safetensors --from timm --json
  hrnet predict hrnet-w18 photo.jpg --checkpoint hrnet-w18.safetensors   # use the result"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "convert", "convert an official, timm, mmcls or PaddleClas checkpoint to hrnet's format",
                   EXAMPLES)
    p.add_argument("src", metavar="SRC", help="checkpoint file, hub directory or http(s) URL (format read from the content)")
    p.add_argument("dst", metavar="DST", help="output .safetensors file (a directory with --hub)")
    p.add_argument("--model", metavar="NAME", help="zoo model the weights belong to (default: inferred from the keys)")
    p.add_argument("--from", dest="layout", choices=("auto", *LAYOUTS), default="auto",
                   help="the layout SRC must have (default: detected)")
    p.add_argument("--hub", action="store_true", help="write DST as a directory: config.json + model.safetensors")
    add_output_args(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    path = local_path(args.src, progress=not args.quiet)
    sd, meta = load_checkpoint(path, layout=args.layout)
    arch = ARCHS[meta["arch"]]
    name = args.model or meta.get("model") or next(r.name for r in MODELS.values() if r.arch == arch)
    record = resolve(name)
    if record.arch != arch:
        raise wrong_arch(path, arch, record.name, record.arch)
    model = create_model(record.name, num_classes=int(meta["num_classes"]))
    load_into(model, sd, path)
    sha = file_sha256(path / HUB_WEIGHTS if path.is_dir() else path)
    source = args.src if is_url(args.src) else Path(args.src).name
    out = save_checkpoint(model, args.dst, hub=args.hub,
                          metadata={"source": source, "source_format": meta["format"], "source_sha256": sha})
    result = {"dst": str(out), "model": record.name, "arch": arch.name, "num_classes": int(meta["num_classes"]),
              "source_format": meta["format"], "source_sha256": sha}
    if args.json:
        print_json(result)
    else:
        print(f"wrote {out}: {record.name}, {result['num_classes']} classes, from the {meta['format']} layout, "
              f"source sha256 {sha[:12]}")
    return 0
