"""hrnet train / plot: run a YAML recipe, and draw a run's curves."""

from __future__ import annotations

import argparse

from ._common import add_output_args, add_parser, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "train", "train or fine-tune a model from a YAML recipe (one CPU, or many GPUs under torchrun)",
        "  hrnet data digits digits && hrnet train configs/digits.yaml   # 10 classes, a few minutes on a CPU\n"
        "  hrnet train configs/hrnet-w18_in1k.yaml --set data.train=/data/imagenet/train --set data.val=/data/imagenet/val\n"
        "  hrnet train configs/finetune.yaml --set data.train=flowers/train --set model.num_classes=102\n"
        "  hrnet train configs/finetune.yaml --checkpoint w18.safetensors --set data.train=pets/train   # offline\n"
        "  hrnet train configs/digits.yaml --set schedule.epochs=3 --set output.dir=runs/try\n"
        "  hrnet train configs/hrnet-w18_in1k.yaml --resume            # newest checkpoint in output.dir\n"
        "  hrnet train configs/hrnet-w18_in1k.yaml --resume runs/w18/checkpoints/step-00050000.pt\n"
        "  torchrun --nproc-per-node 8 -m hrnet train configs/hrnet-w48_in1k.yaml --set train.sync_bn=true\n"
        "\n"
        "output.dir must be new or empty: a directory holding a previous run is refused unless --resume\n"
        "continues it or --force deletes it first. One training at a time uses a directory (it is locked).\n"
        "A resumed run may change only schedule.epochs, data.workers, data.val(_ann), train.device and\n"
        "output.*; the change is recorded in log.jsonl. The result (run directory, best and last accuracy,\n"
        "weights and log files) is printed even with --quiet; progress bars only go to a terminal.")
    p.add_argument("config", metavar="CONFIG.yaml", help="the recipe (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. optim.lr=0.05 or data.crop_scale=[0.5,1] (repeatable; "
                        "values are YAML 1.2: 1e-3 is a number, no is a string)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="start from these weights (any format hrnet reads) instead of the published ones: "
                        "sets model.checkpoint and turns model.pretrained off")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                       help="continue from PATH, or without PATH from the newest checkpoint in output.dir")
    again.add_argument("--force", action="store_true",
                       help="delete the previous run in output.dir (its checkpoints, log, best weights) and start "
                            "afresh")
    add_output_args(p)
    p.set_defaults(func=cmd_train)

    p = add_parser(sub, "plot", "draw a training run's loss, accuracy and learning-rate curves (PNG)",
                   "  hrnet plot runs/digits -o curves.png\n  hrnet plot runs/w18/log.jsonl -o w18.png\n\n"
                   "The PNG's path is printed even with --quiet.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its log.jsonl)")
    p.add_argument("-o", "--output", default="curves.png", help="PNG file to write (default: curves.png)")
    add_output_args(p)
    p.set_defaults(func=cmd_plot)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def cmd_train(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, init_distributed
    from ..training.config import load_config, with_checkpoint
    from ..training.train import check_device, train

    cfg = load_config(args.config, args.overrides)
    if args.checkpoint:
        cfg = with_checkpoint(cfg, args.checkpoint)
    check_device(cfg.train.device)
    try:
        is_main = init_distributed(cfg.train.device).is_main
        result = train(cfg, resume=args.resume, force=args.force, quiet=args.quiet)
    finally:
        cleanup()
    if not is_main:
        return 0
    metric = "val top-1" if cfg.data.val else "training accuracy"
    summary = {"run_dir": str(result.run_dir), "steps": result.steps, "metric": metric,
               "best_metric": result.best_metric, "last_metric": result.last_metric,
               "best_weights": str(result.best_weights) if result.best_weights else None,
               "log": str(result.log) if result.log else None}
    if args.json:
        print_json(summary)
    else:
        print(f"run: {result.run_dir}  steps: {result.steps}  {metric}: best {_percent(result.best_metric)}, "
              f"last {_percent(result.last_metric)}")
        print(f"weights: {result.best_weights}")
        print(f"log: {result.log}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..training.plot import plot_run

    out = plot_run(args.run_dir, args.output)
    if args.json:
        print_json({"output": str(out)})
    else:
        print(out)
    return 0
