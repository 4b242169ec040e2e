"""``hrnet serve`` under load: served images/s and latency at 1, 4, 16, 64 concurrent clients next to
model-only throughput at the batch size the server chose, then a mixed run with bad uploads.

The server runs as a subprocess on 127.0.0.1; the load generator is asyncio with raw sockets (one
keep-alive connection per client, ``POST /v1/classify`` with a real JPEG body, a bounded number of
requests each). The batch size the server chose is read from its ``/metrics`` (mean images per model
call during that run); model-only throughput at that batch size is measured in this process with
``hrnet.deploy.bench.bench_here`` on the same backend, in the same run. The mixed run sends
``--mixed`` requests, 1 in 10 a bad upload (not an image, truncated, empty, a decompression bomb),
counts 5xx answers and broken connections, and compares the server's resident memory after the run
with after warm-up.

    python benchmarks/bench_serve.py                         # hrnet-w18, the full run
    python benchmarks/bench_serve.py --model hrnet-w18-small --input-size 64 --concurrency 1 4 \\
        --requests 2 --mixed 40                              # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from hrnet.deploy.bench import bench_here, percentile

ROOT = Path(__file__).resolve().parents[1]


def real_jpegs() -> list[bytes]:
    """The example photos and scikit-image's, as JPEG bodies."""
    files = sorted((ROOT / "examples" / "images").glob("*.jpg"))
    try:
        import skimage

        files += sorted(Path(skimage.__file__).parent.joinpath("data").glob("*.png"))[:8]
    except ImportError:
        pass
    out = []
    for f in files:
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bad_uploads(good: bytes) -> list[bytes]:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")
    return [b"", b"this is not an image\n", good[: len(good) // 3], np.random.default_rng(0).bytes(5000), bomb]


async def post(reader, writer, path: str, body: bytes) -> int:
    """One HTTP/1.1 request on a keep-alive connection; the status code."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return status


async def client(port: int, bodies: list[bytes], n: int, latencies: list, statuses: list, seed: int) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(n):
            start = time.perf_counter()
            try:
                status = await post(reader, writer, "/v1/classify", rng.choice(bodies))
            except (OSError, asyncio.IncompleteReadError):
                statuses.append("broken")
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append(time.perf_counter() - start)
            statuses.append(status)
    finally:
        writer.close()


async def load(port: int, clients: int, requests: int, pick) -> tuple[float, list[float], list]:
    latencies: list[float] = []
    statuses: list = []
    start = time.perf_counter()
    await asyncio.gather(*(client(port, pick(i), requests, latencies, statuses, i) for i in range(clients)))
    return time.perf_counter() - start, latencies, statuses


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def start(args, tmp: Path) -> tuple[subprocess.Popen, int]:
    """``hrnet serve`` on a free port of 127.0.0.1, once it is ready; without ``args.checkpoint``, on the
    model's random initialisation saved in ``tmp`` (the amount of work does not depend on the weights'
    values, and this machine cannot download the published ones)."""
    if not args.checkpoint:
        from hrnet import create_model, save_checkpoint

        args.checkpoint = str(save_checkpoint(create_model(args.model).eval(), tmp / "random.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hrnet", "serve", args.model, "--port", str(port), "--backend", args.backend,
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "-q", "--json"]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if args.input_size:
        cmd += ["--input-size", str(args.input_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"server exited: {(tmp / 'server.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
            return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("server not ready after 10 minutes")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hrnet-w18")
    p.add_argument("--checkpoint", help="weights (default: the model's random initialisation, saved here)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=40, help="requests per client at each concurrency")
    p.add_argument("--mixed", type=int, default=2000, help="requests in the mixed run (1 in 10 bad), 16 clients")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    good = real_jpegs()
    bad = bad_uploads(good[0])
    size = args.input_size or 224
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, port = start(args, tmp)
        try:
            asyncio.run(load(port, 4, 5, lambda i: good))  # warm-up
            rss_warm = rss_mb(proc.pid)
            rows = []
            for c in args.concurrency:
                before = metrics(port)
                wall, lat, statuses = asyncio.run(load(port, c, args.requests, lambda i: good))
                after = metrics(port)
                calls = after["hrnet_batch_size_count"] - before["hrnet_batch_size_count"]
                mean_batch = (after["hrnet_batch_size_sum"] - before["hrnet_batch_size_sum"]) / max(calls, 1)
                batch = max(1, round(mean_batch))
                model = bench_here(args.model, args.backend, checkpoint=args.checkpoint, batch_size=batch,
                                   input_size=(size, size), iters=max(3, 2 * args.requests // batch), warmup=1)
                served = len(lat) / wall
                rows.append({"clients": c, "requests": len(statuses), "ok": statuses.count(200),
                             "served_img_s": served, "p50_ms": 1e3 * percentile(lat, 50),
                             "p99_ms": 1e3 * percentile(lat, 99), "mean_batch": mean_batch,
                             "model_only_img_s": model.images_per_s,
                             "served_vs_model": served / model.images_per_s})
            per_client = max(1, args.mixed // 16)
            mixed_bodies = [good[i % len(good)] for i in range(9 * len(bad))] + bad  # exactly 1 in 10 bad
            random.Random(0).shuffle(mixed_bodies)
            _, _, statuses = asyncio.run(load(port, 16, per_client, lambda i: mixed_bodies))
            mixed = {"requests": len(statuses), "ok": statuses.count(200),
                     "4xx": sum(isinstance(s, int) and 400 <= s < 500 for s in statuses),
                     "5xx": sum(isinstance(s, int) and s >= 500 for s in statuses),
                     "broken_connections": statuses.count("broken"), "server_alive": proc.poll() is None,
                     "rss_mb_after_warmup": rss_warm, "rss_mb_after_run": rss_mb(proc.pid)}
            mixed["rss_change"] = mixed["rss_mb_after_run"] / rss_warm - 1
        finally:
            proc.terminate()
            code = proc.wait(120)
    result = {"model": args.model, "backend": args.backend, "input_size": size, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "cpus": os.cpu_count(), "load": rows, "mixed": mixed,
              "server_exit_code": code}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} on {args.backend}, {size}px, --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}, "
          f"{os.cpu_count()} CPUs")
    print("| clients | served img/s | p50 ms | p99 ms | mean batch | model-only img/s at that batch | served / model |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['served_img_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['mean_batch']:.1f} | {r['model_only_img_s']:.1f} | {100 * r['served_vs_model']:.0f} % |")
    print(f"mixed: {mixed['requests']} requests, {mixed['4xx']} refused (4xx), {mixed['5xx']} 5xx, "
          f"{mixed['broken_connections']} broken connections, server alive: {mixed['server_alive']}, "
          f"RSS {mixed['rss_mb_after_warmup']:.0f} -> {mixed['rss_mb_after_run']:.0f} MB "
          f"({100 * mixed['rss_change']:+.1f} %); exit code after SIGTERM: {code}")


if __name__ == "__main__":
    main()
