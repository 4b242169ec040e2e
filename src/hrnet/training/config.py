"""The training configuration: one frozen, typed dataclass tree, read from YAML.

Every key is checked against the tree: an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key (with the closest known key as a suggestion), so a typo never
silently falls back to a default. ``--set a.b=value`` overrides go through the same checks.

YAML is read with the YAML 1.2 core schema (``1e-3`` is a number, ``no`` and ``2024-01-01`` are
strings), only from a regular file of bounded size, and composed under a bound on depth and on
nodes counted with every alias expanded, so a hostile file fails fast with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..errors import HRNetError
from ..fileio import open_regular


class ConfigError(HRNetError):
    """A training config that names an unknown key or gives a value of the wrong type."""


MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few hundred bytes
MAX_DEPTH = 32  # the config tree is 3 levels deep
MAX_NODES = 10_000  # counted with every alias expanded: an alias bomb stops here, not at gigabytes

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 3


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's scalars and bounded composition."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source, self.depth, self.nodes, self.sizes = source, 0, 0, {}

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise ConfigError(f"{self.source}: more than {MAX_NODES} YAML nodes (counting what aliases expand "
                              "to); a training config is a few dozen")

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = self.anchors.get(self.peek_event().anchor)
            self._count(self.sizes.get(id(node), 1))
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ConfigError(f"{self.source}: YAML nested deeper than {MAX_DEPTH} levels")
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


def _load(text: str, source: str) -> Any:
    """``text`` as YAML (1.2 core schema); a bound exceeded is a :class:`ConfigError`, bad syntax a YAMLError."""
    loader = _Loader(text, source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> Any:
    """``text`` as YAML (1.2 core schema, bounded); every failure is a one-line :class:`ConfigError`."""
    try:
        return _load(text, source)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path``: a regular file (a FIFO or device would block or never end) of at
    most ``MAX_CONFIG_BYTES``, in UTF-8."""
    with open_regular(path, ConfigError) as f:
        try:
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a training config is a few hundred "
                          "bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, str(path))


@dataclass(frozen=True)
class ModelConfig:
    name: str = "hrnet-w18"
    pretrained: bool = False  # start from the zoo record's published weights
    checkpoint: str | None = None  # or from this file (any format create_model reads)
    num_classes: int | None = None  # None: the number of classes of the training set
    drop_rate: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # an ImageNet wnid tree, any class-per-folder tree, or the root of train_ann
    train_ann: str | None = None  # "relative/path label" lines (mmcls format)
    val: str | None = None
    val_ann: str | None = None
    prepare: str | None = None  # the command that writes data.train/data.val, named when they are missing
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: bool = True
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    workers: int = 4


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # per 256 images: the run uses lr x global batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 100
    warmup_epochs: float = 0.0  # linear warm-up from 0, then cosine to 0
    scheduler: Literal["cosine", "constant"] = "cosine"


@dataclass(frozen=True)
class TrainOptions:
    seed: int = 0
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    sync_bn: bool = False
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None
    ema_decay: float | None = None  # e.g. 0.9998; the EMA weights are then validated and exported
    on_nonfinite: Literal["stop", "skip"] = "stop"
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume on CPU
    device: str | None = None  # default: cuda if available


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/hrnet"
    log_every: int = 50  # steps between JSON log lines
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at the end of each epoch only)
    keep_last: int = 3


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainOptions = field(default_factory=TrainOptions)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list [" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise ValueError. YAML already typed it; ints pass as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except ValueError:
                pass
        raise ValueError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if tp is type(None) and value is None:
        return None
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ValueError


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {_short.repr(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            key = str(key)[:60]
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", source)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError:
            what = "finite" if isinstance(value, float) and not math.isfinite(value) else _type_name(tp)
            raise ConfigError(f"{source}: {prefix}{key} must be {what}, got {_short.repr(value)}") from None
    return cls(**kwargs)


def _merge(base: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = base
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
        node = child
    node[leaf] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """The config in YAML file ``path`` (defaults for every key it leaves out), then ``overrides``
    of the form ``section.key=value`` (the value is read as YAML 1.2: ``1e-3``, ``true``, ``[0.5, 1]``;
    anything else, e.g. ``no`` or ``runs/2024-01-01``, is a string)."""
    data: Any = {}
    source = "config"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections")
    cfg = _build(Config, data, "", source)
    merged = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item[:80]}: expected section.key=value")
        source = f"--set {item[:80]}"
        try:
            value = _load(text, source)
        except yaml.YAMLError:  # not YAML at all: the text itself (a bound exceeded still raises)
            value = text
        _merge(merged, key.strip(), value)
        cfg = _build(Config, merged, "", source)
    _validate(cfg, source)
    return cfg


def _validate(cfg: Config, source: str) -> None:
    """Ranges, and checks across keys that the types alone cannot express."""
    d, o, s, t, out, m = cfg.data, cfg.optim, cfg.schedule, cfg.train, cfg.output, cfg.model
    checks = [
        (m.num_classes is None or m.num_classes >= 1, "model.num_classes must be at least 1 (or null: the "
                                                      "number of class folders)"),
        (0 <= m.drop_rate < 1, "model.drop_rate must be in [0, 1)"),
        (d.batch_size >= 1, "data.batch_size must be at least 1"),
        (d.workers >= 0, "data.workers must be 0 (load in the training process) or more"),
        (32 <= d.input_size <= 4096 and d.input_size % 32 == 0,
         "data.input_size must be a multiple of 32 (HRNet's total stride) from 32 to 4096"),
        (0 < d.crop_scale[0] <= d.crop_scale[1] <= 1, "data.crop_scale must be 0 < min <= max <= 1"),
        (o.lr > 0, "optim.lr must be positive"),
        (o.lr <= 1000, "optim.lr must be at most 1000 (per 256 images; typical values are 0.001 to 1)"),
        (0 <= o.momentum < 1, "optim.momentum must be in [0, 1)"),
        (0 <= o.weight_decay <= 1, "optim.weight_decay must be in [0, 1]"),
        (not o.nesterov or (o.name == "sgd" and o.momentum > 0), "optim.nesterov needs sgd with momentum > 0"),
        (s.epochs >= 1, "schedule.epochs must be at least 1"),
        (s.warmup_epochs >= 0, "schedule.warmup_epochs must be 0 or more"),
        (0 <= t.seed < 2**31, "train.seed must be in [0, 2^31)"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm must be positive (or null)"),
        (t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
        (out.keep_last >= 1, "output.keep_last must be at least 1"),
        (out.log_every >= 1, "output.log_every must be at least 1"),
        (out.checkpoint_every >= 0, "output.checkpoint_every must be 0 (end of each epoch) or more"),
        (bool(out.dir), "output.dir must name a folder"),
        (not (m.pretrained and m.checkpoint),
         "set model.pretrained or model.checkpoint, not both (hrnet train --checkpoint PATH turns pretrained off)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def with_checkpoint(cfg: Config, checkpoint: str | os.PathLike) -> Config:
    """``cfg`` starting from the weights file ``checkpoint`` instead of the published weights
    (``hrnet train --checkpoint``): sets ``model.checkpoint`` and clears ``model.pretrained``."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=os.fspath(checkpoint),
                                                              pretrained=False))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (lists become tuples, so values compare like the config's)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out
