"""The ``hrnet`` command. Every module of this package adds its subcommands through ``register``.

A user's mistake or the machine's state (a full disk, a missing permission) ends in one line on
stderr and exit code 1; ``HRNET_DEBUG=1`` shows the traceback instead. No Python warning reaches the
user raw: hrnet's own are one line in its words (``hrnet: warning: ...``), other packages' are
dropped (``HRNET_DEBUG=1`` shows them as Python would).

Output rule shared by every command: results go to stdout always (also under ``--quiet``); chatter
(what is about to happen) goes nowhere under ``--quiet``; progress bars go to stderr only when it is
a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import HRNetError

EPILOG = """examples:
  hrnet list                          the model zoo table
  hrnet info hrnet_w18_ssld           one record (any alias works)
  hrnet flops hrnet-w48 --input-size 288 288 --json
  hrnet convert HRNet_W18_C_ssld_pretrained.pdparams w18-ssld.safetensors
  hrnet data digits digits && hrnet train digits

'hrnet COMMAND --help' explains each command."""


def _version() -> str:
    from .._version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hrnet", description="HRNet image classifiers: zoo, weights, inference, training, export.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hrnet {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that arguments the command does not take (``bench --batch-size 1 4``)
    are reported with the command's own usage line rather than the top-level one."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, HRNetError) and e.strerror:
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return str(e).replace("\n", " ")


PACKAGE_DIR = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def warnings_in_our_words() -> Iterator[None]:
    """While a command runs, show each warning hrnet itself raises once, as one line without a source
    line, and drop those of other packages (torch's scheduler and DataLoader notices, PIL's...): what
    they say is either handled by hrnet or not the user's business. ``HRNET_DEBUG=1`` leaves Python's
    own display in place."""
    if os.environ.get("HRNET_DEBUG"):
        yield
        return

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
            first = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
            print(f"hrnet: warning: {first}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each distinct warning once per place, not once per batch
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        with warnings_in_our_words():
            code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`hrnet list | head`): stop quietly, as a killed writer would, and point
        # stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (HRNetError, OSError) as e:  # a user's mistake or the machine's state: one line, no traceback
        if os.environ.get("HRNET_DEBUG"):
            raise
        print(f"hrnet: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hrnet: interrupted", file=sys.stderr)
        return 130
