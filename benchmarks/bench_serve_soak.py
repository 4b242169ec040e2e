"""``hrnet serve`` memory soak: 16 clients (default) classify real JPEGs without pause for ``--minutes``,
and the server's resident memory is sampled every ``--every`` seconds. Prints RSS over time and the
growth ratio after warm-up (RSS at the end / RSS once ``--warmup`` seconds have passed): issue 22's
target is at most 1.10 over 10 minutes.

The server runs as a subprocess on 127.0.0.1 (``bench_serve.start``), the load is asyncio with raw
keep-alive sockets (``bench_serve.client``), each client a bounded number of requests per round.

    python benchmarks/bench_serve_soak.py --minutes 10                 # the figure, on an idle machine
    python benchmarks/bench_serve_soak.py --model hrnet-w18-small --input-size 64 --minutes 2   # a check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import client, real_jpegs, rss_mb, start  # noqa: E402


async def soak(port: int, pid: int, bodies: list[bytes], args) -> tuple[list[tuple[float, float]], dict]:
    samples: list[tuple[float, float]] = []
    statuses: list = []
    start_t = time.monotonic()
    end = start_t + args.minutes * 60

    async def one(i: int) -> None:
        while time.monotonic() < end:  # rounds of 20 requests: a bounded loop per client
            await client(port, bodies, 20, [], statuses, seed=i + len(statuses))

    async def sample() -> None:
        while time.monotonic() < end:
            samples.append((time.monotonic() - start_t, rss_mb(pid)))
            print(f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:8.1f} MB  requests {len(statuses)}", flush=True)
            await asyncio.sleep(args.every)
        samples.append((time.monotonic() - start_t, rss_mb(pid)))

    await asyncio.gather(sample(), *(one(i) for i in range(args.clients)))
    counts: dict = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return samples, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hrnet-w18")
    p.add_argument("--checkpoint")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--input-size", type=int)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=60.0, help="seconds of load before the baseline sample")
    p.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--json", action="store_true", help="one JSON line with the samples and the ratio")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start(args, Path(tmp))
        try:
            samples, counts = asyncio.run(soak(port, proc.pid, real_jpegs(), args))
        finally:
            proc.terminate()
            proc.wait(60)
    base = next((rss for t, rss in samples if t >= args.warmup), samples[-1][1])
    ratio = samples[-1][1] / base
    print(f"{args.model}, {args.clients} clients, {args.minutes:g} min: RSS {base:.1f} MB after {args.warmup:g} s "
          f"warm-up -> {samples[-1][1]:.1f} MB at the end: growth ratio {ratio:.3f} (target <= 1.10); "
          f"answers {counts}")
    if args.json:
        print(json.dumps({"samples": samples, "baseline_mb": base, "ratio": ratio, "answers": counts}))


if __name__ == "__main__":
    main()
