"""Key table between our transformer (the BFL single-file layout) and diffusers' `Flux2Transformer2DModel`.

One declarative table (FLUX2.md §7); `{i}` stands for a block index. Three ops:
  rename  one tensor, new name
  qkv     our fused qkv <-> diffusers' separate q, k, v (concatenated along dim 0)
  swap    final adaLN: BFL stores (shift, scale), diffusers (scale, shift)
Every key that matches no rule raises, naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..lazy_tensors import Lazy, Pending, pending


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    op: Literal["rename", "qkv", "swap"] = "rename"


def _r(ours: str, *theirs: str, op: Literal["rename", "qkv", "swap"] = "rename") -> Rule:
    return Rule(ours, theirs, op)


_D, _S = "double_blocks.{i}.", "transformer_blocks.{i}."
_SS, _DS = "single_blocks.{i}.", "single_transformer_blocks.{i}."

TRANSFORMER_DIFFUSERS: tuple[Rule, ...] = (
    _r("img_in.weight", "x_embedder.weight"),
    _r("txt_in.weight", "context_embedder.weight"),
    _r("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    _r("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    _r("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
    _r("guidance_in.out_layer.weight", "time_guidance_embed.guidance_embedder.linear_2.weight"),
    _r("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight"),
    _r("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear.weight"),
    _r("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"),
    _r("final_layer.linear.weight", "proj_out.weight"),
    _r("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight", op="swap"),
    _r(_D + "img_attn.qkv.weight", *(_S + f"attn.to_{x}.weight" for x in "qkv"), op="qkv"),
    _r(_D + "txt_attn.qkv.weight", *(_S + f"attn.add_{x}_proj.weight" for x in "qkv"), op="qkv"),
    _r(_D + "img_attn.norm.query_norm.scale", _S + "attn.norm_q.weight"),
    _r(_D + "img_attn.norm.key_norm.scale", _S + "attn.norm_k.weight"),
    _r(_D + "txt_attn.norm.query_norm.scale", _S + "attn.norm_added_q.weight"),
    _r(_D + "txt_attn.norm.key_norm.scale", _S + "attn.norm_added_k.weight"),
    _r(_D + "img_attn.proj.weight", _S + "attn.to_out.0.weight"),
    _r(_D + "txt_attn.proj.weight", _S + "attn.to_add_out.weight"),
    _r(_D + "img_mlp.0.weight", _S + "ff.linear_in.weight"),
    _r(_D + "img_mlp.2.weight", _S + "ff.linear_out.weight"),
    _r(_D + "txt_mlp.0.weight", _S + "ff_context.linear_in.weight"),
    _r(_D + "txt_mlp.2.weight", _S + "ff_context.linear_out.weight"),
    _r(_SS + "linear1.weight", _DS + "attn.to_qkv_mlp_proj.weight"),
    _r(_SS + "linear2.weight", _DS + "attn.to_out.weight"),
    _r(_SS + "norm.query_norm.scale", _DS + "attn.norm_q.weight"),
    _r(_SS + "norm.key_norm.scale", _DS + "attn.norm_k.weight"),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _fused(*tensors: Tensor) -> Tensor:
    return torch.cat(tensors, dim=0)


def _third(w: Tensor, i: int) -> Tensor:
    return w.chunk(3, dim=0)[i]


def convert(
    sd: dict[str, Lazy],
    rules: tuple[Rule, ...],
    to: Literal["ours", "theirs"],
    copied: Callable[[list[Tensor]], None] | None = None,
    lazy: bool = False,
) -> dict[str, Lazy]:
    """Rename `sd` through `rules` in one direction; raise on any key no rule claims. `copied` is told of
    the source tensors each fusing or swapping step has just copied (so a loader can free them at once).
    `lazy` (a conversion written to a file): the fused and swapped tensors are made as they are written
    (`lazy_tensors.Pending`), as are the thirds of a Pending fused one."""
    rest = dict(sd)
    out: dict[str, Lazy] = {}
    for rule in rules:
        src, dst = (rule.theirs, (rule.ours,)) if to == "ours" else ((rule.ours,), rule.theirs)
        pat = _pattern(src[0])
        for key in [k for k in rest if pat.match(k)]:
            if key not in rest:
                continue
            index = pat.match(key).group("i") if "{i}" in src[0] else None
            names = [s.format(i=index) for s in src]
            missing = [n for n in names if n not in rest]
            if missing:
                raise ValueError(f"incomplete tensor group for {dst[0].format(i=index)}: missing {missing}")
            tensors = [rest.pop(n) for n in names]
            targets = [d.format(i=index) for d in dst]
            first = tensors[0]
            if rule.op == "rename":
                out[targets[0]] = first
            elif rule.op == "swap" or to == "ours":  # qkv: q, k, v -> fused
                fn, shape = (_swap_halves, first.shape) if rule.op == "swap" else (_fused, _rows(tensors))
                out[targets[0]] = pending(fn, *tensors, shape=shape, dtype=first.dtype) if lazy else fn(*tensors)
                if copied:
                    copied(tensors)
            elif isinstance(first, Pending):  # qkv: fused -> q, k, v, each made from the fused one
                third = (first.shape[0] // 3, *first.shape[1:])
                for i, target in enumerate(targets):
                    out[target] = pending(_third, first, i, shape=third, dtype=first.dtype)
            else:
                out.update(zip(targets, first.chunk(3, dim=0), strict=True))
    if rest:
        names = sorted(rest)
        shown = ", ".join(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")
        raise ValueError(f"{len(names)} transformer key(s) map to nothing: {shown}")
    return out


def _rows(tensors: list[Lazy]) -> tuple[int, ...]:
    return (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])


def transformer_from_diffusers(
    sd: dict[str, Lazy], copied: Callable[[list[Tensor]], None] | None = None, lazy: bool = False
) -> dict[str, Lazy]:
    """diffusers `Flux2Transformer2DModel` state dict -> ours (BFL layout); `lazy`: see `convert`."""
    return convert(sd, TRANSFORMER_DIFFUSERS, to="ours", copied=copied, lazy=lazy)


def packed_from_diffusers(
    sd: dict[str, Tensor], formats: dict[str, str], copied: Callable[[list[Tensor]], None] | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`transformer_from_diffusers` for tensors with packed layers (`formats`: {module: format}): a layer's rows and
    its `.scales` (one row each per output row) are fused, swapped and renamed alike. Returns (tensors, formats)."""
    scales = {k.removesuffix(".scales") + ".weight": v for k, v in sd.items() if k.endswith(".scales")}
    out = transformer_from_diffusers({k: v for k, v in sd.items() if not k.endswith(".scales")}, copied)
    for key, value in convert(scales, TRANSFORMER_DIFFUSERS, to="ours", copied=copied).items():
        out[key.removesuffix(".weight") + ".scales"] = value
    ours: dict[str, str] = {}
    for module, fmt in formats.items():
        name = _ours_key(module + ".weight").removesuffix(".weight")
        if ours.setdefault(name, fmt) != fmt:
            raise ValueError(f"{name} is fused from layers stored in different formats ({ours[name]}, {fmt})")
    return out, ours


def _ours_key(key: str) -> str:
    """A diffusers key's name in our layout (q, k and v each name the fused qkv)."""
    for rule in TRANSFORMER_DIFFUSERS:
        for theirs in rule.theirs:
            if match := _pattern(theirs).match(key):
                return rule.ours.format(i=match.groupdict().get("i"))
    raise ValueError(f"transformer key {key} maps to nothing")


def transformer_to_diffusers(sd: dict[str, Lazy], lazy: bool = False) -> dict[str, Lazy]:
    """Ours (BFL layout) -> diffusers `Flux2Transformer2DModel` state dict; `lazy`: see `convert`."""
    return convert(sd, TRANSFORMER_DIFFUSERS, to="theirs", lazy=lazy)
