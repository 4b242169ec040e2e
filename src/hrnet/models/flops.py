"""Parameter and FLOP counts with the mmcls counter's rules, so the seed's figures reproduce exactly.

The convention (that of mmcv's ``get_model_complexity_info``, which produced the published table):
per module call, a conv costs k_h*k_w*C_in/groups*C_out per output position (+C_out with a bias),
BatchNorm 2 per input element, a ReLU or Upsample module 1 per output element, pooling 1 per
input element, Linear in*out; element-wise additions are free. A conv is thus counted in
multiply-accumulates: "FLOPs" here are what the seed and mmcls call FLOPs, not 2x MACs.
Counted over the feature extractor: from the stem to the pooled feature vector, classifier excluded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UsageError
from .hrnet import GlobalAvgPool, HRNet


def _conv(m: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor) -> int:
    positions = out.numel() // out.shape[1]
    kh, kw = m.kernel_size
    per_position = kh * kw * (m.in_channels // m.groups) * m.out_channels
    return positions * (per_position + (m.out_channels if m.bias is not None else 0))


_RULES: dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor], int]] = {
    nn.Conv2d: _conv,
    nn.BatchNorm2d: lambda m, i, o: 2 * i.numel() if m.affine else i.numel(),
    nn.ReLU: lambda m, i, o: o.numel(),
    nn.Upsample: lambda m, i, o: o.numel(),
    GlobalAvgPool: lambda m, i, o: i.numel(),
    nn.AdaptiveAvgPool2d: lambda m, i, o: i.numel(),
    nn.Linear: lambda m, i, o: (o.numel() // o.shape[-1]) * m.in_features * m.out_features,
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_size: tuple[int, int] = (224, 224), in_chans: int = 3) -> int:
    """FLOPs of one image of ``input_size`` (H, W) through the feature extractor (see module doc).

    Each side must be a positive integer (UsageError otherwise, before anything runs)."""
    if len(input_size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size):
        raise UsageError(f"input size must be two positive integers (H, W), got {repr(input_size):.60}")
    total = 0

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += _RULES[type(m)](m, args[0], out)

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in _RULES]
    was_training = model.training
    try:
        model.eval()
        x = torch.zeros(1, in_chans, *input_size, device=next(model.parameters()).device)
        if isinstance(model, HRNet):  # the classifier: up to the pooled features, not the Linear layer
            model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
