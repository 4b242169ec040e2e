"""Shared test helpers: models with weights that expose mapping mistakes."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
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


class Server:
    """Serves ``files`` (path -> bytes) on 127.0.0.1; paths under /drop/ send half the body, then close.

    ``handlers`` (path -> function of the request handler) answer a path themselves: a misbehaving server.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.handlers: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = {}
        self.requests: list[str] = []
        self.delay = 0.0  # seconds between the headers and the body
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.handlers:
                    server.handlers[self.path](self)
                    self.close_connection = True
                    return
                body = server.files.get(self.path.removeprefix("/drop"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                time.sleep(server.delay)
                self.wfile.write(body[: len(body) // 2] if self.path.startswith("/drop/") else body)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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


def torchrun_argv(*args: str, restarts: int = 0) -> list[str]:
    """``torchrun`` on two local processes (``--standalone``) running ``args``, e.g. ``"-m", "hrnet", ...``;
    a failed job's workers get 5 s to stop, not torchrun's 30."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "--shutdown-timeout", "5", *args]


def _workers(parent: int) -> Iterator[tuple[int, list[bytes]]]:
    """(pid, environment) of every child process of ``parent``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            yield int(entry.name), env


def worker_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker (a child of ``parent``) whose RANK is ``rank``."""
    for pid, env in _workers(parent):
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def stop_rank_and_expect_one_line(proc: subprocess.Popen, rank: int, timeout_s: float) -> str:
    """SIGSTOP torchrun worker ``rank`` of ``proc``; the job must then fail within the collective timeout
    plus 20 s (2.5 s to name the rank, torchrun's 5 s grace, a busy machine) with exactly one
    ``hrnet: error:`` line naming the rank. Returns the job's output."""
    os.kill(worker_pid(proc.pid, rank), signal.SIGSTOP)
    stopped_at = time.time()
    try:
        out, _ = proc.communicate(timeout=timeout_s + 120)
    finally:
        if proc.poll() is None:  # a hang: leave no process behind
            for pid, _ in _workers(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
    took = time.time() - stopped_at
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("hrnet: error:")]
    assert len(errors) == 1 and f"rank {rank} stopped answering" in errors[0], out[-3000:]
    assert took < timeout_s + 20, took
    return out
