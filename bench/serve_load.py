"""Bounded loopback load on `flux2 serve` with the embedded nano: N concurrent clients, each sending
OpenAI-compatible generation requests back to back; reports throughput and latency percentiles.

The server runs as its own process on 127.0.0.1 (a free port, a fresh data folder). Every level is
bounded in requests and in time. Usage:
    python bench/serve_load.py [--clients 1,4,8] [--requests 24] [--size 128] [--timeout 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, data: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flux2studio.cli", "serve", "--port", str(port), "--data", data, "--model", "nano"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def one_level(url: str, clients: int, requests: int, size: int, timeout: float) -> dict:
    """`requests` generations spread over `clients` threads; latency per request, errors counted."""
    body = {"model": "nano", "prompt": "a small red circle on a white background", "size": f"{size}x{size}"}
    deadline = time.monotonic() + timeout

    def client(k: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(timeout=timeout) as http:
            for i in range(k, requests, clients):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/images/generations", json=body | {"seed": i})
                out.append((time.perf_counter() - t0, r.status_code))
        return out

    started = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - started
    ok = sorted(t for t, status in results if status == 200)
    p = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(results), "ok": len(ok), "wall_s": wall,
            "images_per_s": len(ok) / wall, "p50_s": p(0.50), "p95_s": p(0.95),
            "mean_s": statistics.fmean(ok) if ok else float("nan")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels (at most 16)")
    parser.add_argument("--requests", type=int, default=24, help="requests per level (at most 200)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per level")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    if not all(1 <= c <= 16 for c in levels) or not 1 <= args.requests <= 200:
        raise SystemExit("clients must be 1..16 and requests 1..200 (a bounded load test)")

    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = start_server(port, data)
        url = f"http://127.0.0.1:{port}"
        try:
            one_level(url, 1, 2, args.size, args.timeout)  # warm-up: model loaded, first-call costs paid
            rows = [one_level(url, c, args.requests, args.size, args.timeout) for c in levels]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"nano {args.size}x{args.size}, 4 steps, OpenAI route, {args.requests} requests per level\n")
    print("| clients | ok / sent | images/s | p50 latency | p95 latency |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['ok']} / {r['requests']} | {r['images_per_s']:.2f} | "
              f"{r['p50_s']:.2f} s | {r['p95_s']:.2f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
