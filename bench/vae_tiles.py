"""The VAE encoding and decoding one large image, whole and in tiles: time and memory, ours vs diffusers'
`AutoencoderKLFlux2` (`enable_tiling()` at the same tile size), the same random weights in klein's VAE shapes (built
in memory from a seed; nothing read from disk), each run in its own process, 2 threads.

    python bench/vae_tiles.py [--sizes 1024,2048] [--ops encode,decode] [--tile 512] [--dtype bf16|fp32]
        [--sides ours,diffusers] [--avx2]

Per run: wall time of the call, the process's peak RSS (VmHWM: weights, runtime and the call's work), the call's
own peak above the RSS before it, and ours' planned work (the trace `work_memory.vae_work` reserves x1.2 + 128 MB
for under a `--vram` budget). Each child writes its output; diffusers' is compared with ours (max abs diff: tiles are
blended alike, so the two agree as closely tiled as whole). --avx2 caps the children as bench/memory.py does.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flux2studio.precision import describe_cpu
from memory import AVX2_ONLY, reset_peak, rss_peak_gb

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def rss_gb() -> float:
    """The process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmRSS")


def child(side: str, op: str, size: int, tile: int | None, dtype_name: str, out: Path) -> dict:
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline

    from flux2studio.conversion import vae_config_to_diffusers
    from flux2studio.layouts.vae import vae_to_diffusers
    from flux2studio.model.autoencoder import AutoEncoder
    from flux2studio.variants import get_variant
    from flux2studio.work_memory import traced_vae

    torch.set_num_threads(2)
    dtype, cfg = getattr(torch, DTYPES[dtype_name]), get_variant("klein-4b").vae
    torch.manual_seed(0)
    ours = AutoEncoder(cfg).eval()  # PyTorch's default initialisation, the same in every child
    theirs = AutoencoderKLFlux2.from_config(vae_config_to_diffusers(cfg)).eval()
    theirs.load_state_dict(vae_to_diffusers(ours.state_dict(), cfg), strict=True)
    ours, theirs = ours.to(dtype), theirs.to(dtype)  # both built in every child: the same heap before the call
    g = torch.Generator().manual_seed(1)
    if op == "encode":
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    else:
        x = torch.randn(1, cfg.latent_channels, size // cfg.downscale, size // cfg.downscale, generator=g)
    x = x.to(dtype)
    if side == "ours":
        model = ours
        del theirs

        def run():
            return model.encode(x, tile=tile) if op == "encode" else model.decode(x, tile=tile)
    else:
        model = theirs
        del ours
        if tile is not None:
            model.enable_tiling()
            model.tile_sample_min_size, model.tile_latent_min_size = tile, tile // cfg.spatial_scale
        mean = model.bn.running_mean.view(1, -1, 1, 1).to(dtype)
        std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + cfg.bn_eps).to(dtype)

        def run():  # as Flux2KleinPipeline encodes a reference and decodes its latents
            if op == "encode":
                return (Flux2KleinPipeline._patchify_latents(model.encode(x).latent_dist.mode()) - mean) / std
            return model.decode(Flux2KleinPipeline._unpatchify_latents(x * std + mean)).sample

    gc.collect()
    before = rss_gb()
    reset_peak()
    with torch.no_grad():
        start = time.perf_counter()
        y = run()
        seconds = time.perf_counter() - start
    peak = rss_peak_gb()
    torch.save(y.float(), out)
    planned = traced_vae(cfg, dtype, 1, size, size, op == "decode", tile) / 2**30 if side == "ours" else None
    return {"seconds": seconds, "peak_gb": peak, "work_gb": peak - before, "planned_gb": planned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--ops", default="encode,decode")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--sides", default="ours,diffusers")
    parser.add_argument("--avx2", action="store_true", help="run as on an AVX2-only CPU (bench/memory.py's caps)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # side op size tile out
    args = parser.parse_args()
    if args.child:
        side, op, size, tile, out = args.child
        result = child(side, op, int(size), None if tile == "-" else int(tile), args.dtype, Path(out))
        print("RESULT " + json.dumps(result))
        return
    print(describe_cpu() + (" (children capped at AVX2)" if args.avx2 else ""))
    print(f"klein-4b VAE, random weights, {args.dtype}, one image, 2 threads, a process per run\n")
    print("| op | size | tiles | side | time | peak RSS | call's peak | planned work | max abs diff vs ours |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    env = os.environ | (AVX2_ONLY if args.avx2 else {})
    with tempfile.TemporaryDirectory() as tmp:
        for op in args.ops.split(","):
            for size in map(int, args.sizes.split(",")):
                for tile in (None, args.tile):
                    for side in args.sides.split(","):
                        out = Path(tmp) / f"{side}.pt"
                        cmd = [sys.executable, __file__, "--dtype", args.dtype, "--child", side, op, str(size),
                               "-" if tile is None else str(tile), str(out)]  # fmt: skip
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                        if proc.returncode or not line:
                            print(f"| {op} | {size} | {tile or 'whole'} | {side} | failed: "
                                  f"{proc.stderr.strip().splitlines()[-1:]} |||||")  # fmt: skip
                            continue
                        r = json.loads(line[0][7:])
                        diff = planned = ""
                        if r["planned_gb"] is not None:
                            planned = f"{r['planned_gb']:.2f} GB"
                        if side != "ours" and (Path(tmp) / "ours.pt").exists():
                            import torch

                            diff = f"{(torch.load(out) - torch.load(Path(tmp) / 'ours.pt')).abs().max().item():.2e}"
                        print(f"| {op} | {size}x{size} | {tile or 'whole'} | {side} | {r['seconds']:.1f} s | "
                              f"{r['peak_gb']:.2f} GB | {r['work_gb']:.2f} GB | {planned} | {diff} |",
                              flush=True)  # fmt: skip
                    (Path(tmp) / "ours.pt").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
