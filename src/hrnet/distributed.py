"""torchrun plumbing shared by evaluation, prediction and training, with bounded waits.

A process started by ``torchrun`` finds RANK/WORLD_SIZE/LOCAL_RANK in its environment; anything
else runs as a single process. NCCL on GPUs, gloo on CPU.

Every wait on the other ranks is bounded: joining the process group and every collective give up
after ``timeout_s`` (the argument of :func:`init_distributed`, else ``HRNET_COLLECTIVE_TIMEOUT_S``,
else :data:`DEFAULT_TIMEOUT_S`) instead of PyTorch's 10-30 minutes. A failed wait is a one-line
:class:`CollectiveError` naming the rank that stopped answering: each rank beats a counter in the
rendezvous store once a second from a thread, which stops when the process dies or is stopped, so
the ranks whose counters stand still are the ones to blame.

Every key a round writes lives under a prefix of its own (:func:`_round_prefix`): torchrun's agent
keeps one store server for all its restarts, and without the prefix a restarted rank can read a dead
peer's gloo address from the round before and fail to connect.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import HRNetError

DEFAULT_TIMEOUT_S = 30.0
TIMEOUT_ENV = "HRNET_COLLECTIVE_TIMEOUT_S"
BEAT_S = 1.0  # heartbeat period; a rank is blamed when its counter stands still for 2.5 beats


class CollectiveError(HRNetError):
    """Another rank died or hung: a wait on it ran past the collective timeout or its connection broke."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class DeviceError(HRNetError):
    """A device this machine cannot run: not cpu/cuda/cuda:N, no CUDA GPU, or no GPU of that index."""


def device_syntax(text: str) -> str | None:
    """The one-line reason ``text`` is not ``cpu``, ``cuda`` or ``cuda:N``; None when it is one."""
    if re.fullmatch(r"cpu|cuda(:[0-9]{1,3})?", text):
        return None
    return f"not a device: use cpu, cuda or cuda:N (got {text[:40]!r})"


def check_device(device: str | None, option: str = "--device") -> str:
    """``device`` (default: :func:`default_device`) once this machine is known to run it, else a
    one-line :class:`DeviceError` naming ``option`` and the device: the one check every command makes
    before it builds anything on a device, so ``--device cuda`` without a GPU is never a traceback."""
    if device is None:
        return default_device()
    flag = option.startswith("-")
    where, cpu = (f"{option} {device}", f"{option} cpu") if flag else (f"{option}={device}", f"{option}=cpu")
    if (problem := device_syntax(device)) is not None:
        raise DeviceError(f"{where}: {problem}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{where}: no CUDA GPU is available here (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}); use {cpu}")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"{where}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def collective_timeout(timeout_s: float | None = None) -> float:
    """Seconds a collective may wait: ``timeout_s``, else ``$HRNET_COLLECTIVE_TIMEOUT_S``, else the default."""
    if timeout_s is not None:
        return float(timeout_s)
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise CollectiveError(f"{TIMEOUT_ENV}={text[:40]}: expected seconds, a positive number up to 86400")
    return value


class _State:
    timeout_s = DEFAULT_TIMEOUT_S
    knob = f"${TIMEOUT_ENV}"  # where the user sets the timeout, for the error message
    beat: _Heartbeat | None = None
    broken = False  # a collective failed: the group cannot be torn down cleanly any more


class _Heartbeat(threading.Thread):
    """Adds 1 to this rank's counter in the store every :data:`BEAT_S` seconds."""

    def __init__(self, store, rank: int, world_size: int):
        super().__init__(name="hrnet-heartbeat", daemon=True)
        self.store, self.rank, self.world_size, self.prefix = store, rank, world_size, "hrnet/beat/"
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self.store.set(f"{self.prefix}pid/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        except Exception:
            return
        while not self.stop.is_set():
            try:
                self.store.add(f"{self.prefix}{self.rank}", 1)
            except Exception:  # the store is gone: the job is ending anyway
                return
            self.stop.wait(BEAT_S)

    def counts(self) -> list[int]:
        """Every rank's counter now (raises when the store is gone)."""
        return [int(self.store.add(f"{self.prefix}{r}", 0)) for r in range(self.world_size)]

    def silent_ranks(self) -> list[int] | None:
        """The other ranks whose counters did not move for 2.5 beats (None: the store cannot say)."""
        try:
            before = self.counts()
            time.sleep(2.5 * BEAT_S)
            after = self.counts()
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and before[r] == after[r]]

    def end_local(self, ranks: list[int]) -> list[int]:
        """SIGKILL those of ``ranks`` that run on this host (a stopped process ignores torchrun's SIGTERM
        for its whole shutdown grace); returns the ones killed."""
        killed = []
        for r in ranks:
            try:
                host, pid = self.store.get(f"{self.prefix}pid/{r}").decode().split()
                if host == socket.gethostname():
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(r)
            except Exception:
                pass
        return killed


def init_distributed(device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun set up (idempotent: the first call's timeout holds); a plain
    single process otherwise. Joining is bounded by the collective timeout too: a rank that never
    arrives is a :class:`CollectiveError`, not a hang. ``device`` is checked first (:func:`check_device`);
    under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``, one GPU per process, with NCCL."""
    device = check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        _State.timeout_s = collective_timeout(timeout_s)
        if timeout_s is not None:
            _State.knob = f"train.collective_timeout_s or ${TIMEOUT_ENV}"
        timeout = timedelta(seconds=_State.timeout_s)
        with guard("joining the process group"):
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(_round_prefix(world_size), store)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout,
                                    store=store, rank=rank, world_size=world_size)
        _State.beat = _Heartbeat(store, rank, world_size)
        _State.beat.start()
    return DistInfo(rank, world_size, local_rank, device)


def _round_prefix(world_size: int) -> str:
    """The store prefix of this round of the job: torchrun's restart count (a failure) and the world
    size (a membership change, which restarts without counting)."""
    return f"hrnet/round/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{world_size}/"


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return any(s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset",
                                   "NCCL", "Gloo", "gloo", "ProcessGroup", "Broken pipe"))


@contextmanager
def guard(what: str) -> Iterator[None]:
    """Turn a collective's timeout or broken connection inside the block into a one-line
    :class:`CollectiveError` naming the rank(s) that stopped answering (other errors pass through)."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:
        if not _is_collective_failure(e):
            raise
        silent = _State.beat.silent_ranks() if _State.beat else None
        if silent:
            who = None
        elif silent is None:
            who = "another rank stopped answering or broke its connection"
        else:
            who = "every rank is alive, one is slower than the timeout"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise _failed(what, silent, who, f" ({first})") from None


def _failed(what: str, silent: list[int] | None, who: str | None, cause: str = "") -> CollectiveError:
    """The one-line error of a failed wait; the ``silent`` ranks on this host are killed (a stopped process
    ignores torchrun's SIGTERM for its whole shutdown grace) and the group is marked broken."""
    _State.broken = True
    if silent:
        killed = _State.beat.end_local(silent) if _State.beat else []
        who = ", ".join(f"rank {r}" for r in silent) + " stopped answering (died or hung)" + \
            (f"; ended {', '.join(f'rank {r}' for r in killed)} on this host" if killed else "")
    me = int(os.environ.get("RANK", "0"))
    return CollectiveError(f"rank {me}: {what} failed after at most {_State.timeout_s:g} s: {who}; the job "
                           f"stops{cause}; the wait is {_State.knob}")


def wait_for_ranks(pending: Callable[[], list[int]], what: str, poll_s: float = 0.2) -> None:
    """Wait until ``pending()``, the ranks that have not yet done something (say, written a file), is
    empty: however long a live rank takes (a slower machine is no failure), but a pending rank whose
    heartbeat stands still for the collective timeout is a :class:`CollectiveError` naming it."""
    beat, seen = _State.beat, {}  # rank -> (its counter, when it last moved)
    while ranks := pending():
        if beat is not None:
            try:
                counts = beat.counts()
            except Exception:
                raise _failed(what, None, "the rendezvous store is gone (the job is ending)") from None
            now = time.monotonic()
            for r in ranks:
                if seen.get(r, (None,))[0] != counts[r]:
                    seen[r] = (counts[r], now)
            if silent := [r for r in ranks if now - seen[r][1] >= _State.timeout_s]:
                raise _failed(what, silent, None)
        time.sleep(poll_s)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks in place (a no-op in a single process)."""
    if _active():
        with guard("summing over the ranks"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    with guard("gathering from the ranks"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process)."""
    if not _active():
        return obj
    box = [obj]
    with guard("receiving rank 0's decision"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _active():
        with guard("waiting for every rank"):
            dist.barrier()


def cleanup() -> None:
    """Leave the process group (skipped after a failed collective: tearing down would wait on the dead)."""
    if _State.beat is not None:
        _State.beat.stop.set()
        _State.beat = None
    if _active() and not _State.broken:
        dist.destroy_process_group()
