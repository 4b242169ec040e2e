"""``hrnet serve`` under attack (issue 22 §3), against the real server as a subprocess on 127.0.0.1.

Idle and slowloris connections must not starve real requests; hostile JSON gets a 400 naming the limit
and large bodies do not stall the event loop; SIGINT and SIGHUP drain like SIGTERM; a client that hangs
up mid-upload is counted as a client disconnect. Every loop here is bounded in count and time.
"""

from __future__ import annotations

import json
import resource
import signal
import socket
import threading
import time

import numpy as np
import pytest

from test_predict import CROP, MODEL, model_and_photos
from test_serve import start_server

pytest.importorskip("uvicorn", reason="hrnet[serve] is not installed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    _, ckpt, photos, _ = model_and_photos(d)
    return {"dir": d, "ckpt": ckpt, "photo": photos[0].read_bytes()}


def _open_files(n: int) -> None:
    """Room for ``n`` sockets in this process (and the server it starts, which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _metrics(server) -> dict[str, float]:
    out = {}
    for line in server.request("GET", "/metrics")[2].decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


class Attacker:
    """Holds ``idle`` silent connections and ``slow`` slowloris ones (a request head trickled one header
    line every 0.3 s, never finished) open, reopening each one the server closes, until stopped."""

    def __init__(self, port: int, idle: int, slow: int):
        self.port, self.idle, self.slow = port, idle, slow
        self.stop = threading.Event()
        self.reopened = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def connect(self, slow: bool) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            s.setblocking(False)
            if slow:
                s.send(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")
            return s
        except OSError:
            return None

    def alive(self, s: socket.socket) -> bool:
        try:
            return s.recv(1) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def run(self) -> None:
        socks = [[self.connect(False), False] for _ in range(self.idle)]
        socks += [[self.connect(True), True] for _ in range(self.slow)]
        while not self.stop.wait(0.3):
            for pair in socks:
                s, slow = pair
                if s is None or not self.alive(s):
                    if s is not None:
                        s.close()
                    pair[0] = self.connect(slow)
                    self.reopened += 1
                elif slow:
                    try:
                        s.send(b"X-a: b\r\n")
                    except OSError:
                        pass
        for s, _ in socks:
            if s is not None:
                s.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def test_idle_and_slowloris_connections_do_not_starve_real_requests(model):
    """500 idle + 20 slowloris connections held open (the server closes them after --header-timeout and
    the attacker reopens them): every real request is answered 200 within 1 s, all along. Today's main
    answers 503 to all of them (uvicorn's limit_concurrency counts the idle sockets)."""
    _open_files(4096)
    server = start_server(model["dir"] / "idle", model["ckpt"], "--backend", "eager", "--header-timeout", "2")
    try:
        with Attacker(server.port, idle=500, slow=20) as attacker:
            time.sleep(2.0)  # all connections open
            latencies, statuses = [], []
            end = time.monotonic() + 12  # several rounds of closing and reopening
            while time.monotonic() < end:
                start = time.monotonic()
                status, _, _ = server.request("POST", "/v1/classify", model["photo"], timeout=10)
                latencies.append(time.monotonic() - start)
                statuses.append(status)
                time.sleep(0.2)
            reopened = attacker.reopened
        print(f"real requests: {len(latencies)}, slowest {max(latencies) * 1e3:.0f} ms, "
              f"median {np.median(latencies) * 1e3:.0f} ms; attacker reopened {reopened} connections")
        assert set(statuses) == {200}, statuses
        assert max(latencies) < 1.0, latencies
        assert reopened >= 500  # the server did close the idle ones
    finally:
        assert server.stop() == 0


def test_header_deadline_closes_silent_and_trickling_connections(model):
    """A connection that sends nothing, and one that trickles its head, are both closed about
    --header-timeout after opening: bytes arriving do not extend the deadline."""
    server = start_server(model["dir"] / "deadline", model["ckpt"], "--backend", "eager", "--header-timeout", "1.5")
    try:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        start = time.monotonic()
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        slow.settimeout(0.25)
        closed_slow = None
        while time.monotonic() - start < 8:
            try:
                if slow.recv(1) == b"":
                    closed_slow = time.monotonic() - start
                    break
            except TimeoutError:
                slow.sendall(b"X-a: b\r\n")
            except ConnectionResetError:
                closed_slow = time.monotonic() - start
                break
        assert silent.recv(1) == b""
        closed_silent = time.monotonic() - start
        assert closed_slow is not None and 1.2 < closed_slow < 4, closed_slow
        assert 1.2 < closed_silent < 4, closed_silent
        # a keep-alive connection gets the same deadline again after each answer
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"live":true}'):
                answer += s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert s.recv(1) == b""
            assert 1.2 < time.monotonic() - start < 4
    finally:
        assert server.stop() == 0


def test_past_the_connection_cap_idle_connections_go_first(model):
    """With --max-connections 50 and a header deadline far away, 120 idle connections do not keep a
    real one out: the oldest idle ones are closed to make room."""
    _open_files(1024)
    server = start_server(model["dir"] / "cap", model["ckpt"], "--backend", "eager", "--header-timeout", "60",
                          "--max-connections", "50")
    socks = []
    try:
        for _ in range(120):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        time.sleep(0.5)
        start = time.monotonic()
        status, _, _ = server.request("POST", "/v1/classify", model["photo"], timeout=10)
        assert status == 200 and time.monotonic() - start < 1.0
        closed = []
        for s in socks:
            s.settimeout(0.05)
            try:
                closed.append(s.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
        assert sum(closed) >= 120 - 50, sum(closed)
        assert all(closed[:60])  # oldest first
    finally:
        for s in socks:
            s.close()
        assert server.stop() == 0


@pytest.fixture(scope="module")
def json_server(model):
    server = start_server(model["dir"] / "json", model["ckpt"], "--backend", "eager", "--max-upload-mb", "20")
    yield server
    assert server.stop() == 0


def _v2(server, body: bytes, timeout: float = 60):
    status, _, data = server.request("POST", f"/v2/models/{MODEL}/infer", body, timeout=timeout)
    return status, json.loads(data)


def test_deep_json_and_huge_numbers_get_400_naming_the_limit(json_server):
    """Today's main: 500 and a RecursionError traceback; 500 on the 5,000-digit integer."""
    status, got = _v2(json_server, b"[" * 100_000)
    assert status == 400 and "nested deeper than 32 levels" in got["error"], got
    status, got = _v2(json_server, b'{"inputs": [{"name": "x", "shape": [' + b"9" * 5000 + b"]}]}")
    assert status == 400 and "5000 characters; the limit is 64" in got["error"], got
    status, got = _v2(json_server, b'{"inputs": [{"name": "input", "data": [NaN]}]}')
    assert status == 400 and "NaN" in got["error"], got
    nested = {"inputs": [{"name": "input", "shape": [1, 3, CROP, CROP], "datatype": "FP32",
                          "data": [[[[[0.0]]]]]}]}
    status, got = _v2(json_server, json.dumps(nested).encode())
    assert status == 400 and got["error"].startswith("inputs[0].data"), got
    assert "internal" not in json.dumps(_metrics(json_server))


def test_health_stays_fast_while_clients_send_15_mb_json(json_server):
    """4 clients each send 15 MB FP32 JSON bodies (parsed in full, then refused for an out-of-range
    value) while /v2/health/live is polled: its p99 stays low because JSON is parsed off the event loop.
    Today's main parses on the loop and stalls health for the whole parse of each body."""
    rng = np.random.default_rng(0)
    n = 62  # about 15 MB of JSON
    data = rng.standard_normal(n * 3 * CROP * CROP).tolist()
    data[-1] = 1e39  # finite in JSON, infinite as float32: refused after the whole parse
    body = json.dumps({"inputs": [{"name": "input", "shape": [n, 3, CROP, CROP], "datatype": "FP32",
                                   "data": data}]}).encode()
    assert len(body) > 14 * 2**20
    stop = threading.Event()
    answers = []

    def sender():
        for _ in range(4):  # bounded
            if stop.is_set():
                return
            answers.append(_v2(json_server, body, timeout=120)[0])

    senders = [threading.Thread(target=sender) for _ in range(4)]
    for t in senders:
        t.start()
    times = []
    deadline = time.monotonic() + 120
    while any(t.is_alive() for t in senders) and time.monotonic() < deadline:
        start = time.monotonic()
        assert json_server.request("GET", "/v2/health/live", timeout=10)[0] == 200
        times.append(time.monotonic() - start)
        time.sleep(0.01)
    stop.set()
    for t in senders:
        t.join(120)
    p99 = float(np.percentile(times, 99))
    print(f"/v2/health/live during 15 MB JSON uploads: {len(times)} probes, p50 {np.median(times) * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms; {len(body) / 2**20:.1f} MB bodies")
    assert set(answers) == {400}, answers
    assert len(times) >= 20
    assert p99 < 0.25, p99  # target 50 ms on an idle machine; generous here (shared CPUs)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_sighup_and_sigint_drain_like_sigterm(model, sig):
    """50 requests in flight (waiting 3 s for their batch), then the signal: every one is answered 200,
    new connections are refused, and the server exits 0. Today's main: SIGHUP drops them all."""
    server = start_server(model["dir"] / f"drain-{sig.name}", model["ckpt"], "--backend", "eager",
                          "--max-batch", "64", "--max-queue", "64", "--max-wait-ms", "3000")
    answers: list = []
    lock = threading.Lock()

    def send():
        try:
            status = server.request("POST", "/v1/classify", model["photo"], timeout=60)[0]
        except OSError as e:
            status = repr(e)
        with lock:
            answers.append(status)

    threads = [threading.Thread(target=send) for _ in range(50)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # all 50 accepted, waiting for their batch
    server.proc.send_signal(sig)
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)
    for t in threads:
        t.join(60)
    assert answers == [200] * 50, answers
    assert server.proc.wait(60) == 0


def test_client_hanging_up_mid_upload_is_a_client_disconnect(json_server):
    """Counted under its own kind, never as an internal error (which alerting reads)."""
    before = _metrics(json_server)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", json_server.port), timeout=10) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"z" * 1000)
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    key = 'hrnet_errors_total{kind="client_disconnect"}'
    while time.monotonic() < deadline and _metrics(json_server).get(key, 0) - before.get(key, 0) < 3:
        time.sleep(0.2)
    after = _metrics(json_server)
    assert after.get(key, 0) - before.get(key, 0) == 3
    internal = 'hrnet_errors_total{kind="internal"}'
    assert after.get(internal, 0) == before.get(internal, 0)
