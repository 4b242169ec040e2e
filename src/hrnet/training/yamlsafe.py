"""A hardened YAML reader for recipes: YAML 1.2 core scalars, bounded size, depth and aliases.

YAML is read with the YAML 1.2 core schema (``1e-3`` is a number, ``no`` and ``2024-01-01`` are
strings), only from a regular file of bounded size, and composed under a bound on depth and on
nodes counted with every alias expanded, so a hostile file fails fast with one line. Every failure
is raised as the caller's own error class (``error``), naming the source.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from ..errors import HRNetError
from ..fileio import open_regular

MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_DEPTH = 32  # the config tree is 3 levels deep
MAX_NODES = 10_000  # counted with every alias expanded: an alias bomb stops here, not at gigabytes


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's scalars and bounded composition."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream: str, source: str, error: type[HRNetError]):
        super().__init__(stream)
        self.source, self.error, self.depth, self.nodes, self.sizes = source, error, 0, 0, {}

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise self.error(f"{self.source}: more than {MAX_NODES} YAML nodes (counting what aliases expand "
                             "to); a training config is a few dozen")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = self.anchors.get(self.peek_event().anchor)
            self._count(self.sizes.get(id(node), 1))
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"{self.source}: YAML nested deeper than {MAX_DEPTH} levels")
        before = self.nodes
        self._count(1)
        node = super().compose_node(parent, index)
        self.depth -= 1
        self.sizes[id(node)] = self.nodes - before
        return node


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    try:
        return int(text, 0) if re.match(r"0[oxOX]", text) else int(text, 10)
    except ValueError:  # more digits than Python converts
        raise yaml.constructor.ConstructorError(None, None, f"integer too long ({len(text)} digits)",
                                                node.start_mark) from None


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    return float(text.replace(".inf", "inf").replace(".nan", "nan"))


for _tag, _pattern, _first in [
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
              r"|\.(?:nan|NaN|NAN))$", "-+0123456789."),
]:
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load(text: str, source: str, error: type[HRNetError]) -> Any:
    """``text`` as YAML (1.2 core schema); a bound exceeded is an ``error``, bad syntax a yaml.YAMLError."""
    loader = _Loader(text, source, error)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _tab_indented(text: str) -> int | None:
    """The number of the first line whose indentation holds a tab, if any."""
    for n, line in enumerate(text.splitlines(), 1):
        if "\t" in line[:len(line) - len(line.lstrip(" \t"))]:
            return n
    return None


def parse_yaml(text: str, source: str, error: type[HRNetError]) -> Any:
    """``text`` as YAML (1.2 core schema, bounded); every failure is a one-line ``error``. A file that
    fails because it is indented with tabs is told so with the line (PyYAML only says "found character
    '\\t' that cannot start any token")."""
    try:
        return load(text, source, error)
    except yaml.YAMLError as e:
        if (line := _tab_indented(text)) is not None:
            raise error(f"{source}:{line}: indented with a tab; YAML forbids tabs in indentation, indent "
                        "with spaces") from None
        raise error(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None


def read_yaml(path: str | os.PathLike, error: type[HRNetError]) -> Any:
    """The YAML document in ``path``: a regular file (a FIFO or device would block or never end) of at
    most ``MAX_CONFIG_BYTES``, in UTF-8."""
    with open_regular(path, error) as f:
        try:
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise error(f"{path}: cannot read config: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise error(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a training config is a few hundred "
                    "bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, str(path), error)
