"""One GPU, within 5 minutes: klein-4b shapes at 1024x1024, 4 steps. Ours resident, ours resident with
`--quantize fp8` (fp8 products where the GPU has fp8 units: compute capability 8.9+) and with `--compile` (the
first call's time includes compiling), ours streamed under device
budgets (--budgets, default 4, 8 and 12 GB), diffusers' Flux2KleinPipeline plain, with enable_model_cpu_offload
and with group offload (block level, CUDA streams): per phase time, peak VRAM (max allocated and reserved), and
every image compared with ours resident. Each run is a process, stopped after --timeout seconds (reported so).
A streamed run also reports what its budget's plan gave the largest phase ("planned": weights and the estimated
work memory, `work_memory`): the estimate's check against the measured peak.

Random weights in the real shapes are built in memory from one seed in each run's own process (no files to
write: the same numbers everywhere), bf16. The first call of each run is a warm-up at the same size (CUDA's
kernels, cuDNN autotuning); the figures are the second call.

    python bench/gpu.py [--size 1024] [--steps 4] [--budgets 4,8,12] [--runs ...]
    python bench/gpu.py --tiny --device cpu     # a smoke run of the script itself on tiny shapes (CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import PROMPT, QWEN3_4B

DIFFUSERS_RUNS = ("diffusers", "diffusers-cpu-offload", "diffusers-group-offload")
RESIDENT_RUNS = ("ours", "ours-fp8", "ours-compile")  # ours without a budget


def models(tiny: bool):
    """Ours (transformer, VAE) and a Qwen3 text encoder with random bf16 weights from seed 0, and the variant."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    from flux2studio.model.autoencoder import AutoEncoder
    from flux2studio.model.transformer import Flux2Transformer
    from flux2studio.variants import get_variant

    variant = get_variant("klein-4b")
    text_cfg = QWEN3_4B
    if tiny:  # a few small layers, same structure
        t = dataclasses.replace(variant.transformer, hidden_size=128, num_heads=2, depth=1, depth_single=2,
                                context_dim=3 * 64, axes_dim=(16, 16, 16, 16))  # fmt: skip
        spec = dataclasses.replace(variant.text_encoder, layers=(1, 2, 3), hidden_size=64)
        variant = dataclasses.replace(variant, transformer=t, text_encoder=spec,
                                      vae=dataclasses.replace(variant.vae, channels=(32, 32, 32, 32),
                                                              num_res_blocks=1))  # fmt: skip
        text_cfg = QWEN3_4B | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=32)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    pool = 2**25  # random values drawn once and laid into every weight from a different offset (drawing 7.9B
    ring = (torch.randn(pool, generator=g) * 0.02).to(torch.bfloat16).repeat(2)  # values took ~40 s a run)
    with torch.device("meta"):
        parts = (Flux2Transformer(variant.transformer), AutoEncoder(variant.vae),
                 Qwen3Model(Qwen3Config(**text_cfg)))  # fmt: skip
    built = []
    for module in parts:
        module = module.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for name, b in module.named_buffers():  # the VAE's latent statistics: mean 0, variance 1
                b.fill_(1 if name.endswith("running_var") else 0)
            for k, (name, p) in enumerate(module.named_parameters()):
                if p.ndim == 1:
                    p.fill_(1.0 if "norm" in name or "scale" in name else 0.0)
                    continue
                flat, start = p.view(-1), (k * 1_000_003) % pool
                for done in range(0, flat.numel(), pool):
                    n = min(pool, flat.numel() - done)
                    flat[done : done + n].copy_(ring[start : start + n])
        built.append(module.eval())
    built[2].rotary_emb = type(built[2].rotary_emb)(config=built[2].config)  # computed buffers
    return variant, *built


def tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from memory import CHAT

    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([PROMPT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", chat_template=CHAT,
                                   padding_side="right")  # fmt: skip


def memory(device) -> tuple[float, float]:
    import torch

    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(args, budget: float | None) -> dict:
    import torch

    from flux2studio.pipeline import Pipeline
    from flux2studio.text_encoders import TextEncoder

    device = torch.device(args.device)
    variant, transformer, vae, text = models(args.tiny)
    if args.child == "ours-fp8":  # `--quantize fp8`: fp8 rows, one fp8 product a layer on GPUs with fp8 units
        from flux2studio.quantize import quantize_modules
        from flux2studio.quantized_files import text_encoder_quantizable, transformer_quantizable

        quantize_modules(transformer, "fp8", transformer_quantizable)
        quantize_modules(text, "fp8", text_encoder_quantizable)
    encoder = TextEncoder(variant.text_encoder, text, tokenizer())
    if budget is None:
        encoder.model.to(device)
    pipe = Pipeline(variant, transformer, vae, encoder, device=device, dtype=torch.bfloat16,
                    vram_budget=None if budget is None else int(budget * 2**30))  # fmt: skip
    pipe.compile = args.child == "ours-compile"  # `--compile`: the blocks through torch.compile
    phases: dict[str, float] = {}
    release = pipe.release
    mark = [time.perf_counter()]

    def timed(*names: str) -> None:
        sync(device)
        now = time.perf_counter()
        phases[names[0]] = now - mark[0]
        mark[0] = now
        release(*names)

    pipe.release = timed
    pipe.prompt_cache.limit = 0  # the measured call encodes its prompt, as diffusers' does
    size = (args.size, args.size)
    first = time.perf_counter()
    pipe(PROMPT, size=size, steps=args.steps, seed=0)  # warm-up (and, compiled, the compiling)
    sync(device)
    first = time.perf_counter() - first
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the peaks below are the measured call's, not the warm-up's cache
        torch.cuda.reset_peak_memory_stats(device)
    phases.clear()
    sync(device)
    started = mark[0] = time.perf_counter()
    image = pipe(PROMPT, size=size, steps=args.steps, seed=0)[0]
    sync(device)
    total = time.perf_counter() - started
    image.save(args.png)
    names = {"text_encoder": "encode", "transformer": "denoise", "vae": "decode"}
    return {
        "total": total,
        "phases": {names.get(k, k): v for k, v in phases.items()},
        "vram": memory(device),
        "first": first,
        "planned": max(pipe.planned.values(), default=0) / 2**30,  # weights and work memory, the largest phase
    }


def run_diffusers(args, mode: str) -> dict:
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    from flux2studio.conversion import transformer_config_to_diffusers, vae_config_to_diffusers
    from flux2studio.layouts.transformer import transformer_to_diffusers
    from flux2studio.layouts.vae import vae_to_diffusers

    device = torch.device(args.device)
    variant, transformer, vae, text = models(args.tiny)
    with torch.device("meta"):
        theirs_t = Flux2Transformer2DModel(**transformer_config_to_diffusers(variant.transformer))
        theirs_v = AutoencoderKLFlux2(**vae_config_to_diffusers(variant.vae))
    theirs_t.load_state_dict(transformer_to_diffusers(transformer.state_dict()), assign=True)
    theirs_v.load_state_dict(vae_to_diffusers(vae.state_dict(), variant.vae), assign=True)
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(text.config)
    lm.model = text
    lm.lm_head = torch.nn.Linear(text.config.hidden_size, text.config.vocab_size, bias=False, device="meta")
    lm.lm_head.weight = text.embed_tokens.weight  # tied, as in Qwen3-4B
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", shift=3.0)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=theirs_v.eval(), text_encoder=lm.eval(), tokenizer=tokenizer(),
                              transformer=theirs_t.eval(), is_distilled=True)  # fmt: skip
    if mode == "diffusers":
        pipe.to(device)
    elif mode == "diffusers-cpu-offload":
        pipe.enable_model_cpu_offload(device=device)
    else:
        for module in (pipe.transformer, pipe.vae):
            module.enable_group_offload(device, offload_device=torch.device("cpu"), offload_type="block_level",
                                        num_blocks_per_group=1, use_stream=device.type == "cuda")  # fmt: skip
        from diffusers.hooks import apply_group_offloading

        # on the decoder stack: block level groups a top-level ModuleList only (Qwen3's layers are under `.model`)
        apply_group_offloading(pipe.text_encoder.model, onload_device=device, offload_type="block_level",
                               num_blocks_per_group=1, use_stream=device.type == "cuda")  # fmt: skip
    kw = dict(
        prompt=PROMPT,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=1.0,
        text_encoder_out_layers=tuple(variant.text_encoder.layers),
    )
    pipe(**kw, generator=torch.Generator("cpu").manual_seed(0))  # warm-up
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the peaks below are the measured call's, not the warm-up's cache
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    started = time.perf_counter()
    image = pipe(**kw, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    sync(device)
    total = time.perf_counter() - started
    image.save(args.png)
    return {"total": total, "phases": {}, "vram": memory(device)}


def child(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if args.child.startswith("diffusers"):
        return run_diffusers(args, args.child)
    budget = None if args.child in RESIDENT_RUNS else float(args.child.removeprefix("ours-"))
    return run_ours(args, budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--budgets", default="4,8,12", help="GB: ours streamed under each")
    parser.add_argument("--runs", help="comma-separated: " + ", ".join([*RESIDENT_RUNS, "ours-GB", *DIFFUSERS_RUNS]))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=int, default=120, help="seconds a run may take before it is reported so")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check the script itself, anywhere")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    import torch

    runs = (args.runs.split(",") if args.runs else
            [*RESIDENT_RUNS, *(f"ours-{b}" for b in args.budgets.split(",")), *DIFFUSERS_RUNS])  # fmt: skip
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="flux2-gpu-") as folder:  # the images, compared and then removed
        tmp = Path(folder)
        results = {}
        for run in runs:
            cmd = [sys.executable, __file__, "--child", run, "--size", str(args.size), "--steps", str(args.steps),
                   "--device", args.device, "--png", str(tmp / f"{run}.png")]  # fmt: skip
            cmd += ["--tiny"] if args.tiny else []
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                out = subprocess.CompletedProcess(cmd, -9, "", f"stopped after {args.timeout} s")
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
                results[run] = {"failed": last}
            else:
                results[run] = json.loads(line[0][7:])
            done = results[run].get("failed") or f"{results[run]['total']:.2f} s"
            print(f"{run}: {done}", flush=True)
        report(results, tmp, args, name)


def report(results: dict, tmp: Path, args, name: str) -> None:
    import numpy as np
    from PIL import Image

    print(f"\n{name}; klein-4b shapes{' (tiny)' if args.tiny else ''}, random bf16 weights, {args.size}x{args.size}, "
          f"{args.steps} steps; figures from the second call")  # fmt: skip
    print("\n| run | total | encode | denoise | decode | first call | peak VRAM allocated / reserved | planned "
          "| vs ours resident |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = tmp / "ours.png"
    for run, r in results.items():
        if "failed" in r:
            print(f"| {run} | failed: {r['failed'][:80]} | | | | | | | |")
            continue
        ph = r["phases"]
        cells = [f"{ph[k]:.2f} s" if k in ph else "" for k in ("encode", "denoise", "decode")]
        cells.append(f"{r['first']:.2f} s" if "first" in r else "")
        diff = ""
        if base.exists() and (tmp / f"{run}.png").exists():
            a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (base, tmp / f"{run}.png"))
            diff = f"max {np.abs(a - b).max()}/255, mean {np.abs(a - b).mean():.2f}"
        alloc, reserved = r["vram"]
        planned = f"{r['planned']:.2f} GB" if r.get("planned") else ""  # the budget's plan: weights and work
        print(f"| {run} | {r['total']:.2f} s | " + " | ".join(cells) + f" | {alloc:.2f} / {reserved:.2f} GB | "
              f"{planned} | {diff} |")  # fmt: skip


if __name__ == "__main__":
    main()
