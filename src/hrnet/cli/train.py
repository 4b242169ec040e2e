"""hrnet train / plot: run a YAML recipe, and draw a run's curves."""

from __future__ import annotations

import argparse
import sys

from ..training.config import DEFAULT_VAL_FRACTION, RESUMABLE_TEXT, TrainOptions
from ..training.rundir import EXIT_PREEMPTED
from ._common import add_output_args, add_parser, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(
        sub, "train", "train or fine-tune a model from a recipe (one CPU, or many GPUs under torchrun)",
        "  hrnet train finetune --data photos/            # photos/cat/, photos/dog/ ...: 15 % of each held out\n"
        "  hrnet train finetune --data pets/              # pets/train/<class>/ and pets/val/<class>/\n"
        "  hrnet train finetune --data photos/ --checkpoint w18.safetensors   # offline: its model and input size\n"
        "  hrnet data digits digits && hrnet train digits # 10 classes, a few minutes on a CPU\n"
        "  hrnet train imagenet --data /data/imagenet --set model.name=hrnet-w48 --set output.dir=runs/w48\n"
        "  hrnet recipes finetune > my.yaml && hrnet train my.yaml --data photos/   # an edited copy\n"
        "  hrnet train digits --set schedule.epochs=3 --set output.dir=runs/try\n"
        "  hrnet train imagenet --resume                  # newest checkpoint in output.dir\n"
        "  hrnet train imagenet --resume runs/hrnet-w18_in1k/checkpoints/step-00050000.pt\n"
        "  hrnet train digits --set 'optim={lr: 0.5}'     # merged: momentum etc. are kept\n"
        "  torchrun --nproc-per-node 8 --max-restarts 3 -m hrnet train imagenet --resume auto\n"
        "\n"
        "RECIPE is a recipe's name (hrnet recipes lists them) or a YAML file's path. The model's classes are\n"
        "the class folders, by name: every checkpoint records them, and a val folder may hold a subset.\n"
        "Without a val folder, --val-fraction of each class is held out, the same images each time (by\n"
        "train.seed), listed in RUN_DIR/split.json, which --resume reuses.\n"
        "output.dir must be new or empty: a directory holding a previous run is refused unless --resume\n"
        "continues it or --force deletes it first. One training at a time uses a directory (it is locked).\n"
        f"A resumed run may change only {RESUMABLE_TEXT}; the change is recorded in log.jsonl.\n"
        "It may run on another number of processes: the run's global batch is kept (per process: global /\n"
        "processes). SIGTERM or SIGUSR1 finish the step in flight, write a checkpoint and exit with code\n"
        f"{EXIT_PREEMPTED} on every rank (a second signal exits at once); a rank that dies or hangs ends the job after\n"
        f"train.collective_timeout_s (default {TrainOptions.collective_timeout_s:g} s). See docs/guides/cluster.md.\n"
        "The result (run directory, best and last accuracy, weights and log files) is printed even with\n"
        "--quiet; progress bars only go to a terminal.")
    p.add_argument("config", metavar="RECIPE", help="a recipe's name (hrnet recipes: digits, finetune, imagenet) or "
                                                    "a YAML file's path")
    p.add_argument("--data", metavar="DIR",
                   help="train on DIR: DIR/train (and DIR/val), or DIR itself as a folder of class folders, of which "
                        "--val-fraction is held out (sets data.train, data.val)")
    p.add_argument("--val-fraction", type=fraction_arg, metavar="F",
                   help=f"with --data of one folder: hold out this fraction of each class for validation "
                        f"(default: the recipe's data.val_fraction, else {DEFAULT_VAL_FRACTION:g}; 0: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. optim.lr=0.05 or data.crop_scale=[0.5,1] (repeatable; "
                        "values are YAML 1.2: 1e-3 is a number, no is a string)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="start from these weights (any format hrnet reads) instead of the published ones: "
                        "sets model.checkpoint, turns model.pretrained off, and takes model.name and "
                        "data.input_size from the file (unless --set gives them)")
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


def fraction_arg(text: str) -> float:
    """argparse type: a fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def cmd_train(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, init_distributed
    from ..training.config import ConfigError, load_config, with_checkpoint, with_data
    from ..training import train as training

    if args.val_fraction is not None and not args.data:
        raise ConfigError("--val-fraction needs --data DIR (or give --set data.val_fraction=F)")
    cfg = load_config(args.config, args.overrides)
    if args.data:
        cfg = with_data(cfg, args.data, args.val_fraction)
    if args.checkpoint:
        given = {item.partition("=")[0].strip() for item in args.overrides}
        name, size = training.checkpoint_facts(args.checkpoint)
        cfg = with_checkpoint(cfg, args.checkpoint, name=None if "model.name" in given else name,
                              input_size=None if "data.input_size" in given else size)
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
    metric = "val top-1" if cfg.data.val or cfg.data.val_fraction else "training accuracy"
    summary = {"run_dir": str(result.run_dir), "steps": result.steps, "metric": metric,
               "best_metric": result.best_metric, "last_metric": result.last_metric,
               "best_weights": str(result.best_weights) if result.best_weights else None,
               "log": str(result.log) if result.log else None, "start": result.start,
               "class_names": list(result.class_names) if result.class_names else None}
    if args.json:
        print_json(summary)
    else:
        print(f"run: {result.run_dir}  steps: {result.steps}  {metric}: best {_percent(result.best_metric)}, "
              f"last {_percent(result.last_metric)}")
        print(f"weights: {result.best_weights}" + (f"  classes: {', '.join(result.class_names[:10])}"
                                                    + (" ..." if len(result.class_names) > 10 else "")
                                                    if result.class_names else ""))
        if result.start == "random":
            print("started from: random weights (no pretrained weights, no --checkpoint)")
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
