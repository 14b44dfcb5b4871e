"""Side by side on this CPU: ours in every precision mode, diffusers, and stable-diffusion.cpp, in one run.

klein-4b shapes with random weights (the folder bench/memory.py writes, ~16 GB, written once), one image of
--size² in --steps steps, 2 threads each (or --threads), each run in its own process with the weight files
in the page cache. Files derived once from the folder (beside it, in `<folder>-files/`):
  ae.safetensors                  the VAE in BFL layout (`flux2 convert --to bfl`)
  klein-int8.safetensors / -int4  the transformer packed (`flux2 convert --to bfl --quantize int8|int4`)
  klein-{F16,Q8_0,Q4_0}.gguf      the transformer as GGUF (`flux2 convert --to gguf --quantize ...`): the files
                                  both we and stable-diffusion.cpp load
  qwen3-4b.safetensors            the text encoder's shards in one file (stable-diffusion.cpp's --llm)
  te/                             the text encoder folder with its tokenizer (ours, for single files)
  te-int8/ / te-int4/             the text encoder's layers saved packed (`flux2 convert TE DST --quantize`)
  klein-bnb-nf4/                  the folder with its transformer's and text encoder's linear layers in
                                  bitsandbytes NF4 (double-quantized absmax), as diffusers and transformers
                                  save `BitsAndBytesConfig(load_in_4bit=True, ...)` (e.g. FLUX.2-dev-bnb-4bit)
  klein-nvfp4.safetensors         the transformer as BFL's flux-2-klein-*-nvfp4 files are: BFL names, the
                                  blocks' linear layers in ComfyUI's nvfp4 (comfy-kitchen writes them), the rest bf16
  klein-comfy-int8.safetensors    the same in ComfyUI's int8 with ConvRot (a scale a row, groups of 256 inputs
                                  rotated), as the community's flux-2-klein-9b-int8-convrot

Modes. ours: auto / fp32 / bf16 (the diffusers folder), int8 / int4 (the packed files and text encoder: what `flux2
convert --quantize` writes once; packing at load costs 20-45 s a run), gguf-q8_0 / gguf-q4_0 (the GGUF files; text
encoder as auto), bnb-nf4 (the bitsandbytes folder; not run by default), nvfp4 (the nvfp4 file, text encoder as
auto; not run by default), comfy-int8 (the ComfyUI int8 file, text encoder as int8; not run by default); "-resident"
(auto-resident, int8-resident): every part kept loaded between phases, as a server keeps them (int8: oneDNN's
prepacked kernel); "-compile" (e.g. int8-resident-compile, not run by default): `--compile`, its step time taken
after the first step compiled; "-again" (e.g. auto-again, not run by default): the call timed is the second with the
prompt, after one with another seed (`caches.py`). Only the files the chosen runs read are derived. diffusers:
`Flux2KleinPipeline` in bf16. stable-diffusion.cpp (`pip install stable-diffusion-cpp-python`, built from source by
pip; the `bench` extra): the GGUF files at F16 / Q8_0 / Q4_0 with the text encoder at the same type (`wtype`), VAE
and text encoder from the same files. Its phases come from its own log lines.

    python bench/cpu.py [--size 256] [--steps 2] [--modes ours:auto,sdcpp:q8_0,...] [--avx2]
        [--sdcpp-path DIR]

--avx2 caps our and diffusers' PyTorch kernels at AVX2 (see bench/memory.py); stable-diffusion.cpp picks its
kernels when it is compiled, so pass --sdcpp-path with a build made with -DGGML_NATIVE=OFF -DGGML_AVX512=OFF
(installed with `pip install --target DIR`) to compare AVX2 with AVX2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flux2studio.precision import describe_cpu
from memory import AVX2_ONLY, PROMPT, Phases, mark_phases, reset_peak, rss_peak_gb, write_folder

OURS = ("auto", "auto-resident", "fp32", "bf16", "int8", "int8-resident", "int4", "gguf-q8_0", "gguf-q4_0")
SDCPP = ("f16", "q8_0", "q4_0")
DEFAULT_MODES = [f"ours:{m}" for m in OURS] + ["diffusers:bf16"] + [f"sdcpp:{m}" for m in SDCPP]
# also runnable, not in the default set: any ours mode + "-compile" (`--compile`; a step is timed after compiling)
# or + "-again" (the prompt's second call timed)
# matching precisions: (ours, theirs) pairs whose ratio the report prints
PAIRS = [
    ("ours:auto", "sdcpp:q8_0"),
    ("ours:auto", "sdcpp:f16"),
    ("ours:bf16", "diffusers:bf16"),
    ("ours:auto", "diffusers:bf16"),
    ("ours:auto-again", "ours:auto"),
    ("ours:int8", "sdcpp:q8_0"),
    ("ours:int8", "ours:auto"),
    ("ours:int8-resident", "ours:auto-resident"),
    ("ours:int8-resident-compile", "ours:auto-resident-compile"),
    ("ours:gguf-q8_0", "sdcpp:q8_0"),
    ("ours:int4", "sdcpp:q4_0"),
    ("ours:gguf-q4_0", "sdcpp:q4_0"),
    ("ours:bnb-nf4", "ours:gguf-q4_0"),
    ("ours:nvfp4", "ours:gguf-q4_0"),
    ("ours:comfy-int8", "ours:int8"),
]


# ----------------------------------------------------------------------------- derived files


def ours_files(mode: str) -> dict[str, str]:
    """The derived files our run in `mode` loads, by `load` argument; none: the diffusers folder itself."""
    if mode.startswith("comfy-int8"):
        return {"weights": "klein-comfy-int8.safetensors", "text_encoder": "te-int8", "vae": "ae.safetensors"}
    if mode.startswith(("int8", "int4")):
        return {"weights": f"klein-{mode[:4]}.safetensors", "text_encoder": f"te-{mode[:4]}", "vae": "ae.safetensors"}
    if mode.startswith("gguf-"):
        return {"weights": f"klein-{mode[5:].upper()}.gguf", "text_encoder": "te", "vae": "ae.safetensors"}
    if mode.startswith("bnb-nf4"):
        return {"weights": "klein-bnb-nf4"}
    if mode.startswith("nvfp4"):
        return {"weights": "klein-nvfp4.safetensors", "text_encoder": "te", "vae": "ae.safetensors"}
    return {}


def needed_files(key: str) -> set[str]:
    """The derived files one run (impl:mode) reads."""
    impl, mode = key.split(":")
    if impl == "sdcpp":
        return {"ae.safetensors", "qwen3-4b.safetensors", f"klein-{mode.upper()}.gguf"}
    return set(ours_files(mode).values()) if impl == "ours" else set()


def derive_files(folder: Path, names: set[str]) -> Path:
    """The single files both sides load (`names` of them), converted from the folder once (see the module doc)."""
    from flux2studio.conversion import convert

    out = folder.parent / f"{folder.name}-files"
    out.mkdir(exist_ok=True)
    jobs = [
        ("ae.safetensors", folder / "vae", "bfl", None),
        ("klein-int8.safetensors", folder / "transformer", "bfl", "int8"),
        ("klein-int4.safetensors", folder / "transformer", "bfl", "int4"),
        ("klein-F16.gguf", folder / "transformer", "gguf", "f16"),
        ("klein-Q8_0.gguf", folder / "transformer", "gguf", "q8_0"),
        ("klein-Q4_0.gguf", folder / "transformer", "gguf", "q4_0"),
    ]
    for name, src, to, quantize in jobs:
        if name in names and not (out / name).exists():
            print(f"  writing {out / name}", flush=True)
            print("  " + convert(src, out / name, to, quantize), flush=True)
    if "qwen3-4b.safetensors" in names and not (out / "qwen3-4b.safetensors").exists():
        from flux2studio.checkpoints import read_component, write_safetensors

        print("  writing qwen3-4b.safetensors", flush=True)
        write_safetensors(read_component(folder / "text_encoder"), out / "qwen3-4b.safetensors")
    for mode in ("int8", "int4"):  # the text encoder's layers saved packed (`flux2 convert TE DST --quantize`)
        packed = out / f"te-{mode}"
        if packed.name in names and not packed.exists():
            print(f"  writing {packed}", flush=True)
            print("  " + convert(folder / "text_encoder", packed, "bfl", mode), flush=True)
            (packed / "tokenizer").symlink_to(folder / "tokenizer")
    if "klein-bnb-nf4" in names and not (out / "klein-bnb-nf4").exists():
        print("  writing klein-bnb-nf4/", flush=True)
        write_bnb_folder(folder, out / "klein-bnb-nf4")
    for name, fmt in (("klein-nvfp4.safetensors", "nvfp4"), ("klein-comfy-int8.safetensors", "int8")):
        if name in names and not (out / name).exists():
            print(f"  writing {name}", flush=True)
            write_comfy_file(folder, out / name, fmt)
    te = out / "te"
    if "te" in names and not te.exists():
        te.mkdir()
        for f in (folder / "text_encoder").iterdir():
            (te / f.name).symlink_to(f)
        (te / "tokenizer").symlink_to(folder / "tokenizer")
    return out


def write_bnb_folder(folder: Path, out: Path) -> None:
    """The diffusers folder with every linear weight of its transformer and text encoder (2-d, but the token table)
    in bitsandbytes NF4 with double-quantized absmax, serialised as `Linear4bit` serialises itself (its
    `QuantState.as_dict(packed=True)`), the configs given diffusers' and transformers' `quantization_config`; the
    other parts linked. Shard by shard (bitsandbytes' CPU backend quantizes)."""
    import bitsandbytes as bnb
    from safetensors.torch import save_file

    from flux2studio.checkpoints import component_files, read_json, read_safetensors

    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}  # fmt: skip
    out.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name not in ("transformer", "text_encoder"):
            (out / item.name).symlink_to(item)
    for part in ("transformer", "text_encoder"):
        (out / part).mkdir()
        cfg = read_json(folder / part / "config.json") | {"quantization_config": config}
        (out / part / "config.json").write_text(json.dumps(cfg, indent=2))
        weight_map = {}
        for shard in component_files(folder / part):
            tensors = {}
            for key, t in read_safetensors(shard).items():
                if t.dim() == 2 and key.endswith(".weight") and "embed_tokens" not in key:
                    q, state = bnb.functional.quantize_4bit(t, quant_type="nf4", compress_statistics=True)
                    tensors[key] = q
                    tensors |= {f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()}
                else:
                    tensors[key] = t.clone()
            save_file(tensors, out / part / shard.name, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(tensors, shard.name)
        index = next((folder / part).glob("*.safetensors.index.json"))
        (out / part / index.name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        for f in (folder / part).iterdir():
            if not f.name.endswith((".safetensors", ".json")):
                (out / part / f.name).symlink_to(f)


def write_comfy_file(folder: Path, out: Path, fmt: str) -> None:
    """The transformer in BFL names, each block's linear weight in ComfyUI's `fmt` ("nvfp4", or "int8": a scale a
    row, ConvRot in groups of 256) as comfy-kitchen quantizes it (its tensors and `comfy_quant` marker, as BFL's
    nvfp4 files hold them), the rest bf16."""
    import comfy_kitchen as ck
    import torch
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout, TensorWiseINT8Layout

    from flux2studio.checkpoints import read_component, write_safetensors
    from flux2studio.layouts.transformer import transformer_from_diffusers

    layout = TensorCoreNVFP4Layout if fmt == "nvfp4" else TensorWiseINT8Layout
    options = {} if fmt == "nvfp4" else {"per_channel": True, "convrot": True, "convrot_groupsize": 256}
    conf = {"format": "nvfp4"} if fmt == "nvfp4" else {"format": "int8_tensorwise", "convrot": True}
    marker = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    tensors = {}
    for key, t in transformer_from_diffusers(read_component(folder / "transformer")).items():
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and t.dim() == 2:
            with ck.registry.use_backend("eager"):
                parts = layout.state_dict_tensors(*layout.quantize(t, **options))
            tensors |= {f"{key}{k}": v for k, v in parts.items()}
            tensors[key.removesuffix("weight") + "comfy_quant"] = marker.clone()  # (one tensor each: safetensors)
        else:
            tensors[key] = t.clone()
    write_safetensors({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, out)


# ----------------------------------------------------------------------------- children


def run_ours(folder: Path, files: Path, mode: str, size: int, steps: int, png: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen3Model  # noqa: F401  (imported before the clock)

    from flux2studio.loading import load

    base = mode.split("-")[0]
    kw: dict = {"weights": folder, "dtype": base if base in ("fp32", "bf16") else "auto"}
    kw |= {arg: files / name for arg, name in ours_files(mode).items()}
    kw |= {"resident": True} if "-resident" in mode else {}  # kept loaded (servers); int8: prepacked
    kw |= {"compile": True} if mode.endswith("-compile") else {}
    torch.manual_seed(0)
    ph = Phases()
    pipe = load("klein-4b", device="cpu", **kw)
    ph.mark("load")
    if mode.endswith("-again"):  # the prompt seen in a call before (another seed), as a script or server goes on
        pipe(PROMPT, size=(size, size), steps=steps, seed=1)
        ph.rows, ph.t = ph.rows[:1], time.perf_counter()  # that call is not counted
        reset_peak()
    mark_phases(pipe, ph)
    steps_at: list[float] = []
    images = pipe(
        PROMPT, size=(size, size), steps=steps, seed=0, callback=lambda *_: steps_at.append(time.perf_counter())
    )
    images[0].save(png)
    return {"phases": ph.rows, "steps": steps_at, "detail": f"computes in {str(pipe.dtype)[6:]}"}


def run_diffusers(folder: Path, size: int, steps: int, png: Path) -> dict:
    from memory import run_diffusers as run

    return run(folder, size, steps, png) | {"detail": "bf16"}


SDCPP_LOG = {  # stable-diffusion.cpp's own timing lines -> our phase names
    "encode": re.compile(r"get_learned_condition completed, taking ([\d.]+)\s*(ms|s)\b"),
    "denoise": re.compile(r"sampling completed, taking ([\d.]+)\s*(ms|s)\b"),
    "decode": re.compile(r"decode_first_stage completed, taking ([\d.]+)\s*(ms|s)\b"),
}


def run_sdcpp(files: Path, mode: str, size: int, steps: int, png: Path, threads: int) -> dict:
    """One generation; the library logs its phase times (parsed by the parent from this process's output)."""
    from stable_diffusion_cpp import StableDiffusion

    t0 = time.perf_counter()
    sd = StableDiffusion(diffusion_model_path=str(files / f"klein-{mode.upper()}.gguf"),
                         vae_path=str(files / "ae.safetensors"), llm_path=str(files / "qwen3-4b.safetensors"),
                         wtype=mode, n_threads=threads, verbose=True)  # fmt: skip
    loaded = time.perf_counter()
    images = sd.generate_image(prompt=PROMPT, width=size, height=size, sample_steps=steps, cfg_scale=1.0, seed=0)
    done = time.perf_counter()
    images[0].save(png)
    return {"wall": [loaded - t0, done - loaded], "peak": rss_peak_gb(), "detail": f"wtype {mode}"}


def sdcpp_phases(result: dict, log: str) -> dict:
    """Phase rows from the library's log (seconds); the peak is the whole process's."""
    found = {}
    for name, pattern in SDCPP_LOG.items():
        m = pattern.findall(log)
        if m:
            value, unit = m[-1]
            found[name] = float(value) / (1000 if unit == "ms" else 1)
    load = result["wall"][0]
    gen = result["wall"][1]
    rows = [("load", load, result["peak"])]
    for name in ("encode", "denoise", "decode"):
        rows.append((name, found.get(name, float("nan")), result["peak"]))
    rows.append(("other", gen - sum(found.get(n, 0.0) for n in ("encode", "denoise", "decode")), result["peak"]))
    return {"phases": rows, "steps": [], "detail": result["detail"]}


# ----------------------------------------------------------------------------- driver


def inputs(impl: str, mode: str, folder: Path, files: Path) -> list[Path]:
    """The weight files a run reads (warmed into the page cache before it starts)."""
    names = needed_files(f"{impl}:{mode}")
    if not names:
        return sorted(folder.rglob("*.safetensors"))
    paths = [files / n for n in sorted(names)]
    return [f for p in paths for f in (sorted(p.rglob("*.safetensors")) if p.is_dir() else [p])]


def run_child(impl: str, mode: str, args: argparse.Namespace, files: Path, png: Path) -> dict:
    for f in inputs(impl, mode, args.folder, files):  # as after a first run: the files in the page cache
        with open(f, "rb") as handle:
            while handle.read(64 * 2**20):
                pass
    cmd = [sys.executable, __file__, "--child", f"{impl}:{mode}", "--folder", str(args.folder), "--size",
           str(args.size), "--steps", str(args.steps), "--threads", str(args.threads), "--png", str(png)]  # fmt: skip
    env = os.environ | (AVX2_ONLY if args.avx2 and impl != "sdcpp" else {})
    if impl == "sdcpp" and args.sdcpp_path:
        env["PYTHONPATH"] = str(args.sdcpp_path) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        killed = out.returncode in (-9, 137)
        return {"error": "killed (out of memory?)" if killed else " / ".join(tail)[-400:]}
    result = json.loads(line[0][7:])
    if impl == "sdcpp":
        result = sdcpp_phases(result, out.stdout + out.stderr)
    return result


def seconds(r: dict, name: str) -> float:
    return next((t for n, t, _ in r["phases"] if n == name), float("nan"))


def total(r: dict) -> float:
    return sum(t for _, t, _ in r["phases"] if t == t)


def peak(r: dict) -> float:
    return max(p for _, _, p in r["phases"])


def report(results: dict[str, dict], pngs: dict[str, Path], args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    print(f"\nklein-4b shapes, random weights, {args.size}x{args.size}, {args.steps} steps, {args.threads} threads; "
          f"CPU features: {describe_cpu()}{' (ours and diffusers capped at AVX2)' if args.avx2 else ''}")  # fmt: skip
    print("\n| run | | load | encode | denoise (a step) | decode | total | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        if "error" in r:
            print(f"| {key} | | {r['error']} | | | | | |")
            continue
        den = seconds(r, "denoise")
        gaps = sorted(b - a for a, b in zip(r["steps"], r["steps"][1:], strict=False))
        step = gaps[len(gaps) // 2] if gaps else den / args.steps  # between step callbacks: no first-use costs
        cells = [f"{seconds(r, n):.1f} s" for n in ("load", "encode")]
        cells += [f"{den:.1f} s ({step:.1f} s)", f"{seconds(r, 'decode'):.1f} s"]
        print(f"| {key} | {r['detail']} | " + " | ".join(cells) + f" | {total(r):.1f} s | {peak(r):.2f} GB |")
    print("\nratios (time = total of the phases, load included; RSS = peak):")
    for a, b in PAIRS:
        if a in results and b in results and "error" not in results[a] and "error" not in results[b]:
            ra, rb = results[a], results[b]
            den = seconds(ra, "denoise") / seconds(rb, "denoise")
            print(
                f"  {a} / {b}: time {total(ra) / total(rb):.2f}, denoise {den:.2f}, peak RSS {peak(ra) / peak(rb):.2f}"
            )
    ref = "ours:bf16" if "ours:bf16" in pngs else next(iter(pngs), None)
    if ref:  # (stable-diffusion.cpp draws its own noise: its images are not comparable pixel for pixel)
        a = np.asarray(Image.open(pngs[ref]).convert("RGB"), dtype=np.float64)
        for key, png in pngs.items():
            if key != ref and png.exists() and not key.startswith("sdcpp"):
                b = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
                mse = ((a - b) ** 2).mean()
                psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
                print(f"  image {key} vs {ref}: mean {np.abs(a - b).mean():.1f} levels, PSNR {psnr:.1f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    home = Path(os.environ.get("FLUX2_HOME", Path.home() / ".cache" / "flux2studio"))
    parser.add_argument("--folder", type=Path, default=home / "bench" / "klein-4b-random")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated impl:mode")
    parser.add_argument("--avx2", action="store_true", help="cap ours and diffusers at AVX2 (see the module doc)")
    parser.add_argument("--sdcpp-path", type=Path, help="a stable-diffusion-cpp-python install (pip --target)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is reported as such")
    parser.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    files = args.folder.parent / f"{args.folder.name}-files"
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        impl, mode = args.child.split(":")
        if impl == "ours":
            result = run_ours(args.folder, files, mode, args.size, args.steps, args.png)
        elif impl == "diffusers":
            result = run_diffusers(args.folder, args.size, args.steps, args.png)
        else:
            result = run_sdcpp(files, mode, args.size, args.steps, args.png, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if not (args.folder / ".complete").exists():
        print(f"writing random klein-4b-shaped weights to {args.folder} (once, ~16 GB)", flush=True)
        write_folder(args.folder)
    keys = args.modes.split(",")
    derive_files(args.folder, set().union(*map(needed_files, keys)))  # only what these runs read
    with tempfile.TemporaryDirectory(prefix="flux2-cpu-") as folder:  # the images, compared and then removed
        tmp = Path(folder)
        results, pngs = {}, {}
        for key in keys:
            impl, mode = key.split(":")
            png = tmp / f"{impl}-{mode}.png"
            results[key] = run_child(impl, mode, args, files, png)
            if "error" not in results[key]:
                pngs[key] = png
            state = results[key].get("error") or f"{total(results[key]):.1f} s, {peak(results[key]):.2f} GB"
            print(f"{key}: {state}", flush=True)
        report(results, pngs, args)


if __name__ == "__main__":
    main()
