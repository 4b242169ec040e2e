"""hrnet serve end to end: the real server as a subprocess on 127.0.0.1, spoken to over HTTP.

Answers are checked against ``hrnet.predict`` on the same checkpoint and files (eager PyTorch, while
the server runs onnxruntime and batches), and the FP32 v2 input against the test's own mmcls
preprocessing and forward pass.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrnet.cli import main
from hrnet.inference.predict import predict
from test_data import make_bad_corpus
from test_predict import CROP, MODEL, SHORT, model_and_photos
from test_transforms import mmcls_reference

pytest.importorskip("uvicorn", reason="hrnet[serve] is not installed")
pytest.importorskip("prometheus_client", reason="hrnet[serve] is not installed")
pytestmark = pytest.mark.slow  # the tests talk to `hrnet serve` running as a subprocess

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    tmpdir: Path
    log: Path
    tmp_at_ready: set[str] | None = None  # what libraries left in TMPDIR while loading (caches)

    def assert_no_temp_files_left(self) -> None:
        """Requests left nothing in TMPDIR, and the ONNX export's temporary directory is gone."""
        left = {p.name for p in self.tmpdir.iterdir()}
        assert left <= self.tmp_at_ready and not [n for n in left if n.startswith("tmp")], left

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def start_server(d: Path, checkpoint: Path, *options: str) -> Server:
    """``hrnet serve`` on a free port with ``TMPDIR`` of its own; waits until it is ready."""
    d.mkdir(parents=True, exist_ok=True)
    tmpdir, log, port = d / "tmp", d / "server.log", free_port()
    tmpdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmpdir)}
    cmd = [sys.executable, "-m", "hrnet", "serve", MODEL, "--checkpoint", str(checkpoint), "--port", str(port),
           "--input-size", str(CROP), "-q", *options]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(proc, port, tmpdir, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if server.request("GET", "/v2/health/ready", timeout=5)[0] == 200:
                server.tmp_at_ready = {p.name for p in tmpdir.iterdir()}
                return server
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server not ready after 300 s:\n{log.read_text()}")


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    out = b""
    for name, value in (fields or {}).items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    for i, (filename, data) in enumerate(files):
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{filename}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random checkpoint, photos, ``hrnet.predict``'s answers for them, and a server on the checkpoint."""
    d = tmp_path_factory.mktemp("serve")
    model, ckpt, photos, ref_logits = model_and_photos(d)
    expected = predict(MODEL, photos, checkpoint=ckpt, input_size=CROP, workers=0, topk=5)
    server = start_server(d / "main", ckpt, "--max-batch", "8", "--max-wait-ms", "20",
                          "--max-upload-mb", str(UPLOAD_MB), "--upload-timeout", "2")
    yield {"model": model, "ckpt": ckpt, "photos": photos, "ref": ref_logits.softmax(1), "expected": expected,
           "server": server, "dir": d}
    assert server.stop() == 0
    server.assert_no_temp_files_left()


def assert_same_top(got: list[dict], want: list[dict]) -> None:
    assert [t["index"] for t in got] == [t["index"] for t in want]
    assert [t["label"] for t in got] == [t["label"] for t in want]
    np.testing.assert_allclose([t["score"] for t in got], [t["score"] for t in want], rtol=0, atol=1e-5)


def test_classify_raw_bytes_equals_predict(setup):
    server = setup["server"]
    for photo, want in zip(setup["photos"], setup["expected"]):
        status, got = server.json("POST", "/v1/classify", photo.read_bytes(), {"Content-Type": "image/jpeg"})
        assert status == 200, got
        assert set(got[0]) == {"label", "score", "index"}
        assert_same_top(got, want["topk"])
    status, got = server.json("POST", "/v1/classify?top_k=2", setup["photos"][0].read_bytes())
    assert status == 200 and len(got) == 2


def test_concurrent_requests_are_batched_and_answered_individually(setup):
    server, photos = setup["server"], setup["photos"]
    answers: dict[int, tuple] = {}

    def send(i: int) -> None:
        answers[i] = server.json("POST", "/v1/classify", photos[i % len(photos)].read_bytes())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3 * len(photos))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, got) in answers.items():
        assert status == 200, got
        assert_same_top(got, setup["expected"][i % len(photos)]["topk"])


def test_classify_multipart_many_files_and_hf_json(setup):
    server, photos = setup["server"], setup["photos"]
    body, headers = multipart([(p.name, p.read_bytes()) for p in photos], {"top_k": "3"})
    status, got = server.json("POST", "/v1/classify", body, headers)
    assert status == 200, got
    assert len(got) == len(photos)
    for top, want in zip(got, setup["expected"]):
        assert_same_top(top, want["topk"][:3])
    hf = json.dumps({"inputs": base64.b64encode(photos[1].read_bytes()).decode(), "parameters": {"top_k": 4}})
    status, got = server.json("POST", "/v1/classify", hf.encode(), {"Content-Type": "application/json"})
    assert status == 200, got
    assert_same_top(got, setup["expected"][1]["topk"][:4])


def test_v2_metadata_and_health(setup):
    server = setup["server"]
    assert server.json("GET", "/v2/health/live") == (200, {"live": True})
    assert server.json("GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = server.json("GET", f"/v2/models/{MODEL}")
    assert status == 200 and meta["name"] == MODEL
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, CROP, CROP])}
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 1000]}]
    assert server.json("GET", f"/v2/models/{MODEL}/ready")[0] == 200
    status, err = server.json("GET", "/v2/models/resnet50")
    assert status == 404 and "resnet50" in err["error"]


def test_v2_infer_bytes_with_classification_extension(setup):
    server, photos = setup["server"], setup["photos"][:2]
    data = [base64.b64encode(p.read_bytes()).decode() for p in photos]
    req = {"id": "r1", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": data}],
           "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    status, got = server.json("POST", f"/v2/models/{MODEL}/infer", json.dumps(req).encode())
    assert status == 200, got
    assert got["model_name"] == MODEL and got["id"] == "r1"
    (out,) = got["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 3]
    for i, want in enumerate(setup["expected"][:2]):
        rows = [s.split(":", 2) for s in out["data"][3 * i: 3 * i + 3]]
        assert [int(r[1]) for r in rows] == [t["index"] for t in want["topk"][:3]]
        assert [r[2] for r in rows] == [t["label"] for t in want["topk"][:3]]
        np.testing.assert_allclose([float(r[0]) for r in rows], [t["score"] for t in want["topk"][:3]], atol=1e-5)
    req["inputs"] = [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data[:1]}]
    status, got = server.json("POST", f"/v2/models/{MODEL}/infer", json.dumps(req).encode())
    assert status == 200 and got["outputs"][0]["shape"] == [3]  # one image: shape [k]


def test_v2_infer_fp32_tensor_equals_independent_forward(setup):
    """The FP32 input is the preprocessed tensor: the answer is the model's softmax on it."""
    server, photos = setup["server"], setup["photos"][:3]
    x = np.stack([mmcls_reference(Image.open(p).convert("RGB"), SHORT, CROP) for p in photos]).astype(np.float32)
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}]}
    status, got = server.json("POST", f"/v2/models/{MODEL}/infer", json.dumps(req).encode())
    assert status == 200, got
    (out,) = got["outputs"]
    assert out["name"] == "probabilities" and out["datatype"] == "FP32" and out["shape"] == [3, 1000]
    probs = torch.tensor(out["data"]).view(3, 1000)
    torch.testing.assert_close(probs, setup["ref"][:3], rtol=0, atol=1e-5)
    req["inputs"][0]["data"] = x.tolist()  # nested row-major data is accepted too
    assert server.json("POST", f"/v2/models/{MODEL}/infer", json.dumps(req).encode())[0] == 200


def _infer(inputs=None, **extra) -> bytes:
    base = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}
    if inputs is not None:
        base["inputs"] = inputs
    return json.dumps({**base, **extra}).encode()


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (json.dumps({"inputs": []}).encode(), "inputs"),
    (_infer([{"name": "image", "shape": [1], "datatype": "BYTES"}]), "inputs[0].data"),
    (_infer([{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGVsbG8="]}]), "inputs[0].shape"),
    (_infer([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["@@not base64"]}]), "inputs[0].data[0]"),
    (_infer([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]),
     "inputs[0].shape"),
    (_infer([{"name": "input", "shape": [1, 3, CROP, CROP], "datatype": "FP32", "data": [0.0] * 5}]),
     "inputs[0].data"),
    (_infer([{"name": "input", "shape": [1, 3, CROP, CROP], "datatype": "INT8", "data": [0] * 3 * CROP * CROP}]),
     "inputs[0].datatype"),
    (_infer([{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]), "inputs[0].name"),
    (_infer(outputs=[{"name": "logits"}]), "outputs[0].name"),
    (_infer(outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]),
     "outputs[0].parameters.classification"),
], ids=["not-json", "not-object", "no-inputs", "no-data", "shape-vs-data", "bad-base64", "wrong-tensor-shape",
        "short-tensor", "wrong-dtype", "wrong-input-name", "unknown-output", "bad-classification"])
def test_v2_malformed_bodies_get_400_naming_the_field(setup, body, field):
    status, got = setup["server"].json("POST", f"/v2/models/{MODEL}/infer", body)
    assert status == 400, got
    assert got["error"].startswith(field + ":"), got


def test_bad_top_k_is_a_400_naming_it(setup):
    status, got = setup["server"].json("POST", "/v1/classify?top_k=0", setup["photos"][0].read_bytes())
    assert status == 400 and got["error"].startswith("top_k:")


def test_bad_images_get_415_or_422_and_the_server_keeps_serving(setup, tmp_path):
    server = setup["server"]
    good, bad = make_bad_corpus(tmp_path)
    for name in good:
        status, got = server.json("POST", "/v1/classify", (tmp_path / name).read_bytes())
        assert status == 200, (name, got)
    want = {"zero.jpg": 415, "random.jpg": 415, "text.png": 415, "truncated.jpg": 422, "bomb.png": 422,
            "bomb_warning.png": 422}
    assert set(want) == set(bad)
    for name, code in want.items():
        status, got = server.json("POST", "/v1/classify", (tmp_path / name).read_bytes())
        assert status == code, (name, got)
        assert "\n" not in got["error"]
    assert "bomb" in server.json("POST", "/v1/classify", (tmp_path / "bomb.png").read_bytes())[1]["error"]
    body, headers = multipart([("ok.jpg", setup["photos"][0].read_bytes()), ("text.png", b"hello")])
    status, got = server.json("POST", "/v1/classify", body, headers)
    assert status == 415 and got["error"].startswith("text.png:")  # the multipart file is named
    assert server.json("POST", "/v1/classify", setup["photos"][0].read_bytes())[0] == 200


def test_too_large_is_refused_while_reading(setup):
    server, limit = setup["server"], UPLOAD_MB * 2**20
    status, _, body = server.request("POST", "/v1/classify", b"x" * (limit + 1))
    assert status == 413 and b"limit" in body
    # chunked, no Content-Length: the answer comes once the limit is passed, while the client still
    # has not finished sending (it never sends the last chunk)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 65536
        for _ in range(limit // len(chunk) + 2):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_stalled_upload_times_out(setup):
    with socket.create_connection(("127.0.0.1", setup["server"].port), timeout=60) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"z" * 10)
        start = time.monotonic()
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - start < 30


def test_grad_cam_endpoint_returns_a_png(setup):
    status, headers, body = setup["server"].request("POST", "/v1/cam?class_index=3", setup["photos"][0].read_bytes())
    assert status == 200 and headers["content-type"] == "image/png"
    assert body.startswith(b"\x89PNG")
    status, _, _ = setup["server"].request("POST", "/v1/cam?class_index=1000", setup["photos"][0].read_bytes())
    assert status == 400


def test_page_is_self_contained(setup):
    status, headers, body = setup["server"].request("GET", "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "v1/classify" in page and "v1/cam" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_metrics_count_requests_errors_batches_and_queue(setup):
    server = setup["server"]
    server.request("POST", "/v1/classify", b"not an image")
    status, headers, body = server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            metrics[key] = float(value)
    assert metrics['hrnet_requests_total{endpoint="classify",status="200"}'] >= len(setup["photos"])
    assert metrics['hrnet_errors_total{kind="not_an_image"}'] >= 1
    assert metrics["hrnet_batch_size_count"] >= 1
    assert metrics["hrnet_batch_size_sum"] > metrics["hrnet_batch_size_count"]  # some batch held several images
    assert metrics["hrnet_queue_depth"] == 0
    assert 'hrnet_request_seconds_bucket{endpoint="classify",le="+Inf"}' in metrics


@pytest.fixture(scope="module")
def slow_server(setup):
    """A server whose batches wait 3 s to fill: requests stay in flight long enough to act on them."""
    return start_server(setup["dir"] / "slow", setup["ckpt"], "--backend", "eager", "--max-batch", "16",
                        "--max-queue", "16", "--max-wait-ms", "3000")


def test_full_queue_answers_503_with_retry_after(setup, slow_server):
    photo = setup["photos"][0].read_bytes()
    first: list = []
    body, headers = multipart([("a.jpg", photo)] * 10)
    t = threading.Thread(target=lambda: first.append(slow_server.json("POST", "/v1/classify", body, headers)))
    t.start()
    time.sleep(1.0)  # the 10 images now wait for their batch to fill
    status, headers, answer = slow_server.request("POST", "/v1/classify", body, headers)
    assert status == 503 and headers["retry-after"] == "1", answer
    assert "busy" in json.loads(answer)["error"]
    t.join()
    assert first[0][0] == 200 and len(first[0][1]) == 10


def test_sigterm_drains_in_flight_requests_then_exits_0(setup, slow_server):
    photo = setup["photos"][2].read_bytes()
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(slow_server.json("POST", "/v1/classify", photo)))
               for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # in flight: waiting in the batcher
    slow_server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(ConnectionRefusedError):  # new connections are refused while draining
        socket.create_connection(("127.0.0.1", slow_server.port), timeout=5)
    for t in threads:
        t.join()
    assert [a[0] for a in answers] == [200] * 3
    for status, got in answers:
        assert_same_top(got, setup["expected"][2]["topk"])
    assert slow_server.proc.wait(60) == 0
    slow_server.assert_no_temp_files_left()


def test_workers_share_one_port(setup):
    server = start_server(setup["dir"] / "workers", setup["ckpt"], "--backend", "eager", "--workers", "2")
    try:
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        assert len(children) >= 2, children  # the supervisor and its two worker processes
        for photo, want in zip(setup["photos"][:3], setup["expected"]):
            status, got = server.json("POST", "/v1/classify", photo.read_bytes())
            assert status == 200
            assert_same_top(got, want["topk"])
    finally:
        assert server.stop() == 0


def test_cli_refuses_bad_options_in_one_line(capsys):
    assert main(["serve", MODEL, "--max-batch", "32", "--max-queue", "8", "--checkpoint", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hrnet: error: invalid server options: max_queue") and err.count("\n") == 1
    assert main(["serve", "hrnet-w81", "--workers", "2"]) == 1
    assert capsys.readouterr().err.startswith("hrnet: error: unknown model 'hrnet-w81'")
