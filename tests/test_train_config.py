"""The training config: typed, strict about keys, overridable; the shipped recipes are the documented ones."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hrnet.models import resolve
from hrnet.training.config import Config, ConfigError, load_config
from hrnet.training.optim import lr_factor

SEED_WIDTHS = (18, 30, 32, 40, 44, 48, 64)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_values_are_typed_and_defaults_fill_the_rest(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\ndata:\n  crop_scale: [0.5, 1]\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.optim.momentum == Config().optim.momentum


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown key 'optim\.lrr'; did you mean 'optim\.lr'\?"):
        load_config(write(tmp_path, "optim:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'shedule'; did you mean 'schedule'"):
        load_config(write(tmp_path, "shedule:\n  epochs: 3\n"))


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: fast\n", "optim.lr must be a number, got 'fast'"),
    ("schedule:\n  epochs: 2.5\n", "schedule.epochs must be an integer, got 2.5"),
    ("train:\n  amp: fp8\n", "train.amp must be one of 'none', 'bf16', 'fp16', got 'fp8'"),
    ("data:\n  hflip: 1\n", "data.hflip must be true/false, got 1"),
    ("data:\n  crop_scale: [0.5]\n", "data.crop_scale must be a list"),
    ("data: 3\n", "data must be a mapping"),
])
def test_mistyped_value_is_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_set_overrides_are_checked_like_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.1\n")
    cfg = load_config(path, ["optim.lr=0.05", "train.ema_decay=0.999", "data.crop_scale=[0.3, 1]",
                             "model.checkpoint=w.safetensors"])
    assert (cfg.optim.lr, cfg.train.ema_decay, cfg.data.crop_scale) == (0.05, 0.999, (0.3, 1.0))
    assert cfg.model.checkpoint == "w.safetensors"
    assert load_config(path, ["train.clip_grad_norm=null"]).train.clip_grad_norm is None
    with pytest.raises(ConfigError, match=r"--set optim\.momentun=0\.8: unknown key 'optim\.momentun'; "
                                          r"did you mean 'optim\.momentum'"):
        load_config(path, ["optim.momentun=0.8"])
    with pytest.raises(ConfigError, match=r"--set data\.batch_size=big: data\.batch_size must be an integer"):
        load_config(path, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["optim.lr"])


def test_inconsistent_values_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config(None, ["data.input_size=100"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["model.pretrained=true", "model.checkpoint=x.pth"])


@pytest.mark.parametrize("width", SEED_WIDTHS)
def test_imagenet_recipe_is_the_mmcls_one_for_every_width(width):
    cfg = load_config("imagenet", [f"model.name=hrnet-w{width}"])
    assert cfg.model.name == f"hrnet-w{width}" and not cfg.model.pretrained
    assert resolve(cfg.model.name).name == f"hrnet-w{width}"  # a zoo record, not just a string
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (cfg.schedule.epochs, cfg.schedule.scheduler, cfg.schedule.warmup_epochs) == (100, "cosine", 0.0)
    assert (cfg.data.input_size, cfg.data.crop_scale, cfg.data.hflip) == (224, (0.08, 1.0), True)
    assert cfg.data.batch_size * 8 == 256  # 8 x 32 images: the lr applies unscaled on 8 GPUs


def test_finetune_and_digits_recipes_load():
    ft = load_config("finetune")
    assert ft.model.pretrained and ft.model.num_classes is None
    assert ft.optim.lr < load_config("imagenet").optim.lr and ft.schedule.epochs < 100
    digits = load_config("digits")
    assert digits.model.name == "hrnet-w18-small" and not digits.data.hflip


def test_lr_schedule_is_linear_warmup_then_cosine():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, total, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, "cosine") == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(40, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert lr_factor(50, total, 0, "constant") == 1.0


def test_set_of_a_mapping_merges_into_the_section_key_by_key(tmp_path):
    """Issue 22 §4: ``optim={lr: 0.5}`` used to replace the whole section (momentum and weight decay gone)."""
    path = write(tmp_path, "optim:\n  lr: 0.1\n  momentum: 0.8\n  weight_decay: 0.01\n")
    cfg = load_config(path, ["optim={lr: 0.5}"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.5, 0.8, 0.01)
    cfg = load_config(path, ["train={ema_decay: 0.99, seed: 3}", "optim={name: adamw}"])
    assert (cfg.train.ema_decay, cfg.train.seed, cfg.optim.name, cfg.optim.momentum) == (0.99, 3, "adamw", 0.8)
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'"):
        load_config(path, ["optim={lrr: 0.5}"])


def test_a_recipe_indented_with_tabs_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  name: hrnet-w18\noptim:\n\tlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml:4: indented with a tab; YAML forbids tabs"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"not valid YAML") as e:  # broken otherwise: no word about tabs
        load_config(write(tmp_path, "optim:\n  lr: [0.1\n"))
    assert "tab" not in str(e.value)
