"""Helpers shared by the subcommands: argument groups, argument types and output.

The argument types turn an out-of-range number into argparse's one-line usage error naming the
option, before anything is built or loaded."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..deploy.runners import PRECISIONS

MAX_SIDE = 4096  # an image side in pixels; larger would only exhaust memory (4096^2 x 64 channels is 4 GiB)


def integer_arg(text: str, low: int, high: int | None = None) -> int:
    """argparse value check: ``text`` as an integer from ``low`` to ``high`` (or 10^9)."""
    digits = text.strip()  # ASCII digits only: int() takes '+5' and '٥', and str.isdigit() takes '²'
    if not (digits.isascii() and digits.isdigit() and len(digits) < 10 and low <= int(digits) <= (high or 10**9)):
        bound = f"from {low} to {high}" if high else f">= {low}"
        raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}")
    return int(digits)


def positive_int(text: str) -> int:
    """argparse type: a batch size, a top-k, a count of iterations or threads: 1 or more."""
    return integer_arg(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: 0 or more (warm-up batches, lines to show)."""
    return integer_arg(text, 0)


def worker_count(text: str) -> int:
    """argparse type: decoding processes, 0 (decode in-process) to 256."""
    return integer_arg(text, 0, 256)


def crop_size(text: str) -> int:
    """argparse type: an image side in pixels, 1 to MAX_SIDE."""
    return integer_arg(text, 1, MAX_SIDE)


def crop_fraction(text: str) -> float:
    """argparse type: a float in (0, 1], the fraction of the resized short edge that is cropped."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_input_size_arg(p: argparse.ArgumentParser, help: str, default: tuple[int, int] | None = None) -> None:
    """``--input-size H W``: two image sides, each 1 to MAX_SIDE pixels."""
    p.add_argument("--input-size", nargs=2, type=crop_size, metavar=("H", "W"), default=default,
                   help=f"{help} (each side 1 to {MAX_SIDE})")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars: only on a terminal, never under --quiet."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def add_compile_mode_arg(p: argparse.ArgumentParser) -> None:
    """--compile-mode, the torch.compile mode of the compile backend (predict, eval, bench, serve)."""
    from ..deploy.runners import COMPILE_MODES

    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="with --backend compile: torch.compile's mode (default 'default'; reduce-overhead "
                        "replays CUDA graphs, which pays at small batches on a GPU; max-autotune also "
                        "searches kernels, minutes of warm-up)")


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    """--precision, shared by predict, eval, bench and serve."""
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32 (exact, default); bf16: CPUs with AVX512_BF16/AMX and GPUs; fp16: GPUs; int8: "
                        "a file from 'hrnet quantize' passed as --checkpoint OUT.onnx (an .onnx checkpoint "
                        "runs at the precision it was written in; --precision checks it)")


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


def device_name(text: str) -> str:
    """argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has that GPU is checked when
    the command runs, by :func:`hrnet.distributed.check_device`, so a command line parses anywhere)."""
    from ..distributed import device_syntax

    if (problem := device_syntax(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device, the same option in every command that runs a model."""
    p.add_argument("--device", type=device_name, default=None, metavar="cpu|cuda|cuda:N",
                   help="where the model runs (default: cuda if a GPU is available, else cpu); with a GPU, "
                        "see docs/guides/gpu.md for the settings to pick")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """NAME plus where its weights come from (the zoo's published file, or --checkpoint) and --device."""
    p.add_argument("name", metavar="NAME", help="model name or alias (see 'hrnet list')")
    p.add_argument("--checkpoint", metavar="PATH_OR_URL",
                   help="weights to load instead of the published ones: any supported format, an .onnx file "
                        "(hrnet export/quantize), or an 'hrnet optimize' OUT_DIR (runs what it chose)")
    add_device_arg(p)


def load_model(args: argparse.Namespace):
    """The model named on the command line, with --checkpoint or else the published weights, in eval mode."""
    from ..deploy.engine import build_model
    from ..distributed import check_device

    device = check_device(args.device)  # before a download, not after
    return build_model(args.name, args.checkpoint, progress=show_progress(args)).to(device).eval()
