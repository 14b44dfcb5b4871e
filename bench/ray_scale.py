"""Throughput and latency of the Ray Serve deployment with 1 and 2 CPU replicas of the embedded nano,
under the same bounded loopback load as bench/serve_load.py (a local Ray, jobs in SQLite shared by the
processes of this machine; across machines use PostgreSQL).

    python bench/ray_scale.py [--replicas 1,2] [--clients 8] [--requests 48] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port, one_level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    if not 1 <= args.clients <= 16 or not 1 <= args.requests <= 200:
        raise SystemExit("clients must be 1..16 and requests 1..200 (a bounded load test)")

    import httpx
    import ray
    from ray import serve

    from flux2studio.serve.ray_app import ScaleConfig, build_application

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in (int(r) for r in args.replicas.split(",")):
            data = tempfile.mkdtemp(prefix="flux2-ray-bench-")
            cfg = ScaleConfig(models=["nano"], data=data, min_replicas=n, max_replicas=n, num_cpus=cpus / n / 1.25,
                              threads=max(1, cpus // n), dispatch_loops=2 * n)  # fmt: skip
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_application(cfg), name="flux2", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            one_level(url, n, 2 * n, args.size, args.timeout)  # warm-up: each replica loads the model
            rows.append((n, one_level(url, args.clients, args.requests, args.size, args.timeout)))
            serve.shutdown()
    finally:
        ray.shutdown()
    print(f"Ray Serve, nano {args.size}x{args.size}, 4 steps, {args.clients} clients, {args.requests} requests, "
          f"{cpus} CPU cores\n")  # fmt: skip
    print("| replicas | torch threads each | ok / sent | images/s | p50 latency | p95 latency |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, r in rows:
        print(f"| {n} | {max(1, cpus // n)} | {r['ok']} / {r['requests']} | {r['images_per_s']:.2f} | "
              f"{r['p50_s']:.2f} s | {r['p95_s']:.2f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
