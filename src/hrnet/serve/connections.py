"""Connections nobody can starve: the HTTP protocol and server process ``hrnet serve`` runs under uvicorn.

uvicorn's stock h11 protocol times a connection out only *after* its first answer (``timeout_keep_alive``):
one that connects and sends nothing, or trickles its request head a byte at a time (slowloris), is held
for ever, and its ``limit_concurrency`` counts such sockets, so a few hundred idle connections turn
every real request into a 503. :class:`GuardedH11Protocol` fixes both:

- **header deadline**: a connection must deliver a complete request head within ``header_timeout``
  seconds of opening, and of its previous answer (keep-alive); otherwise it is closed. Bytes that
  arrive do not extend the deadline, so trickling does not help.
- **connection cap**: past ``max_connections`` open sockets, the connections waiting for a request
  head are closed, oldest first; a request in progress is never cut. Admission of *work* is the
  batcher's job (``--max-queue`` counts images), never the socket count.

Both values travel in uvicorn's own config fields (``timeout_keep_alive`` and ``limit_concurrency``),
so ``--workers`` processes, which rebuild the config from an import string, get them too.
:class:`DrainingServer` makes SIGINT and SIGHUP drain exactly like SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors.multiprocess import Multiprocess

from .memory import limit_arenas

DRAIN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each one stops the server the same way: stop accepting, answer every accepted request, exit 0."""


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and idle-first eviction (see the module)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_connections = self.limit_concurrency
        self.limit_concurrency = None  # uvicorn's check answers 503 by socket count: admission is not ours here
        self.header_timeout = config.timeout_keep_alive
        self.header_deadline: asyncio.TimerHandle | None = None
        if not hasattr(server_state, "hrnet_waiting"):
            server_state.hrnet_waiting = {}  # connections waiting for a request head, oldest first
        self.waiting: dict[GuardedH11Protocol, None] = server_state.hrnet_waiting

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._wait_for_head()
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            for idle in list(self.waiting)[: len(self.connections) - self.max_connections]:
                idle._close_idle()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a complete request head arrived
            self._stop_waiting()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request behind it
            self._wait_for_head()

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self.waiting[self] = None
        self.header_deadline = self.loop.call_later(self.header_timeout, self._close_idle)

    def _stop_waiting(self) -> None:
        self.waiting.pop(self, None)
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _close_idle(self) -> None:
        """Close a connection that has no request in progress (deadline passed, or evicted)."""
        self._stop_waiting()
        if not self.transport.is_closing():
            if self.conn.our_state in (h11.IDLE, h11.DONE):
                with contextlib.suppress(h11.LocalProtocolError):
                    self.conn.send(h11.ConnectionClosed())
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains on SIGINT, SIGTERM and SIGHUP alike and then returns (exit 0).

    uvicorn handles only SIGINT and SIGTERM and, once drained, raises the signal again under the
    previous handler (a KeyboardInterrupt for SIGINT); SIGHUP kills it with requests in flight. A
    second SIGINT still forces the exit, as in uvicorn.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in DRAIN_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class DrainingMultiprocess(Multiprocess):
    """uvicorn's ``--workers`` supervisor, with SIGHUP stopping it like SIGTERM (uvicorn restarts the
    workers instead). The workers ignore SIGHUP (a terminal hang-up reaches the whole process group):
    the supervisor stops them with SIGTERM, which each drains."""

    def handle_hup(self) -> None:
        self.handle_term()


def run(app, **options) -> bool:
    """Serve ``app`` (an ASGI app, or an import string with ``workers``) with :class:`GuardedH11Protocol`
    and the draining signal handling; returns once drained: False if it never started (port taken)."""
    # the event loop waits at most this long for the interpreter while a worker thread parses a body
    # (Python's default is 5 ms)
    sys.setswitchinterval(0.001)
    limit_arenas()
    config = uvicorn.Config(app, http="hrnet.serve.connections:GuardedH11Protocol", **options)
    if config.workers > 1:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited by the spawned workers
        sock = config.bind_socket()
        DrainingMultiprocess(config, sockets=[sock]).run()
        return True
    server = DrainingServer(config)
    server.run()
    return server.started
