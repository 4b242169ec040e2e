"""The training configuration: one frozen, typed dataclass tree, read from YAML.

Every key is checked against the tree: an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the key (with the closest known key as a suggestion), so a typo never
silently falls back to a default. ``--set a.b=value`` overrides go through the same checks.

The YAML itself is read by :mod:`hrnet.training.yamlsafe` (YAML 1.2 core schema, bounded).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import HRNetError
from ..fileio import display_path
from . import yamlsafe
from .recipes import resolve_recipe


class ConfigError(HRNetError):
    """A training config that names an unknown key or gives a value of the wrong type."""


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 3


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
    # without data.val: the fraction of each class of data.train held out for validation (0: none), split
    # reproducibly by train.seed and written to RUN_DIR/split.json, which a resumed run reads back
    val_fraction: float = 0.0
    prepare: str | None = None  # the command that writes data.train/data.val, named when they are missing
    input_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    hflip: bool = True
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    workers: int | Literal["auto"] = "auto"  # loader processes; auto: hrnet.data.default_workers


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
    # seconds any collective (and joining the process group) may wait for the other ranks before the job
    # stops naming the rank that did not answer; longer than the slowest checkpoint write rank 0 makes
    collective_timeout_s: float = 30.0


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
    """Set ``key`` (dotted) in ``base`` to ``value``; a mapping given for a section is merged into it
    key by key (as OmegaConf merges), so ``optim={lr: 0.5}`` keeps the section's other keys."""
    *parents, leaf = key.split(".")
    node = base
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            _merge(node[leaf], str(k), v)
    else:
        node[leaf] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """The config in YAML file ``path`` (defaults for every key it leaves out), then ``overrides``
    of the form ``section.key=value`` (the value is read as YAML 1.2: ``1e-3``, ``true``, ``[0.5, 1]``;
    anything else, e.g. ``no`` or ``runs/2024-01-01``, is a string)."""
    data: Any = {}
    source = "config"
    if path is not None:
        path = resolve_recipe(path)  # a packaged recipe's name, or a file
        source = str(path)
        data = yamlsafe.read_yaml(path, ConfigError)
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
            value = yamlsafe.load(text, source, ConfigError)
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
        (d.workers == "auto" or d.workers >= 0,
         "data.workers must be auto, 0 (load in the training process) or more"),
        (0 <= d.val_fraction < 1, "data.val_fraction must be in [0, 1) (0: no validation split)"),
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
        (0 < t.collective_timeout_s <= 86400, "train.collective_timeout_s must be positive (seconds, at most a day)"),
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


# Keys a resumed run may change: none alters what the steps already taken compute. Changes are logged.
RESUMABLE = ("schedule.epochs", "data.workers", "data.val", "data.val_ann", "data.prepare", "train.device",
             "train.collective_timeout_s", "output.dir", "output.log_every", "output.checkpoint_every",
             "output.keep_last")
RESUMABLE_TEXT = "schedule.epochs, data.workers, data.val(_ann), train.device, train.collective_timeout_s and output.*"


def with_checkpoint(cfg: Config, checkpoint: str | os.PathLike, *, name: str | None = None,
                    input_size: int | None = None) -> Config:
    """``cfg`` starting from the weights file ``checkpoint`` instead of the published weights
    (``hrnet train --checkpoint``): sets ``model.checkpoint`` and clears ``model.pretrained``; ``name``
    and ``input_size`` (what the file says, see :func:`hrnet.training.train.checkpoint_facts`) replace
    ``model.name`` and ``data.input_size``."""
    model = dataclasses.replace(cfg.model, checkpoint=os.fspath(checkpoint), pretrained=False,
                                **({"name": name} if name else {}))
    data = dataclasses.replace(cfg.data, **({"input_size": input_size} if input_size else {}))
    out = dataclasses.replace(cfg, model=model, data=data)
    _validate(out, f"--checkpoint {checkpoint}")
    return out


#: ``--data DIR`` of a single folder of class folders holds out this much of each class by default.
DEFAULT_VAL_FRACTION = 0.15


def with_data(cfg: Config, folder: str | os.PathLike, val_fraction: float | None = None) -> Config:
    """``cfg`` training on ``folder`` (``hrnet train --data``): ``DIR/train`` (and ``DIR/val`` if there),
    else ``DIR`` itself, a folder of class folders. Without a val folder, ``val_fraction`` (default: the
    recipe's ``data.val_fraction``, else :data:`DEFAULT_VAL_FRACTION`) of each class is held out."""
    root = Path(folder)
    where = f"--data {display_path(root)}"
    if not root.is_dir():
        raise ConfigError(f"{where}: folder not found (a folder of class folders, or one with train/ and val/)")
    train, val = (root / "train", root / "val") if (root / "train").is_dir() else (root, None)
    if val is not None and not val.is_dir():
        val = None
    if val is not None and val_fraction is not None:
        raise ConfigError(f"{where}: has a val/ folder, so nothing is split off; drop --val-fraction or the val/ folder")
    fraction = val_fraction if val_fraction is not None else (cfg.data.val_fraction or DEFAULT_VAL_FRACTION)
    data = dataclasses.replace(cfg.data, train=str(train), val=str(val) if val else None, train_ann=None,
                               val_ann=None, prepare=None, val_fraction=0.0 if val else fraction)
    out = dataclasses.replace(cfg, data=data)
    _validate(out, where)
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (lists become tuples, so values compare like the config's)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out
