"""SyncBatchNorm for every device.

``torch.nn.SyncBatchNorm`` runs on GPUs only. :class:`SyncBatchNorm2d` computes the batch
statistics over all ranks with two differentiable all-reduces (sum, then the sum of squared
deviations), so it also works with gloo on CPU, and it gives the same result as one process
normalising the whole global batch. On CUDA the fused torch module is used instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics cover the batch of every rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean[None, :, None, None]
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` by a synchronised one, keeping its state."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        ref = next(iter(module.state_dict().values()))
        new = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats, device=ref.device, dtype=ref.dtype)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
