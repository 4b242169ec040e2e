"""The training configuration: one frozen, typed dataclass tree, read from YAML.

Every key is checked against the tree: an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key (with the closest known key as a suggestion), so a typo never
silently falls back to a default. ``--set a.b=value`` overrides go through the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ..errors import HRNetError


class ConfigError(HRNetError):
    """A training config that names an unknown key or gives a value of the wrong type."""


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
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ValueError


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", source)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError:
            raise ConfigError(f"{source}: {prefix}{key} must be {_type_name(tp)}, got {value!r}") from None
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
    of the form ``section.key=value`` (the value is read as YAML: ``0.05``, ``true``, ``[0.5, 1]``)."""
    data: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections")
    cfg = _build(Config, data, "", source)
    merged = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _merge(merged, key.strip(), value)
        cfg = _build(Config, merged, "", f"--set {item}")
    _validate(cfg, source)
    return cfg


def _validate(cfg: Config, source: str) -> None:
    """Checks across keys that the types alone cannot express."""
    checks = [
        (cfg.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (cfg.data.input_size % 32 == 0, "data.input_size must be a multiple of 32 (HRNet's total stride)"),
        (0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1, "data.crop_scale must be 0 < min <= max <= 1"),
        (cfg.schedule.epochs >= 1, "schedule.epochs must be at least 1"),
        (cfg.optim.lr > 0, "optim.lr must be positive"),
        (cfg.output.keep_last >= 1, "output.keep_last must be at least 1"),
        (cfg.output.log_every >= 1, "output.log_every must be at least 1"),
        (cfg.train.ema_decay is None or 0 < cfg.train.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (not (cfg.model.pretrained and cfg.model.checkpoint), "set model.pretrained or model.checkpoint, not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")
