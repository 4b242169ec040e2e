"""Dynamic batching: single images from concurrent requests become one model call.

An image waits at most ``max_wait_s`` after its arrival for others to join it (fewer when the batch
fills to ``max_batch`` first); the model then runs on its own thread, so the event loop keeps
accepting and decoding while it computes. Admission is bounded: ``max_pending`` images may be between
admission (before decoding) and their answer, and a request that would exceed it is refused at once
with :class:`Overloaded` (503) instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .protocol import RequestError


class Overloaded(RequestError):
    def __init__(self, pending: int):
        super().__init__(503, "overloaded", f"server busy: {pending} images already queued; retry shortly",
                         {"Retry-After": "1"})


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs ``run(batch) -> logits`` on gathered images and hands each caller its probability row.

    ``on_batch(size, seconds)`` is told about every model call (for metrics). Use from one event
    loop; the worker task starts with the first image, so the batcher also works inside an app
    mounted under another one (whose lifespan events never reach it).
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int, max_wait_s: float,
                 max_pending: int, on_batch: Callable[[int, float], None] | None = None):
        if max_batch < 1 or max_pending < max_batch or max_wait_s < 0:
            raise ValueError("need max_batch >= 1, max_pending >= max_batch and max_wait_s >= 0")
        self.run, self.on_batch = run, on_batch
        self.max_batch, self.max_wait_s, self.max_pending = max_batch, max_wait_s, max_pending
        self.pending = 0  # admitted images not yet answered
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="hrnet-model")
        self._waiting: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def queue_depth(self) -> int:
        """Images decoded and waiting for a model call."""
        return len(self._waiting)

    @contextmanager
    def admit(self, n: int) -> Iterator[None]:
        """Reserve room for ``n`` images for the duration of a request, or raise :class:`Overloaded`."""
        if self.pending + n > self.max_pending:
            raise Overloaded(self.pending)
        self.pending += n
        try:
            yield
        finally:
            self.pending -= n

    async def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of one preprocessed CHW image, computed in some batch."""
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="hrnet-batcher")
        item = _Item(x, asyncio.get_running_loop().create_future())
        self._waiting.append(item)
        self._arrived.set()
        return await item.future

    async def on_model_thread(self, fn: Callable, *args):
        """Run ``fn(*args)`` between batches, on the model's thread (Grad-CAM uses the same model)."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._waiting[0].arrived + self.max_wait_s
            while len(self._waiting) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            batch = [item for item in batch if not item.future.done()]  # callers that went away
            if not batch:
                continue
            try:
                probs, seconds = await loop.run_in_executor(self.model_thread, self._forward, batch)
            except Exception as e:  # answered as a 500 to each caller; the loop keeps serving
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            if self.on_batch:
                self.on_batch(len(batch), seconds)
            for item, row in zip(batch, probs):
                if not item.future.done():
                    item.future.set_result(row)

    def _forward(self, batch: list[_Item]) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        probs = self.run(torch.stack([item.x for item in batch])).float().softmax(dim=1).cpu()
        seconds = time.perf_counter() - start
        return probs, seconds

    async def close(self) -> None:
        """Stop the worker (after the server has drained) and release the model thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.model_thread.shutdown(wait=True)
