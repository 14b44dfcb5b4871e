"""Embedded-model speed, ours vs diffusers' Flux2KleinPipeline on the same weights, in one run.

The nano weights are converted to the diffusers layout in memory; both pipelines get the same prompt
embeddings (MiniLM), seed and size, so the timings compare transformer + VAE work only ("model time").
Usage: python bench/nano_speed.py [--runs 5] [--size 128] [--dtype auto|bf16|fp32]
(diffusers runs in the dtype ours resolved; the CPU's features are printed with the table)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from flux2studio.kernels import ATTENTION_MODES

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers imports bitsandbytes, which asks the Hub for a kernel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention", default="auto", choices=ATTENTION_MODES, help="ours' attention")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    from flux2studio.conversion import transformer_config_to_diffusers, vae_config_to_diffusers
    from flux2studio.layouts.transformer import transformer_to_diffusers
    from flux2studio.layouts.vae import vae_to_diffusers
    from flux2studio.loading import load
    from flux2studio.pipeline import build_request
    from flux2studio.precision import describe_cpu

    pipe = load("nano", device="cpu", dtype=args.dtype, resident=True, attention=args.attention)
    dtype = pipe.dtype
    prompt = "a large red circle in the top left and a small blue square at the bottom right on a white background"
    req = build_request(pipe.variant, prompt, size=(args.size, args.size), seed=0)
    embeds = pipe.encode_prompts(req.prompts)

    t_cfg = {k: v for k, v in transformer_config_to_diffusers(pipe.variant.transformer).items() if k != "_class_name"}
    ref_t = Flux2Transformer2DModel(**t_cfg).to(dtype).eval()
    ref_t.load_state_dict(transformer_to_diffusers(pipe.transformer.state_dict()))
    v_cfg = {k: v for k, v in vae_config_to_diffusers(pipe.variant.vae).items() if k != "_class_name"}
    ref_vae = AutoencoderKLFlux2(**v_cfg).to(dtype).eval()
    ref_vae.load_state_dict(vae_to_diffusers(pipe.vae.state_dict(), pipe.variant.vae))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)
    ref = Flux2KleinPipeline(scheduler, ref_vae, None, None, ref_t, is_distilled=True)
    ref.set_progress_bar_config(disable=True)

    def ours() -> torch.Tensor:
        with torch.no_grad():
            latents = pipe.generate_latents(req)
            return pipe.decode(latents)

    def theirs() -> torch.Tensor:
        gen = [torch.Generator("cpu").manual_seed(0)]
        return ref(prompt_embeds=embeds, width=args.size, height=args.size, num_inference_steps=req.steps,
                   generator=gen, output_type="pt").images  # fmt: skip

    # encode_prompts is skipped in ours too: reuse the embeddings
    pipe.encode_prompts = lambda prompts: embeds  # type: ignore[method-assign]
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for _ in range(args.runs + 1):  # first round warms up
        for name, fn in (("ours", ours), ("diffusers", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ours_s = statistics.median(times["ours"][1:])
    ref_s = statistics.median(times["diffusers"][1:])
    print(f"nano {args.size}x{args.size}, {req.steps} steps, --dtype {args.dtype}: {str(dtype)[6:]} "
          f"({pipe.dtype_reason}), {args.threads} threads, median of {args.runs}; CPU: {describe_cpu()}")  # fmt: skip
    print("| pipeline | model time (s) | ratio |\n|---|---|---|")
    print(f"| flux2studio | {ours_s:.3f} | {ours_s / ref_s:.2f} |")
    print(f"| diffusers 0.42.1 | {ref_s:.3f} | 1.00 |")


if __name__ == "__main__":
    main()
