"""A CPU call larger than the memory it may take, in a memory cgroup (a container's limit): with the plan (the
memory available measured as the call begins, the cgroup's limit included: a batch denoised in parts, the VAE in
tiles where whole would not fit) and without it (`--no-plan` in a child: the VAE whole and the batch at once, as
before 2026-12-06). klein-4b's VAE (its real shapes, random weights) behind nano's transformer and text encoder, so
that the VAE's phase is the large one; fp32 by default (what `auto` computes in on AVX2 CPUs); each run in its own
process in a child cgroup limited to --limit (needs root and a writable cgroup v1 or v2 memory controller).

    python bench/memory_plan.py [--limit 6GB] [--size 2048] [--num 1] [--dtype fp32|bf16]

Per run: how it ended (the kernel's OOM killer stops a process over the limit: exit -9), wall time, the VAE tile
the image records, the cgroup's peak memory use, the memory the plan measured. Nothing is written but temp files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flux2studio.device_streaming import available_ram, human, parse_bytes
from flux2studio.precision import describe_cpu


def child(args: argparse.Namespace) -> None:
    import torch

    from flux2studio import load, pipeline
    from flux2studio.model.autoencoder import AutoEncoder
    from flux2studio.pipeline import Component
    from flux2studio.variants import get_variant

    torch.set_num_threads(2)
    pipe = load("nano", dtype=args.dtype)
    cfg = get_variant("klein-4b").vae
    torch.manual_seed(0)
    vae = AutoEncoder(cfg).to(pipe.dtype).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.02)
    pipe.parts["vae"] = Component.of(vae)
    pipe.variant = dataclasses.replace(pipe.variant, vae=cfg, max_side=2048)
    measured = available_ram()
    if args.no_plan:
        pipeline.available_ram = lambda: None  # nothing measured: whole, at once, as before the plan
    started = time.perf_counter()
    images = pipe("a red circle", size=(args.size, args.size), num_images=args.num, steps=1)
    meta = json.loads(images[0].info["flux2"])
    print(json.dumps({"seconds": time.perf_counter() - started, "vae_tile": meta.get("vae_tile"),
                      "measured": measured}))  # fmt: skip


def make_cgroup(limit: int) -> tuple[Path, str]:
    """A child of this process's memory cgroup limited to `limit` bytes, swap off: (its folder, v1 or v2)."""
    paths = {}  # controllers -> this process's cgroup path
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        paths["memory" if "memory" in controllers.split(",") else controllers] = path.strip("/")
    name = f"flux2-bench-{os.getpid()}"
    if "memory" in paths:  # v1 (preferred where both are mounted: the memory controller lives there)
        group = Path("/sys/fs/cgroup/memory") / paths["memory"] / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return group, "v1"
    if "" in paths:
        group = Path("/sys/fs/cgroup") / paths[""] / name
        group.mkdir()
        (group / "memory.max").write_text(str(limit))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group, "v2"
    raise SystemExit("no memory cgroup to limit: run as root on Linux with the memory controller")


def run(args: argparse.Namespace, plan: bool) -> dict:
    group, version = make_cgroup(parse_bytes(args.limit))
    cmd = [sys.executable, __file__, "--child", "--size", str(args.size), "--num", str(args.num),
           "--dtype", args.dtype, *([] if plan else ["--no-plan"])]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))  # fmt: skip
    wall = time.perf_counter() - started
    peak_file = "memory.max_usage_in_bytes" if version == "v1" else "memory.peak"
    peak = int((group / peak_file).read_text()) if (group / peak_file).exists() else None
    group.rmdir()
    out = {"plan": plan, "exit": proc.returncode, "wall": wall, "peak": peak}
    if proc.returncode == 0:
        out.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        out["error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", default="6GB", help="the cgroup's memory limit")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--num", type=int, default=1)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-plan", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"CPU: {describe_cpu()}; limit {args.limit}; {args.num} x {args.size}x{args.size}, {args.dtype}, 1 step")
    print("| run | ended | wall | VAE tile | peak (cgroup) | measured available |")
    print("|---|---|---:|---:|---:|---:|")
    for plan in (False, True):
        r = run(args, plan)
        ended = "finished" if r["exit"] == 0 else ("killed (OOM)" if r["exit"] == -9 else f"exit {r['exit']}")
        peak = human(r["peak"]) if r["peak"] else "-"
        tile = r.get("vae_tile") or ("whole" if r["exit"] == 0 else "-")
        measured = human(r["measured"]) if r.get("measured") else "-"
        name = "with the plan" if plan else "without (as before)"
        print(f"| {name} | {ended} | {r['wall']:.1f} s | {tile} | {peak} | {measured} |", flush=True)


if __name__ == "__main__":
    main()
