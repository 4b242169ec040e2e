"""What updates the weights: the optimizer, the learning-rate schedule and the EMA of the weights.

The learning rate follows the linear scaling rule: ``optim.lr`` is per 256 images and the run uses
``optim.lr x global batch / 256``, with a linear warm-up then a cosine decay to 0 (or a constant).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .config import Config


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """The learning rate of a run whose global batch (all processes together) is ``global_batch``."""
    return cfg.optim.lr * global_batch / 256


def build_optimizer(cfg: Config, params, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW, as ``cfg.optim`` says, at learning rate ``lr``."""
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


def lr_factor(step: int, total: int, warmup: int, scheduler: str) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to 0 or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step schedule of ``cfg.schedule`` over ``schedule.epochs x steps_per_epoch`` steps."""
    total = cfg.schedule.epochs * steps_per_epoch
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    scheduler = cfg.schedule.scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, scheduler))


class EMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for avg, cur in zip(self.module.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(cur, 1.0 - self.decay)
            else:
                avg.copy_(cur)
