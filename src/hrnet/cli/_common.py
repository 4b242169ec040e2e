"""Helpers shared by the subcommands: argument groups and output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with worked examples."""
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or chatter")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """NAME plus where its weights come from: the zoo's published file, or --checkpoint."""
    p.add_argument("name", metavar="NAME", help="model name or alias (see 'hrnet list')")
    p.add_argument("--checkpoint", metavar="PATH_OR_URL",
                   help="weights to load instead of the published ones: any supported format")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def load_model(args: argparse.Namespace, **kwargs: Any):
    """The model named on the command line, with --checkpoint or else the published weights, in eval mode."""
    from ..distributed import default_device
    from ..builder import create_model

    model = create_model(args.name, pretrained=args.checkpoint is None, checkpoint=args.checkpoint,
                         progress=not getattr(args, "quiet", False), **kwargs)
    return model.to(args.device or default_device()).eval()
