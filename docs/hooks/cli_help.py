"""MkDocs hook: replace ``<!-- hrnet-cli-help -->`` in a page with the ``--help`` of every ``hrnet`` command.

The CLI reference is then the parser itself, so it cannot drift from what ``hrnet`` accepts. The text is
formatted at a fixed width (100 columns) so the page does not depend on the terminal that builds it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

MARKER = "<!-- hrnet-cli-help -->"
SRC = Path(__file__).resolve().parents[2] / "src"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from hrnet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"hrnet": parser, **{f"hrnet {name}": p for name, p in sub.choices.items()}}


def help_markdown() -> str:
    """One section per command (in the order ``hrnet --help`` lists them), each its help as a code block."""
    os.environ["COLUMNS"] = "100"
    parts = []
    for name, parser in _subcommands().items():
        parts.append(f"## `{name}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, help_markdown()) if MARKER in markdown else markdown
