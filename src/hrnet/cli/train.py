"""hrnet train / plot: run a YAML recipe, and draw a run's curves."""

from __future__ import annotations

import argparse

from ._common import add_output_args, add_parser, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "train", "train or fine-tune a model from a YAML recipe (one CPU, or many GPUs under torchrun)",
        "  hrnet train configs/hrnet-w18_in1k.yaml --set data.train=/data/imagenet/train --set data.val=/data/imagenet/val\n"
        "  hrnet train configs/finetune.yaml --set data.train=flowers/train --set model.num_classes=102\n"
        "  hrnet train configs/digits.yaml --set schedule.epochs=3 --set output.dir=runs/try\n"
        "  hrnet train configs/hrnet-w18_in1k.yaml --resume            # newest checkpoint in output.dir\n"
        "  hrnet train configs/hrnet-w18_in1k.yaml --resume runs/w18/checkpoints/step-00050000.pt\n"
        "  torchrun --nproc-per-node 8 -m hrnet train configs/hrnet-w48_in1k.yaml --set train.sync_bn=true")
    p.add_argument("config", metavar="CONFIG.yaml", help="the recipe (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. optim.lr=0.05 or data.crop_scale=[0.5,1] (repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from PATH, or without PATH from the newest checkpoint in output.dir")
    add_output_args(p)
    p.set_defaults(func=cmd_train)

    p = add_parser(sub, "plot", "draw a training run's loss, accuracy and learning-rate curves (PNG)",
                   "  hrnet plot runs/digits -o curves.png\n  hrnet plot runs/w18/log.jsonl -o w18.png")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its log.jsonl)")
    p.add_argument("-o", "--output", default="curves.png", help="PNG file to write (default: curves.png)")
    add_output_args(p)
    p.set_defaults(func=cmd_plot)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.config import load_config
    from ..distributed import cleanup, init_distributed
    from ..training.train import train

    cfg = load_config(args.config, args.overrides)
    try:
        is_main = init_distributed(cfg.train.device).is_main
        result = train(cfg, resume=args.resume, quiet=args.quiet)
    finally:
        cleanup()
    if not is_main:
        return 0
    summary = {"run_dir": str(result.run_dir), "steps": result.steps, "best_metric": result.best_metric,
               "best_weights": str(result.best_weights) if result.best_weights else None}
    if args.json:
        print_json(summary)
    elif not args.quiet:
        print(f"run: {result.run_dir}  steps: {result.steps}  best: {result.best_metric:.2f}%  "
              f"weights: {result.best_weights}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..training.plot import plot_run

    out = plot_run(args.run_dir, args.output)
    if args.json:
        print_json({"output": str(out)})
    elif not args.quiet:
        print(out)
    return 0
