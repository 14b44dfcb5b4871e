"""The int8 / 4-bit candidates on one klein-4b-shaped product, on this CPU: what `--quantize` was chosen from.

One linear layer, 768 tokens x 3072 -> 9216 (klein-4b's qkv at 256x256: 256 image + 512 text tokens), fp32
activations unless named, median of --runs, --threads threads. GFLOP/s counts 2*M*K*N for every candidate;
"error" is the mean absolute difference from the fp32 product relative to its mean magnitude (weights drawn
uniformly, as nn.Linear initialises them: many reach the int8 range's ends, which is where kernels saturate).

    python bench/quant_kernels.py [--threads 2] [--runs 5]
    # as on an AVX2-only CPU:
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/quant_kernels.py

torchao rows need `pip install torchao` (the `bench` extra); they are skipped, and said so, without it.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from flux2studio.precision import describe_cpu
from flux2studio.quantize import dequantize_weight, int8_linear, int8_weight_limit, quantize_weight

M, K, N = 768, 3072, 9216


def measure(fn, runs: int) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def candidates(x: torch.Tensor, w: torch.Tensor) -> dict:
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = w
    bf = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16)
    bf.weight.data = w.bfloat16()
    xb = x.bfloat16()
    rows8, rows4 = quantize_weight(w, "int8"), quantize_weight(w, "Q4_0")
    q = rows8[:, :K].contiguous().view(torch.int8)
    s = rows8[:, K:].contiguous().view(torch.float32)
    found = {
        "fp32 nn.Linear": lambda: lin(x),
        "bf16 nn.Linear": lambda: bf(xb),
        f"ours int8: per-token int8 activations, torch._int_mm (weights within ±{int8_weight_limit()})": (
            lambda: int8_linear(x, rows8, K, None)
        ),
        "int8 weights widened per call + fp32 F.linear": lambda: torch.nn.functional.linear(x, q.float() * s),
        "ours int4 (Q4_0) widened per call + fp32 F.linear": (
            lambda: torch.nn.functional.linear(x, dequantize_weight(rows4, "Q4_0", K, torch.float32))
        ),
        "aten._weight_int8pack_mm (int8 weights, bf16 activations)": (
            lambda: torch.ops.aten._weight_int8pack_mm(xb, q, s.squeeze(1).bfloat16())
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # PyTorch's own dynamic int8 (fbgemm): deprecated with its quantized tensors
            dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
            found["torch.ao dynamic int8 Linear (fbgemm; deprecated)"] = lambda: dyn(x)
        except Exception as e:
            print(f"torch.ao dynamic int8: unavailable ({type(e).__name__})")
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            quantize_,
        )
        from torchao.quantization.granularity import PerGroup

        for name, cfg in (
            ("torchao Int8DynamicActivationInt8Weight", Int8DynamicActivationInt8WeightConfig()),
            ("torchao Int8WeightOnly", Int8WeightOnlyConfig()),
            (
                "torchao IntxWeightOnly int4, groups of 32",
                IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            ),
        ):
            m = torch.nn.Linear(K, N, bias=False)
            m.weight.data = w.clone()
            quantize_(m, cfg)
            found[name] = lambda m=m: m(x)
    except ImportError:
        print("torchao: not installed (pip install torchao): its rows are skipped")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = (torch.rand(N, K, generator=g) * 2 - 1) / K**0.5
    ref = x @ w.t()
    print(f"{M} x {K} -> {N}, {args.threads} threads; CPU features: {describe_cpu()}\n")
    print("| kernel | GFLOP/s | error |\n|---|---:|---:|")
    with torch.no_grad():
        for name, fn in candidates(x, w).items():
            try:
                t, out = measure(fn, args.runs)
            except Exception as e:
                print(f"| {name} | failed: {type(e).__name__} | |")
                continue
            err = ((out.float() - ref).abs().mean() / ref.abs().mean()).item()
            print(f"| {name} | {2 * M * K * N / t / 1e9:.0f} | {err:.4f} |")


if __name__ == "__main__":
    main()
