"""Thin command line: parse, call the library, print. `flux2 --help` lists the commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from functools import cache

from .variants import VARIANTS, Variant


@cache
def transformer_params(variant_id: str) -> int | None:
    """Exact transformer parameter count, from the model built on the meta device (no memory)."""
    import torch

    from .model.transformer import Flux2Transformer

    cfg = VARIANTS[variant_id].transformer
    if cfg is None:
        return None
    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    return sum(p.numel() for p in model.parameters())


def variant_row(v: Variant) -> dict:
    return {
        "id": v.id,
        "description": v.description,
        "params": transformer_params(v.id),
        "steps": None if v.hosted else v.steps,
        "guidance": None if v.hosted else v.guidance,
        "guidance_mode": None if v.hosted else v.guidance_mode,
        "license": v.license,
        "hosted": v.hosted,
        "text_encoder": v.text_encoder.model if v.text_encoder else None,
        "default_size": list(v.default_size) if not v.hosted else None,
        "max_refs": v.max_refs,
        "files": list(v.files),
        "repo": v.repo,
    }


def cmd_models(args: argparse.Namespace) -> int:
    rows = [variant_row(v) for v in VARIANTS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'id':<14} {'params':>15} {'steps':>5} {'guidance':>8} {'mode':<9} license")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] else "hosted"
        steps = r["steps"] if r["steps"] is not None else "-"
        guidance = r["guidance"] if r["guidance"] is not None else "-"
        mode = r["guidance_mode"] or "-"
        print(f"{r['id']:<14} {params:>15} {steps:>5} {guidance:>8} {mode:<9} {r['license']}")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x768") from None
    return w, h


def cmd_generate(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .loading import load

    model = args.model or (None if args.weights else "nano")
    pipe = load(model, weights=args.weights, device=args.device, dtype=args.dtype)
    kw = {"guidance": args.guidance} if args.guidance is not None else {}
    started = time.perf_counter()
    images = pipe(args.prompt, size=args.size, steps=args.steps, seed=args.seed, num_images=args.num, **kw)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"{path}  seed {args.seed + i}  {image.width}x{image.height}  {seconds:.2f}s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .nano.train import TrainConfig, run

    extra = dict(kv.split("=", 1) for kv in args.set)
    cfg = TrainConfig(stage=args.stage, out=args.out, steps=args.steps, batch=args.batch, lr=args.lr,
                      warmup=args.warmup, seed=args.seed, ckpt_every=args.ckpt_every, extra=extra)  # fmt: skip
    run(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .loading import load
    from .nano.evaluate import evaluate

    pipe = load(args.model or "nano", weights=args.weights, device=args.device, dtype=args.dtype)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    result = evaluate(pipe, seeds=seeds, limit=args.limit, steps=args.steps, guidance=args.guidance)
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else result.table())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert

    print(convert(args.src, args.dst, args.to))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}\n  layout: {info['layout']}")
    for key in ("pipeline", "component"):
        if key in info:
            print(f"  {key}: {info[key]}")
    if "transformer" in info:
        t = info["transformer"]
        print(f"  transformer: hidden {t['hidden_size']}, {t['depth']} double + {t['depth_single']} single blocks, "
              f"context {t['context_dim']}, guidance embedding {'yes' if t['guidance_embed'] else 'no'}")  # fmt: skip
    print(f"  parameters: {info['params']:,}  dtypes: {info['dtypes']}")
    for name, size in info["files"].items():
        print(f"  {size / 2**20:10.1f} MiB  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2", description="Run the FLUX.2 family on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list every model id with its size, defaults and licence")
    models.add_argument("--json", action="store_true", help="print a JSON list")
    models.set_defaults(func=cmd_models)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model id (default: the embedded nano, or detected from --weights)")
        p.add_argument("--weights", help="weights file or folder (default: embedded / registered location)")
        p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
        p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default bf16 (fp16 on mps)")
        p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
        p.add_argument("--guidance", type=float, help="guidance scale (CFG and guidance-embedded models)")

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt")
    model_args(gen)
    gen.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT, multiples of 16")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num", type=int, default=1, help="images for the prompt")
    gen.add_argument("-o", "--out", default="flux2.png", help="output PNG")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="prompt-adherence eval of an embedded model on the Shapes world")
    model_args(ev)
    ev.add_argument("--seeds", default="0,1,2", help="comma-separated seeds per prompt")
    ev.add_argument("--limit", type=int, help="evaluate an evenly spread subset of N prompts")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    conv = sub.add_parser("convert", help="convert a transformer or VAE between the diffusers and BFL layouts")
    conv.add_argument("src", help="single .safetensors file or diffusers component folder (transformer/, vae/)")
    conv.add_argument("dst", help="new folder (--to diffusers) or .safetensors file (--to bfl)")
    conv.add_argument("--to", choices=["diffusers", "bfl"], required=True)
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="layout, detected model, dtypes, parameter count and file sizes of weights")
    info.add_argument("path")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train the embedded model (stages: vae, base, distill)")
    tr.add_argument("what", choices=["nano"])
    tr.add_argument("--stage", choices=["vae", "base", "distill"], required=True)
    tr.add_argument("--out", default="runs/nano", help="checkpoints and logs; a rerun resumes from here")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--ckpt-every", type=int, default=200)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage option, e.g. shift=6")
    tr.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
