"""Thin command line: parse, call the library, print. `flux2 --help` lists the commands."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2", description="Run the FLUX.2 family on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list every model id with its size, defaults and licence")
    models.add_argument("--json", action="store_true", help="print a JSON list")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
