"""The big models on this machine's CPU: klein-9b (and klein-9b-kv) in bf16 and int8, and dev in 4-bit, per phase
time and peak RSS, and diffusers' pipeline where it fits (an out-of-memory kill is a result, not a crash).

Random weights in the real shapes, written once:
  klein-9b-random/          diffusers folder (bench/memory.py's writer): transformer 9.1B, a Qwen3-8B-shaped text
                            encoder, the VAE; bf16, ~35 GB
  klein-9b-random-files/    the transformer packed int8 (`flux2 convert --to bfl --quantize int8`), ae.safetensors,
                            te/ (the text encoder with its tokenizer) and te-int8/ (its layers saved packed int8)
  dev-random-q4_0/          dev written directly in 4-bit (Q4_0 blocks generated packed, never bf16 on disk): the
                            transformer (32.2B, BFL names) and a Mistral-Small-24B-shaped text encoder (40 layers)
Runs: ours:bf16 (the folder), ours:int8 (packed transformer; text encoder packed as it loads), ours:int8-files
(both saved packed), ours-kv:bf16 (klein-9b-kv with one reference), diffusers:bf16 (Flux2KleinPipeline on the
folder), ours-dev:int4. One image of --size² in --steps steps from the same prompt and seed; each run in its own
process, which the kernel's OOM killer is told to take first (`oom_score_adj` 1000). The files are larger than
the page cache, so runs read them from disk as a first generation does. Figures are kept per run in
klein-9b-random-files/results-SIZE-STEPS.json and the table printed from all kept runs.

    python bench/big.py [--size 256] [--steps 2] [--runs ours:bf16,ours:int8,...]

Peak RSS per phase: the process's high-water mark (VmHWM), reset at each phase's start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flux2studio.precision import describe_cpu
from memory import PROMPT, Phases, write_folder

RUNS = ("ours:bf16", "ours:int8", "ours:int8-files", "ours-kv:bf16", "diffusers:bf16", "ours-dev:int4")
# Mistral-Small-3.2-24B's text model (dev's text encoder), the shapes of its config
MISTRAL_24B = dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=1_000_000_000.0)  # fmt: skip
MISTRAL_CHAT = (  # Mistral-Small's chat format, reduced to what FLUX.2 sends (system prompt, one user turn)
    "<s>{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{%- else %}[INST]{{ m['content'][0]['text'] }}[/INST]{%- endif %}{%- endfor %}"
)


def run_ours(folder: Path, variant: str, mode: str, size: int, steps: int, png: Path) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer, Qwen3Model  # noqa: F401  (imported before the clock)

    from flux2studio.loading import load

    torch.manual_seed(0)
    ph = Phases()
    if variant == "dev":  # 4-bit files: the transformer and the text encoder stored packed (Q4_0)
        dev = dev_folder(folder)
        pipe = load("dev", weights=dev / "dev-Q4_0.safetensors", vae=dev / "ae.safetensors",
                    text_encoder=dev / "text_encoder", device="cpu")  # fmt: skip
    elif mode.startswith("int8"):  # the packed transformer file; the text encoder packed as it loads, or saved so
        files = files_of(folder)
        te, quantize = (files / "te-int8", None) if mode == "int8-files" else (files / "te", "int8")
        pipe = load(variant, weights=files / "klein-9b-int8.safetensors", vae=files / "ae.safetensors",
                    text_encoder=te, quantize=quantize, device="cpu")  # fmt: skip
    else:
        pipe = load(variant, weights=folder, device="cpu", dtype=mode)
    ph.mark("load")
    release = pipe.release

    def marked(*parts: str) -> None:  # a phase ends as its part is released (the VAE first encodes a reference)
        release(*parts)
        for part in parts:
            done = {r[0] for r in ph.rows}
            name = {"text_encoder": "encode", "transformer": "denoise"}.get(part)
            name = name or ("decode" if "denoise" in done else "reference")
            if name not in done:
                ph.mark(name)

    pipe.release = marked
    refs = [Image.new("RGB", (size, size), (200, 60, 40))] if variant.endswith("-kv") else []
    step_times: list[float] = []
    images = pipe(PROMPT, size=(size, size), steps=steps, seed=0, refs=refs,
                  callback=lambda i, n, x: step_times.append(time.perf_counter()))  # fmt: skip
    images[0].save(png)
    return {"phases": ph.rows, "steps": step_times, "dtype": str(pipe.dtype)[6:], "quantize": pipe.quantize}


def run_diffusers(folder: Path, size: int, steps: int, png: Path) -> dict:
    import torch
    from diffusers import Flux2KleinPipeline

    ph = Phases()
    pipe = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    ph.mark("load")
    step_times: list[float] = []

    def on_step(p, i, t, kw):
        step_times.append(time.perf_counter())
        return kw

    out = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=1.0,
               generator=[torch.Generator("cpu").manual_seed(0)], callback_on_step_end=on_step)  # fmt: skip
    ph.mark("generate")
    out.images[0].save(png)
    return {"phases": ph.rows, "steps": step_times, "dtype": "bfloat16"}


def files_of(folder: Path) -> Path:
    """Single files derived from the folder: the packed transformer, ae.safetensors, te/ (text encoder + tokenizer)."""
    return folder.parent / f"{folder.name}-files"


def dev_folder(folder: Path) -> Path:
    return folder.parent / "dev-random-q4_0"


def write_random_packed(path: Path, shapes: dict, eligible, what: str) -> None:
    """A safetensors file of random weights in `shapes`, the eligible 2-D ones generated directly as Q4_0 blocks
    (an fp16 scale and 32 4-bit values: weights within about +-0.02; formats in the metadata, as `flux2 convert
    --quantize int4` writes them), written tensor by tensor (`write_quantized` makes each as it writes it): neither
    the bf16 model nor the packed one is ever whole in memory (~18 GB for dev's transformer)."""
    import torch

    from flux2studio.lazy_tensors import pending
    from flux2studio.quantize import row_bytes
    from flux2studio.quantized_files import write_quantized

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.0025], dtype=torch.float16).view(torch.uint8)

    def q4_0(rows: int, cols: int) -> torch.Tensor:
        t = torch.randint(0, 256, (rows, cols // 32, 18), dtype=torch.uint8, generator=g)
        t[..., :2] = scale
        return t.reshape(rows, -1)

    def plain(shape: tuple[int, ...], norm: bool) -> torch.Tensor:
        if len(shape) == 1:
            return (torch.ones if norm else torch.zeros)(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    sd, formats = {}, {}
    for key, shape in shapes.items():  # (made in this order as written: the same random stream as before)
        name = key.removesuffix(".weight")
        if key.endswith(".weight") and len(shape) == 2 and eligible(name) and shape[1] % 32 == 0:
            sd[key] = pending(q4_0, *shape, shape=(shape[0], row_bytes("Q4_0", shape[1])), dtype=torch.uint8)
            formats[name] = "Q4_0"
        else:
            sd[key] = pending(plain, shape, "norm" in key, shape=shape, dtype=torch.bfloat16)
    write_quantized(sd, formats, path)
    print(f"  {path.name}: {what}, {sum(v.nbytes for v in sd.values()) / 2**30:.1f} GiB", flush=True)


def prepare_dev(folder: Path) -> None:
    """dev in 4-bit, written directly packed: the transformer (BFL names, 32.2B) and a Mistral-Small-24B-shaped
    text encoder (all 40 layers; ~32 GB in all), with klein-9b's VAE and (byte-level BPE) tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Mistral3Config, MistralConfig, MistralModel, PixtralVisionConfig, PreTrainedTokenizerFast

    from flux2studio.model.transformer import Flux2Transformer
    from flux2studio.quantized_files import text_encoder_quantizable, transformer_quantizable
    from flux2studio.variants import get_variant

    dev = dev_folder(folder)
    if (dev / ".complete").exists():
        return
    (dev / "text_encoder").mkdir(parents=True, exist_ok=True)
    print(f"writing random dev-shaped 4-bit weights to {dev} (once, ~32 GB)", flush=True)
    if not (dev / "ae.safetensors").exists():
        (dev / "ae.safetensors").symlink_to(files_of(folder) / "ae.safetensors")
    with torch.device("meta"):
        transformer = Flux2Transformer(get_variant("dev").transformer)
        text = MistralModel(MistralConfig(**MISTRAL_24B))
    if not (dev / "dev-Q4_0.safetensors").exists():
        shapes = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
        write_random_packed(dev / "dev-Q4_0.safetensors", shapes, transformer_quantizable, "transformer")
    te = dev / "text_encoder"
    Mistral3Config(text_config=MistralConfig(**MISTRAL_24B), vision_config=PixtralVisionConfig(),
                   torch_dtype="bfloat16").save_pretrained(te)  # fmt: skip
    prefix = "model.language_model."
    shapes = {prefix + k: tuple(v.shape) for k, v in text.state_dict().items()}
    eligible = lambda n: text_encoder_quantizable(n.removeprefix(prefix))  # noqa: E731
    write_random_packed(te / "model.safetensors", shapes, eligible, "text encoder")
    tok = Tokenizer.from_file(str(files_of(folder) / "te-int8" / "tokenizer" / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", chat_template=MISTRAL_CHAT,
                            padding_side="right").save_pretrained(te)  # fmt: skip
    (dev / ".complete").write_text("ok")


def prepare(folder: Path) -> None:
    from flux2studio.conversion import convert

    if not (folder / ".complete").exists():
        print(f"writing random klein-9b-shaped weights to {folder} (once, ~35 GB)", flush=True)
        write_folder(folder, "klein-9b")
    files = files_of(folder)
    files.mkdir(exist_ok=True)
    for name, src, quantize in (("klein-9b-int8.safetensors", "transformer", "int8"), ("ae.safetensors", "vae", None)):
        if not (files / name).exists():
            print(f"writing {files / name}", flush=True)
            print("  " + convert(folder / src, files / name, "bfl", quantize), flush=True)
    if not (files / "te").exists():
        (files / "te").mkdir()
        for f in (folder / "text_encoder").iterdir():
            (files / "te" / f.name).symlink_to(f)
        (files / "te" / "tokenizer").symlink_to(folder / "tokenizer")
    if not (files / "te-int8").exists():  # the text encoder's layers saved packed (`flux2 convert`)
        import shutil

        print(f"writing {files / 'te-int8'}", flush=True)
        print("  " + convert(folder / "text_encoder", files / "te-int8", "bfl", "int8"), flush=True)
        shutil.copytree(folder / "tokenizer", files / "te-int8" / "tokenizer")  # a copy: the folder may go later


def run_child(run: str, args: argparse.Namespace, png: Path) -> dict:
    """One run in its own process; killed by the kernel for memory = {"oom": ...}, not a failure of the bench."""
    cmd = [sys.executable, __file__, "--child", run, "--folder", str(args.folder), "--size", str(args.size),
           "--steps", str(args.steps), "--png", str(png)]  # fmt: skip
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode == -9 or "MemoryError" in out.stderr or "out of memory" in out.stderr.lower():
        return {"oom": f"killed for memory after {time.perf_counter() - started:.0f} s"}
    if out.returncode or not line:
        return {"failed": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(line[0][7:])


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(f"\nklein-9b shapes, random weights, {args.size}x{args.size}, {args.steps} steps, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM; CPU features: "
          f"{describe_cpu()}")  # fmt: skip
    print("\n| run | load | encode (+ reference) | denoise (per step) | decode | total | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run, r in results.items():
        if "oom" in r or "failed" in r:
            print(f"| {run} | | | | | {r.get('oom') or r['failed']} | {'out of memory' if 'oom' in r else 'failed'} |")
            continue
        ph = {name: (t, p) for name, t, p in r["phases"]}
        steps = [b - a for a, b in zip(r["steps"], r["steps"][1:], strict=False)]
        per_step = f"{sum(steps) / len(steps):.1f} s/step, " if steps else ""
        cells = []
        for name in ("load", "encode", "denoise", "decode"):
            if name not in ph:  # diffusers: one "generate" phase
                cells.append("")
                continue
            t, peak = ph[name]
            if name == "encode" and "reference" in ph:
                t, peak = t + ph["reference"][0], max(peak, ph["reference"][1])
            cells.append(f"{t:.1f} s ({per_step if name == 'denoise' else ''}{peak:.2f} GB)")
        if "generate" in ph:
            cells[1] = f"generate {ph['generate'][0]:.1f} s ({ph['generate'][1]:.2f} GB)"
        total = sum(t for _, t, _ in r["phases"])
        peak = max(p for _, _, p in r["phases"])
        label = f"{run} ({r['dtype']}{', ' + r['quantize'] if r.get('quantize') else ''})"
        print(f"| {label} | " + " | ".join(cells) + f" | {total:.1f} s | {peak:.2f} GB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    home = Path(os.environ.get("FLUX2_HOME", Path.home() / ".cache" / "flux2studio"))
    parser.add_argument("--folder", type=Path, default=home / "bench" / "klein-9b-random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path("/proc/self/oom_score_adj").write_text("1000")  # the kernel takes this process first
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        impl, mode = args.child.split(":")
        if impl == "diffusers":
            result = run_diffusers(args.folder, args.size, args.steps, args.png)
        else:
            variant = {"ours-kv": "klein-9b-kv", "ours-dev": "dev"}.get(impl, "klein-9b")
            result = run_ours(args.folder, variant, mode, args.size, args.steps, args.png)
        print("RESULT " + json.dumps(result))
        return
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := [r for r in runs if r not in RUNS]:
        raise SystemExit(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    if any(r != "ours-dev:int4" for r in runs):  # (dev's files need only the derived files: the folder may be gone)
        prepare(args.folder)
    if "ours-dev:int4" in runs:
        prepare_dev(args.folder)
    with tempfile.TemporaryDirectory(prefix="flux2-big-") as folder:  # the images, compared and then removed
        tmp = Path(folder)
        saved = files_of(args.folder) / f"results-{args.size}-{args.steps}.json"  # kept: figures survive the next run
        results = json.loads(saved.read_text()) if saved.exists() else {}
        for run in runs:
            results[run] = run_child(run, args, tmp / f"{run.replace(':', '-')}.png")
            saved.write_text(json.dumps(results, indent=1))
            print(f"{run}: {results[run].get('oom') or 'done'}", flush=True)
        report({r: results[r] for r in RUNS if r in results}, args)


if __name__ == "__main__":
    main()
