"""The ``hrnet`` command. Every module of this package adds its subcommands through ``register``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import HRNetError

EPILOG = """examples:
  hrnet list                          the model zoo table
  hrnet info hrnet_w18_ssld           one record (any alias works)
  hrnet flops hrnet-w48 --input-size 288 288 --json
  hrnet convert HRNet_W18_C_ssld_pretrained.pdparams w18-ssld.safetensors

'hrnet COMMAND --help' explains each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hrnet", description="HRNet image classifiers: zoo, weights, inference, training, export.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HRNetError as e:
        print(f"hrnet: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hrnet: interrupted", file=sys.stderr)
        return 130
