"""hrnet train / plot: run a YAML recipe, and draw a run's curves."""

from __future__ import annotations

import argparse
import sys

from ..training.config import RESUMABLE_TEXT, TrainOptions
from ..training.rundir import EXIT_PREEMPTED
from ._common import add_device_arg, add_output_args, add_parser, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "train", "train or fine-tune a model from a YAML recipe (one CPU, or many GPUs under torchrun)",
        "  hrnet data digits digits && hrnet train configs/digits.yaml   # 10 classes, a few minutes on a CPU\n"
        "  hrnet train configs/imagenet.yaml --set data.train=/data/imagenet/train --set data.val=/data/imagenet/val\n"
        "  hrnet train configs/imagenet.yaml --set model.name=hrnet-w48 --set output.dir=runs/hrnet-w48_in1k\n"
        "  hrnet train configs/finetune.yaml --set data.train=flowers/train --set model.num_classes=102\n"
        "  hrnet train configs/finetune.yaml --checkpoint w18.safetensors --set data.train=pets/train   # offline\n"
        "  hrnet train configs/digits.yaml --set schedule.epochs=3 --set output.dir=runs/try\n"
        "  hrnet train configs/digits.yaml --device cuda --set train.amp=bf16 --set train.channels_last=true\n"
        "  hrnet train configs/imagenet.yaml --resume                  # newest checkpoint in output.dir\n"
        "  hrnet train configs/imagenet.yaml --resume runs/imagenet/checkpoints/step-00050000.pt\n"
        "  hrnet train configs/digits.yaml --set 'optim={lr: 0.5}'     # merged: momentum etc. are kept\n"
        "  torchrun --nproc-per-node 8 --max-restarts 3 -m hrnet train configs/imagenet.yaml --resume auto\n"
        "\n"
        "output.dir must be new or empty: a directory holding a previous run is refused unless --resume\n"
        "continues it or --force deletes it first. One training at a time uses a directory (it is locked).\n"
        f"A resumed run may change only {RESUMABLE_TEXT}; the change is recorded in log.jsonl.\n"
        "It may run on another number of processes: the run's global batch is kept (per process: global /\n"
        "processes). SIGTERM or SIGUSR1 finish the step in flight, write a checkpoint and exit with code\n"
        f"{EXIT_PREEMPTED} on every rank (a second signal exits at once); a rank that dies or hangs ends the job after\n"
        f"train.collective_timeout_s (default {TrainOptions.collective_timeout_s:g} s). See docs/guides/cluster.md.\n"
        "The result (run directory, best and last accuracy, weights and log files) is printed even with\n"
        "--quiet; progress bars only go to a terminal.")
    p.add_argument("config", metavar="CONFIG.yaml", help="the recipe (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. optim.lr=0.05 or data.crop_scale=[0.5,1] (repeatable; "
                        "values are YAML 1.2: 1e-3 is a number, no is a string)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="start from these weights (any format hrnet reads) instead of the published ones: "
                        "sets model.checkpoint and turns model.pretrained off")
    add_device_arg(p)  # the same as --set train.device=DEVICE
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH|auto",
                       help="continue from PATH, or without PATH from the newest checkpoint in output.dir; auto: "
                            "from the newest checkpoint if there is one, else start (what a torchrun restart does)")
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
    from ..training import train as training

    if args.device:
        from ..distributed import check_device

        check_device(args.device)  # "--device cuda: ...", as the user wrote it
    overrides = args.overrides + ([f"train.device={args.device}"] if args.device else [])
    cfg = load_config(args.config, overrides)
    if args.checkpoint:
        cfg = with_checkpoint(cfg, args.checkpoint)
    training.check_device(cfg.train.device)
    try:
        is_main = init_distributed(cfg.train.device, cfg.train.collective_timeout_s).is_main
        result = training.train(cfg, resume=args.resume, force=args.force, quiet=args.quiet)
    finally:
        cleanup()
    code = EXIT_PREEMPTED if result.stopped_by else 0
    if result.stopped_by and is_main:
        print(f"hrnet: {result.stopped_by}: stopped after step {result.steps} with a checkpoint; the same command "
              "with --resume (or --resume auto) continues from it", file=sys.stderr)
    if not is_main:
        return code
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
    return code


def cmd_plot(args: argparse.Namespace) -> int:
    from ..training.plot import plot_run

    out = plot_run(args.run_dir, args.output)
    if args.json:
        print_json({"output": str(out)})
    else:
        print(out)
    return 0
