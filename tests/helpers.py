"""Shared test helpers: models with weights that expose mapping mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, non-zero conv/Linear biases; eval mode.

    A fresh model has BN mean 0 / var 1, which a wrong key map or BN fold would reproduce unnoticed.
    The last BN of each residual branch is damped so activations stay O(1) through W64's depth.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_((torch.rand(n, generator=g) + 0.5) * (0.2 if name.endswith(("bn2", "bn3")) else 1))
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference value."""
    return ((got - want).abs().max() / want.abs().max()).item()


def run_limited(code: str, *args: str, extra_bytes: int = 1 << 30, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``sys.argv[1:] == args``) in a fresh interpreter that has imported torch and
    hrnet, its address space capped at what those imports took plus ``extra_bytes``.

    A memory regression then fails as a MemoryError in the child instead of taking the machine down,
    and a hang raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds (the child is killed).
    """
    prelude = textwrap.dedent(f"""
        import resource, sys, torch, hrnet
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + {extra_bytes}, vm + {extra_bytes}))
    """)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
