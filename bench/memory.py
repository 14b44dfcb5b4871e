"""Peak memory and phase times of one klein-4b generation: ours vs diffusers' Flux2KleinPipeline, on the
same diffusers-format folder, in one run, each in its own process.

The folder holds random weights in the real klein-4b shapes (transformer 3.88B, a Qwen3-4B-shaped text
encoder, the real VAE; bf16), written once by this script (about 16 GB; a byte-level BPE tokenizer with
Qwen's chat format stands in for Qwen's, which only changes the token ids, not the work: prompts are
padded to 512 tokens). Both sides generate one 512x512 image in 4 steps from the same prompt and seed.

    python bench/memory.py [--folder DIR] [--size 512] [--steps 4] [--only ours|diffusers] [--resident]
        [--attention auto|sdpa|kernel] [--dtype auto|bf16|fp32] [--avx2] [--repeat N]

Ours computes in --dtype (auto: bf16 where the CPU has AVX512-BF16/AMX, else fp32 on the bf16 weights);
diffusers in bf16, as its documentation loads FLUX.2 (fp32 would need the whole model widened: 32 GB).
--avx2 runs both as on a CPU without AVX-512 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2,
MKL_ENABLE_INSTRUCTIONS=AVX2: oneDNN's, ATen's and MKL's kernels (fp32 products) limited to AVX2; bf16 nn.Linear then
runs at ~20 GFLOP/s on 2 cores, as on such machines).

Peak RSS is the process's high-water mark (VmHWM), reset before each phase to get per-phase peaks. The
weight files are read once before each side runs, so both start with them in the page cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flux2studio.kernels import ATTENTION_MODES  # torch-free: the driver stays light

# bitsandbytes (diffusers imports it when it is installed) asks the Hugging Face Hub for a CPU kernel on AVX512-BF16
# machines: benchmarks never reach the Hub, here nor in the runs they start
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from flux2studio.precision import describe_cpu  # imports torch only when called

PROMPT = "a large red circle in the top left and a small blue square at the bottom right on a white background"
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)  # fmt: skip
QWEN3_8B = QWEN3_4B | dict(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)  # klein-9b's
TEXT_CONFIGS = {"klein-4b": QWEN3_4B, "klein-9b": QWEN3_8B}  # the variants `write_folder` writes
CHAT = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)
SHARD_BYTES = 2 * 2**30
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}  # --avx2


# ----------------------------------------------------------------------------- writing the folder


def write_random(folder: Path, stem: str, shapes: dict, index_name: str) -> None:
    """Random bf16 tensors (std 0.02; norms 1) in shards of ~2 GB with an index, as save_pretrained does."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key in keys:
            shape = shapes[key]
            if key.endswith("num_batches_tracked"):
                t = torch.zeros(shape, dtype=torch.int64)
            elif len(shape) == 1 and ("norm" in key or key.endswith("running_var")):
                t = torch.ones(shape, dtype=torch.bfloat16)
            elif len(shape) == 1:
                t = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * 2
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        print(f"  {folder.name}/{name}  {sum(t.numel() for t in tensors.values()) / 1e9:.2f}B", flush=True)
        del tensors
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def write_folder(folder: Path, variant_id: str = "klein-4b") -> None:
    """A diffusers folder of random weights in `variant_id`'s real shapes (a klein: TEXT_CONFIGS)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from flux2studio.conversion import transformer_config_to_diffusers, vae_config_to_diffusers
    from flux2studio.variants import get_variant

    variant = get_variant(variant_id)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(**transformer_config_to_diffusers(variant.transformer))
        vae = AutoencoderKLFlux2(**vae_config_to_diffusers(variant.vae))
        qcfg = Qwen3Config(**TEXT_CONFIGS[variant_id], torch_dtype="bfloat16")
        text = Qwen3ForCausalLM(qcfg)
    for name, model in (("transformer", transformer), ("vae", vae)):
        model.register_to_config(_diffusers_version="0.42.1")
        model.save_config(folder / name)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        write_random(folder / name, "diffusion_pytorch_model", shapes, "diffusion_pytorch_model.safetensors.index.json")
    qcfg.architectures = ["Qwen3ForCausalLM"]
    qcfg.save_pretrained(folder / "text_encoder")
    shapes = {k: tuple(v.shape) for k, v in text.state_dict().items() if k != "lm_head.weight"}  # unused
    write_random(folder / "text_encoder", "model", shapes, "model.safetensors.index.json")

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([PROMPT, "a photo of a cat, 35mm, golden hour", "You are a helpful assistant"], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", chat_template=CHAT,
                            padding_side="right").save_pretrained(folder / "tokenizer")  # fmt: skip
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential",
                                    shift=3.0).save_config(folder / "scheduler")  # fmt: skip
    index = {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1", "is_distilled": True,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3ForCausalLM"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLFlux2"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / ".complete").write_text("ok")


# ----------------------------------------------------------------------------- measuring (child process)


def rss_peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class Phases:
    """Wall time and peak RSS of consecutive phases, marked by `mark(name)` at each phase's end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self.t = time.perf_counter()
        reset_peak()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.rows.append((name, now - self.t, rss_peak_gb()))
        self.t = now
        reset_peak()


def mark_phases(pipe, ph: Phases) -> None:
    """End a phase each time the pipeline releases a part: text encoder (encode), transformer (denoise), VAE."""
    release = pipe.release
    names = {"text_encoder": "encode", "transformer": "denoise", "vae": "decode"}

    def marked(*parts: str) -> None:
        release(*parts)
        for part in parts:
            if part in names and not any(r[0] == names[part] for r in ph.rows):
                ph.mark(names[part])

    pipe.release = marked


def run_ours(
    folder: Path, size: int, steps: int, png: Path, resident: bool = False, attention: str = "auto", dtype: str = "auto"
) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen3Model  # noqa: F401

    from flux2studio.loading import load

    # Both sides start the clock with their libraries imported: `from diffusers import Flux2KleinPipeline`
    # has imported transformers' Qwen3 and tokenizer modules before diffusers' clock starts.
    torch.manual_seed(0)
    ph = Phases()
    pipe = load("klein-4b", weights=folder, device="cpu", dtype=dtype, resident=resident, attention=attention)
    ph.mark("load")
    mark_phases(pipe, ph)
    step_times = []
    images = pipe(
        PROMPT, size=(size, size), steps=steps, seed=0, callback=lambda i, n, x: step_times.append(time.perf_counter())
    )
    images[0].save(png)
    return {"phases": ph.rows, "steps": step_times, "attention": pipe.attention, "dtype": str(pipe.dtype)[6:]}


def run_diffusers(folder: Path, size: int, steps: int, png: Path) -> dict:
    import torch
    from diffusers import Flux2KleinPipeline

    ph = Phases()
    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ph.mark("load")
    encode = pipe.encode_prompt

    def timed_encode(*a, **kw):
        out = encode(*a, **kw)
        ph.mark("encode")
        return out

    pipe.encode_prompt = timed_encode
    step_times = []

    def on_step(p, i, t, kw):
        step_times.append(time.perf_counter())
        if i == steps - 1:
            ph.mark("denoise")
        return kw

    out = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=1.0,
               generator=[torch.Generator("cpu").manual_seed(0)], callback_on_step_end=on_step)  # fmt: skip
    ph.mark("decode")
    out.images[0].save(png)
    return {"phases": ph.rows, "steps": step_times}


# ----------------------------------------------------------------------------- driver


def report(results: dict, pngs: dict) -> None:
    def peak(r: dict) -> float:
        return max(p for _, _, p in r["phases"])

    print("\n| | load | encode | denoise (per step) | decode | total | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for impl, r in results.items():
        label = f"{impl} ({r['dtype']}, attention: {r['attention']})" if "attention" in r else f"{impl} (bfloat16)"
        ph = {name: (t, p) for name, t, p in r["phases"]}
        per_step = [b - a for a, b in zip(r["steps"], r["steps"][1:], strict=False)]
        step = sum(per_step) / len(per_step) if per_step else float("nan")
        cells = [f"{ph[n][0]:.1f} s ({ph[n][1]:.1f} GB)" for n in ("load", "encode")]
        cells.append(f"{ph['denoise'][0]:.1f} s ({step:.1f} s/step, {ph['denoise'][1]:.1f} GB)")
        cells.append(f"{ph['decode'][0]:.1f} s ({ph['decode'][1]:.1f} GB)")
        print(f"| {label} | " + " | ".join(cells) + f" | {total(r):.1f} s | {peak(r):.2f} GB |")
    if {"ours", "diffusers"} <= set(results):
        o, d = results["ours"], results["diffusers"]
        print(f"\nratio ours/diffusers: peak RSS {peak(o) / peak(d):.2f}, "
              f"time load+generate {total(o) / total(d):.2f}, "
              f"ours load+generate vs diffusers generate only {total(o) / total(d, skip_load=True):.2f}")  # fmt: skip
        import numpy as np
        from PIL import Image

        a, b = (np.asarray(Image.open(pngs[k]), dtype=np.int16) for k in ("ours", "diffusers"))
        diff = np.abs(a - b)
        print(f"images ours vs diffusers: max {diff.max()}/255 per channel, mean {diff.mean():.3f}/255, "
              f"{(diff > 1).mean():.2%} of values differ by more than 1")  # fmt: skip


def warm_page_cache(folder: Path) -> None:
    """Read every weight file once (not counted in any process's RSS), so disk speed does not decide."""
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass


def total(r: dict, skip_load: bool = False) -> float:
    return sum(t for name, t, _ in r["phases"] if not (skip_load and name == "load"))


def run_child(impl: str, args: argparse.Namespace, png: Path) -> dict:
    """One generation by `impl` in its own process, after warming the page cache (and building our kernel)."""
    warm_page_cache(args.folder)  # both sides start with the files in the page cache, as after a first run
    if impl == "ours":  # and with our attention kernel built, as after a first run (~1 s, once per version)
        from flux2studio.checkpoints import cache_dir
        from flux2studio.kernels.attention import unavailable_reason

        unavailable_reason(cache_dir())
    cmd = [sys.executable, __file__, "--child", impl, "--folder", str(args.folder), "--size", str(args.size),
           "--steps", str(args.steps), "--attention", args.attention, "--dtype", args.dtype,
           "--png", str(png)]  # fmt: skip
    cmd += ["--resident"] if args.resident else []
    env = os.environ | (AVX2_ONLY if args.avx2 else {})
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    home = Path(os.environ.get("FLUX2_HOME", Path.home() / ".cache" / "flux2studio"))
    parser.add_argument("--folder", type=Path, default=home / "bench" / "klein-4b-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=["ours", "diffusers"])
    parser.add_argument("--resident", action="store_true", help="ours with resident=True (no streaming)")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_MODES, help="ours' attention")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="ours' compute dtype")
    parser.add_argument("--avx2", action="store_true", help="run as on an AVX2-only CPU (env caps, see above)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (order alternating); medians reported")
    parser.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        if args.child == "ours":
            result = run_ours(args.folder, args.size, args.steps, args.png, args.resident, args.attention, args.dtype)
        else:
            result = run_diffusers(args.folder, args.size, args.steps, args.png)
        print("RESULT " + json.dumps(result))
        return
    if not (args.folder / ".complete").exists():
        print(f"writing random klein-4b-shaped weights to {args.folder} (once, ~16 GB)", flush=True)
        write_folder(args.folder)
    tmp = Path(tempfile.mkdtemp(prefix="flux2-bench-"))
    impls = [args.only] if args.only else ["ours", "diffusers"]
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for r in range(args.repeat):  # alternate the order, so that a drift of the machine's speed hits both sides
        for impl in impls if r % 2 == 0 else impls[::-1]:
            runs[impl].append(run_child(impl, args, tmp / f"{impl}.png"))
            print(f"{impl}: done ({total(runs[impl][-1]):.1f} s)", flush=True)
    # the table shows each side's median run
    results = {impl: sorted(rs, key=total)[len(rs) // 2] for impl, rs in runs.items()}
    print(f"klein-4b shapes, random bf16 weights, {args.size}x{args.size}, {args.steps} steps, CPU, "
          f"{os.cpu_count()} cores; CPU features: {describe_cpu()}"
          f"{' (children capped at AVX2)' if args.avx2 else ''}")  # fmt: skip
    report(results, {impl: tmp / f"{impl}.png" for impl in impls})
    if args.repeat > 1:
        for impl, rs in runs.items():
            print(f"{impl} totals: " + ", ".join(f"{total(r):.1f} s" for r in rs))
        if len(impls) == 2:
            ratios = [total(o) / total(d) for o, d in zip(runs["ours"], runs["diffusers"], strict=True)]
            print("ratio per round: " + ", ".join(f"{x:.3f}" for x in ratios)
                  + f"; ratio of the medians {total(results['ours']) / total(results['diffusers']):.3f}")  # fmt: skip
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
