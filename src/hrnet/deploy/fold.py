"""The inference model: the same HRNet, with every BatchNorm folded into the convolution before it.

In eval mode ``bn(conv(x))`` is an affine function of the conv's output, so it folds into the conv's
weights and bias (computed in float64, then cast back) and the BatchNorm becomes an ``Identity``.
The result is the same module tree with the same forward pass: an architecture change is made once,
and the folded model's logits equal the eager model's up to float rounding. Stored channels_last,
the layout oneDNN's CPU convolutions prefer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to ``bn(conv(x))`` in eval mode (folded in float64, then cast back)."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                              device=w.device)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, device=w.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(w * scale[:, None, None, None])
        fused.bias.copy_((b - bn.running_mean.double()) * scale + bn.bias.detach().double())
    return fused


def fold_batchnorms(module: nn.Module) -> int:
    """Fold, in place, every BatchNorm2d that directly follows a Conv2d among a module's children
    (how HRNet registers each ``conv -> bn`` pair: ``conv1, bn1``, ``Sequential(conv, bn, ...)``);
    returns how many were folded."""
    folded = 0
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fold_bn(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


def is_folded(model: nn.Module) -> bool:
    return getattr(model, "folded", False)


def fuse_model(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """The inference-optimised copy of ``model`` (left untouched): BatchNorm folded, eval mode,
    no gradients. ``channels_last`` stores the conv weights NHWC; feed it NHWC inputs too
    (``x.contiguous(memory_format=torch.channels_last)``). A folded model is copied as it is."""
    fused = copy.deepcopy(model).eval().requires_grad_(False)
    if not is_folded(fused):
        fold_batchnorms(fused)
        fused.folded = True
    return fused.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
