"""Bounded load test of `transferlab serve` on loopback: a fixed number of requests, then it stops.

    python bench/bench_service.py MODEL_DIR IMAGE [--requests 2000] [--concurrency 16]

Prints errors (non-200 answers or failed connections), throughput and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, image: bytes, requests: int, concurrency: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = time.perf_counter()
            try:
                r = await client.post(url + "/predict", files={"file": ("x.png", image, "image/png")})
                ok = r.status_code == 200 and "label" in r.json()
            except httpx.HTTPError:
                ok = False
            latencies.append((time.perf_counter() - t) * 1000)
            errors += 0 if ok else 1

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("image")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "serve", args.model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        image = open(args.image, "rb").read()
        asyncio.run(load(url, image, 20, 4))  # warm-up, not counted
        t = time.perf_counter()
        lat, errors = asyncio.run(load(url, image, args.requests, args.concurrency))
        wall = time.perf_counter() - t
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"{args.requests} requests, {args.concurrency} concurrent, loopback: errors {errors}, "
          f"throughput {args.requests / wall:.1f} req/s, latency p50 {statistics.median(lat):.1f} ms, "
          f"p99 {np.percentile(lat, 99):.1f} ms, wall {wall:.1f}s")


if __name__ == "__main__":
    main()
