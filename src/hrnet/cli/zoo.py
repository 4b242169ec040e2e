"""hrnet list / info / flops: the model zoo."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..builder import create_model
from ..models import MODELS, count_flops, count_params, resolve
from ..weights.download import UNVERIFIED
from ._common import add_input_size_arg, add_output_args, add_parser, format_table, print_json, show_progress


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "list", "show the model zoo: params, FLOPs, ImageNet accuracy, weights file",
                   "  hrnet list\n  hrnet list --measure      # also count params/FLOPs of the built models\n"
                   "  hrnet list --json")
    p.add_argument("--measure", action="store_true",
                   help="build every model and count its params and FLOPs next to the published figures")
    add_output_args(p)
    p.set_defaults(func=cmd_list)

    p = add_parser(sub, "info", "show one model's record (any alias: timm, mmcls names)",
                   "  hrnet info hrnet-w18\n  hrnet info hrnet_w48_ssld.paddle_in1k --json")
    p.add_argument("name", help="model name or alias")
    add_output_args(p)
    p.set_defaults(func=cmd_info)

    p = add_parser(sub, "flops", "count a model's params and FLOPs (mmcls convention: conv MACs)",
                   "  hrnet flops hrnet-w18\n  hrnet flops hrnet-w48-ssld --input-size 288 288 --json")
    p.add_argument("name", help="model name or alias")
    add_input_size_arg(p, "image size to count at (default 224 224)", default=(224, 224))
    add_output_args(p)
    p.set_defaults(func=cmd_flops)


def _measure(name: str, input_size: tuple[int, int] = (224, 224)) -> tuple[int, int]:
    model = create_model(name)
    return count_params(model), count_flops(model, tuple(input_size))


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    # --measure builds every model (minutes on a CPU): a bar per model, on a terminal only
    bar = tqdm(list(MODELS.values()), desc="measuring", unit="model", disable=not (args.measure and show_progress(args)),
               dynamic_ncols=True)
    for r in bar:
        bar.set_postfix_str(r.name)
        row = {"name": r.name, "params": r.params, "flops": r.flops, "top1": r.top1, "top5": r.top5,
               "weights": r.filename}
        if args.measure:
            row["measured_params"], row["measured_flops"] = _measure(r.name)
        rows.append(row)
    if args.json:
        print_json(rows)
        return 0

    def m(v: int | None) -> str:
        return "-" if v is None else f"{v / 1e6:.2f}"

    def g(v: int | None) -> str:
        return "-" if v is None else f"{v / 1e9:.2f}"

    header = ["model", "params(M)", "FLOPs(G)", "top-1", "top-5", "weights"]
    if args.measure:
        header[3:3] = ["measured params(M)", "measured FLOPs(G)"]
    table = []
    for row in rows:
        cells = [row["name"], m(row["params"]), g(row["flops"]), f"{row['top1']:.2f}", f"{row['top5']:.2f}",
                 row["weights"]]
        if args.measure:
            cells[3:3] = [m(row["measured_params"]), g(row["measured_flops"])]
        table.append(cells)
    print(format_table(table, header))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    record = resolve(args.name)
    d = record.to_dict()
    d["download_check"] = (f"SHA-256 prefix {record.sha256_prefix}" if record.sha256_prefix else UNVERIFIED)
    if args.json:
        print_json(d)
        return 0
    for k, v in d.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                print(f"{k}.{k2}: {v2}")
        else:
            print(f"{k}: {', '.join(v) if isinstance(v, (list, tuple)) else v}")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    record = resolve(args.name)
    params, flops = _measure(record.name, args.input_size)
    out = {"name": record.name, "input_size": list(args.input_size), "params": params, "flops": flops}
    if args.json:
        print_json(out)
    else:
        h, w = args.input_size
        print(f"{record.name} at {h}x{w}: {params:,} params ({params / 1e6:.2f} M), "
              f"{flops:,} FLOPs ({flops / 1e9:.2f} G)")
    return 0
