"""hrnet data: write a data set that ships with a dependency as an image-folder tree."""

from __future__ import annotations

import argparse

from ..fileio import WriteError
from ._common import add_output_args, add_parser, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = add_parser(sub, "data", "write a built-in data set as train/val image folders (needs hrnet[digits])",
                   "  hrnet data digits digits                # what the digits recipe reads\n"
                   "  hrnet train digits\n"
                   "  hrnet data digits /tmp/d64 --size 64 --val-fraction 0.1 --seed 1 --json")
    p.add_argument("dataset", choices=["digits"],
                   help="digits: scikit-learn's 1,797 handwritten 8x8 digit scans (10 classes)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must not exist, or be empty)")
    p.add_argument("--val-fraction", type=float, default=0.2, metavar="F",
                   help="share of each class held out in OUT_DIR/val (default 0.2)")
    p.add_argument("--size", type=int, default=32, metavar="PX",
                   help="image side in pixels, bilinear upscaling (default 32, as the digits recipe)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="keep only N scans of each digit, before the split (default: all, about 180)")
    add_output_args(p)
    p.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from ..data.dataset import find_images
    from ..data.digits import write_digits

    try:
        train_dir, val_dir = write_digits(args.out_dir, size=args.size, val_fraction=args.val_fraction,
                                           seed=args.seed, per_class=args.per_class)
    except OSError as e:  # a failed write (a full disk) names no file: name the folder
        if e.filename is not None:
            raise
        raise WriteError(f"cannot write {args.out_dir}: {e.strerror or e}") from None
    counts = {"train": len(find_images(train_dir)), "val": len(find_images(val_dir)) if val_dir.is_dir() else 0}
    if args.json:
        print_json({"train": str(train_dir), "val": str(val_dir), "train_images": counts["train"],
                    "val_images": counts["val"], "classes": 10, "size": args.size})
    else:
        print(f"wrote {counts['train']} training images to {train_dir} and {counts['val']} held-out images "
              f"to {val_dir} ({args.size}x{args.size} greyscale PNG, 10 classes)")
    return 0
