"""The documentation can't rot: the site builds with ``mkdocs build --strict`` (a broken link, a missing
page or an API name that no longer exists fails it), and every ``hrnet`` command line in the code blocks
of README.md and docs/ parses with the real command-line parser (``src/hrnet/cli``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shlex
from pathlib import Path

import pytest

from hrnet.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>", "2>&1"}


def code_lines(text: str) -> list[str]:
    """The lines of ``text``'s code blocks (fenced, or indented by 4 spaces and starting like a command),
    each with its backslash continuations joined."""
    lines, fenced, pending = [], False, ""
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        stripped = line.strip()
        indented_command = line.startswith("    ") and re.match(r"(\$ )?(hrnet|torchrun|python) ", stripped)
        if not (fenced or indented_command or pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return lines


def hrnet_argvs(line: str) -> list[list[str]]:
    """The argument lists of the ``hrnet`` invocations on one shell line: ``hrnet ...``, ``$ hrnet ...``,
    ``VAR=x hrnet ...``, ``python -m hrnet ...`` and ``torchrun ... -m hrnet ...``, split at ``&&``, ``|``,
    ``;`` and redirections; ``#`` comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;<>")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # not shell (an unbalanced quote in program output)
        return []
    segments, current = [], []
    for token in tokens:
        if token in SHELL_OPERATORS or set(token) <= set("&|;<>"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for seg in segments:
        while seg and (seg[0] == "$" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", seg[0])):
            seg = seg[1:]
        if seg[:1] == ["hrnet"]:
            found.append(seg[1:])
        elif seg[:1] in (["python"], ["python3"], ["torchrun"]) and "-m" in seg:
            at = seg.index("-m")
            if seg[at + 1: at + 2] == ["hrnet"]:
                found.append(seg[at + 2:])
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def check_argv(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """Why ``hrnet *argv`` is not a command line the CLI takes, or None when it is: the command exists, its
    ``--help`` works, every option is spelled exactly as the command defines it (no abbreviations), and
    the whole line parses."""
    if not argv or argv[0] in ("-h", "--help", "--version"):
        return None
    commands = subcommands(parser)
    if argv[0] not in commands:
        return f"unknown command {argv[0]!r}"
    sub = commands[argv[0]]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            parser.parse_args([argv[0], "--help"])
    except SystemExit as e:
        if e.code != 0:
            return f"'hrnet {argv[0]} --help' exited {e.code}"
    for token in argv[1:]:
        if token == "--":
            break
        if token.startswith("-") and not re.fullmatch(r"-\d+(\.\d*)?", token):
            option = token.split("=", 1)[0]
            if option not in sub._option_string_actions:
                return f"'hrnet {argv[0]}' has no option {option}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_args(parser, argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(file, line, argv) for every hrnet invocation in the docs."""
    found = []
    for path in DOC_FILES:
        for line in code_lines(path.read_text()):
            for argv in hrnet_argvs(line):
                found.append((str(path.relative_to(ROOT)), line, argv))
    return found


def test_the_checker_finds_commands_and_refuses_a_wrong_option():
    text = "\n".join([
        "Some prose that mentions hrnet predict --nonsense outside a code block.",
        "```bash",
        "hrnet predict hrnet-w18 photo.jpg --topk 3   # a comment --nonsense",
        "hrnet data digits digits && hrnet train digits",
        "torchrun --nproc-per-node 2 -m hrnet eval hrnet-w18 \\",
        "    --data val/ --batch-size 8",
        "$ hrnet predict hrnet-w18 photo.jpg --top-kay 3",
        "hrnet predict hrnet-w18 photo.jpg --top 3",
        "hrnet predikt hrnet-w18 photo.jpg",
        "hrnet flops hrnet-w18 --input-size 0 0",
        "```",
    ])
    argvs = [argv for line in code_lines(text) for argv in hrnet_argvs(line)]
    assert argvs == [
        ["predict", "hrnet-w18", "photo.jpg", "--topk", "3"],
        ["data", "digits", "digits"], ["train", "digits"],
        ["eval", "hrnet-w18", "--data", "val/", "--batch-size", "8"],
        ["predict", "hrnet-w18", "photo.jpg", "--top-kay", "3"],
        ["predict", "hrnet-w18", "photo.jpg", "--top", "3"],
        ["predikt", "hrnet-w18", "photo.jpg"],
        ["flops", "hrnet-w18", "--input-size", "0", "0"],
    ]
    parser = build_parser()
    verdicts = [check_argv(parser, argv) for argv in argvs]
    assert verdicts[:4] == [None] * 4
    assert verdicts[4] == "'hrnet predict' has no option --top-kay"
    assert verdicts[5] == "'hrnet predict' has no option --top"  # argparse would take the abbreviation
    assert verdicts[6] == "unknown command 'predikt'"
    assert "--input-size" in verdicts[7]  # parsed for real: the value is out of range


def test_every_command_line_in_the_docs_parses_with_the_real_cli():
    parser = build_parser()
    found = doc_commands()
    wrong = [f"{file}: {line}\n    {why}" for file, line, argv in found if (why := check_argv(parser, argv))]
    assert not wrong, "\n".join(wrong)
    used = {argv[0] for _, _, argv in found if argv}
    assert len(found) > 50 and not set(subcommands(parser)) - used, \
        f"{len(found)} command lines; commands no page shows: {sorted(set(subcommands(parser)) - used)}"


@pytest.mark.slow
def test_the_site_builds_with_mkdocs_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    warnings = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("mkdocs").addHandler(handler)
    try:
        config = load_config(str(ROOT / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
        build(config)
    except Abort as e:
        pytest.fail(f"{e}\n" + "\n".join(warnings))
    finally:
        logging.getLogger("mkdocs").removeHandler(handler)
    assert not warnings, "\n".join(warnings)
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert all(f"hrnet {name}" in cli for name in subcommands(build_parser()))  # the hook wrote every --help
    assert 'id="hrnet.create_model"' in (tmp_path / "site" / "reference" / "api" / "index.html").read_text()


def test_the_architecture_page_maps_every_part_and_module():
    """The contributors' layer map names every part of ``LAYERS`` in its order, and every module of each
    package in that package's row, so a module added without a word in the map fails here."""
    from test_structure import LAYERS, PACKAGE

    page = (ROOT / "docs" / "architecture.md").read_text()
    rows = dict(re.findall(r"^\| `([\w/]+?)/?` \| (.*) \|$", page, flags=re.M))
    assert [p for p in rows if p in LAYERS] == LAYERS, "the map's rows are not LAYERS in order"
    missing = []
    for part in LAYERS:
        folder = PACKAGE / part
        if folder.is_dir():
            missing += [f"{part}/{m.name}" for m in sorted(folder.glob("*.py"))
                        if m.name != "__init__.py" and part != "cli" and f"`{m.name}`" not in rows[part]]
    assert not missing, f"docs/architecture.md does not name: {', '.join(missing)}"
