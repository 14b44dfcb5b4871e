"""LoRA and LoKr files from every common FLUX.2 trainer, applied to our transformer; fuse and unfuse.

Formats are told apart by their keys, never by the file name:
  diffusers / PEFT, SimpleTuner   transformer.transformer_blocks.0.attn.to_q.lora_A.weight (+ adapter metadata)
  BFL names, ai-toolkit, fal      diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (or lora_down/up)
  kohya / musubi-tuner            lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight + .alpha
  LyCORIS LoKr (any naming above) ....lokr_w1 / lokr_w2 (or their _a/_b factors) + .alpha
  LyCORIS names (SimpleTuner)     lycoris_transformer_blocks_0_attn_to_q.lokr_w1 (diffusers or BFL module path)
Every file becomes a list of `Delta`s on OUR module names (the BFL layout); diffusers' separate q, k, v
become one block-diagonal delta on the fused qkv. A key that maps to no module is an error naming it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoints import read_safetensors
from .layouts.transformer import TRANSFORMER_DIFFUSERS
from .precision import fp8_dtypes
from .quantize import QuantLinear, dense_weight

OUTER_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
MAX_LORA_SCALE = 8.0  # |scale| of a LoRA; beyond it an image is only ever noise (the server's limit too)
KOHYA_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"  # LyCORIS wraps a model and writes each module path with underscores
PARAM = re.compile(
    r"^(?P<module>.+?)\.(?P<param>lora_[AB](?:\.default)?\.weight|lora_(?:down|up)\.weight|alpha|"
    r"lokr_w[12](?:_[ab])?|dora_scale|diff|diff_b|hada_\w+)$"
)


@dataclass
class Delta:
    """delta W = up @ down (scale folded into `up`), or kron(w1, w2) * scale for LoKr, on one Linear."""

    module: str
    down: Tensor | None = None  # (R, in)
    up: Tensor | None = None  # (out, R)
    kron: tuple[Tensor, Tensor] | None = None
    scale: float = 1.0

    def weight(self, shape: torch.Size) -> Tensor:
        """The full (out, in) delta in float32."""
        if self.kron is not None:
            w1, w2 = self.kron
            return torch.kron(w1.float(), w2.float()).reshape(shape) * self.scale
        return self.up.float() @ self.down.float()


@dataclass
class LoraFile:
    path: str
    format: str
    deltas: list[Delta] = field(default_factory=list)


def _strip(key: str) -> str:
    for prefix in OUTER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _diffusers_names(model: nn.Module) -> dict[str, tuple[str, int, int, bool]]:
    """diffusers module name -> (our module, part index, parts, swap halves), expanded for this model."""
    cfg = model.cfg
    out: dict[str, tuple[str, int, int, bool]] = {}
    for rule in TRANSFORMER_DIFFUSERS:
        if not rule.ours.endswith(".weight"):
            continue  # norm scales carry no LoRA
        blocks = [None]
        if rule.ours.startswith("double_blocks."):
            blocks = range(cfg.depth)
        elif rule.ours.startswith("single_blocks."):
            blocks = range(cfg.depth_single)
        for i in blocks:
            ours = rule.ours.format(i=i)[: -len(".weight")]
            for part, theirs in enumerate(rule.theirs):
                name = theirs.format(i=i)[: -len(".weight")]
                out[name] = (ours, part, len(rule.theirs), rule.op == "swap")
    return out


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not Path(path).exists():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    tensors = read_safetensors(path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return tensors, metadata


def _peft_alpha(metadata: dict[str, str]) -> tuple[float | None, dict]:
    """lora_alpha and per-module alpha_pattern from diffusers' `lora_adapter_metadata` (PEFT config)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}
    cfg = json.loads(raw)
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}  # pipeline files namespace the keys
    return cfg.get("lora_alpha"), cfg.get("alpha_pattern") or {}


def parse_lora(sd: dict[str, Tensor], metadata: dict[str, str], model: nn.Module, path: str = "") -> LoraFile:
    """Map a LoRA/LoKr state dict onto `model`'s Linear layers; raise naming every key that maps to nothing."""
    linears = _linears(model)
    kohya = {KOHYA_PREFIX + name.replace(".", "_"): name for name in linears}
    diffusers = _diffusers_names(model)
    # module paths with "." written as "_": ours (BFL names) and diffusers' (decoded through `diffusers`)
    lycoris = {LYCORIS_PREFIX + name.replace(".", "_"): name for name in [*linears, *diffusers]}
    peft_alpha, alpha_pattern = _peft_alpha(metadata)

    groups: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        m = PARAM.match(_strip(key))
        if m is None:
            unknown.append(key)
            continue
        param = m["param"].replace(".default", "").replace("lora_down", "lora_A").replace("lora_up", "lora_B")
        param = param.removesuffix(".weight")
        groups.setdefault(m["module"], {})[param] = value
    unsupported = sorted(f"{k} ({p})" for k, g in groups.items() for p in g if p.startswith(("dora", "diff", "hada")))
    if unsupported:
        raise ValueError(f"unsupported LoRA parts (DoRA / full diff / LoHa): {', '.join(unsupported[:8])}")

    formats: set[str] = set()
    parts: dict[str, list[tuple[int, int, bool, Delta]]] = {}
    for name, g in groups.items():
        if name in linears:
            target, part, n, swap, fmt = name, 0, 1, False, "bfl"
        elif name in kohya:
            target, part, n, swap, fmt = kohya[name], 0, 1, False, "kohya"
        elif name in diffusers:
            (target, part, n, swap), fmt = diffusers[name], "diffusers"
        elif name in lycoris and lycoris[name] in linears:
            target, part, n, swap, fmt = lycoris[name], 0, 1, False, "lycoris"
        elif name in lycoris:
            (target, part, n, swap), fmt = diffusers[lycoris[name]], "lycoris"
        else:
            unknown += [f"{name}.{p}" for p in g]
            continue
        formats.add(fmt)
        parts.setdefault(target, []).append((part, n, swap, _delta(target, g, peft_alpha, alpha_pattern, name)))
    if unknown and {"step", "config"} <= set(metadata) and any(k.startswith("lora.") for k in unknown):  # a run's
        raise ValueError(f"{path or 'the file'} is a LoRA training checkpoint (with its optimizer's state): use the "
                         "lora.safetensors its run wrote beside it")  # fmt: skip
    if unknown and not parts and sum(_strip(k).rsplit(".", 1)[0] in linears for k in unknown) > len(unknown) // 2:
        raise ValueError(f"{path or 'the file'} holds a model's own weights, not a LoRA (its keys are this model's "
                         "layers): give it as --weights")  # fmt: skip
    if unknown:
        shown = ", ".join(sorted(unknown)[:12]) + (f" (+{len(unknown) - 12} more)" if len(unknown) > 12 else "")
        raise ValueError(f"{f'{path}: ' if path else ''}{len(unknown)} LoRA key(s) map to no layer of this model: "
                         f"{shown}")  # fmt: skip
    if not parts:
        raise ValueError(f"{path or 'the LoRA'} holds no LoRA layer (an empty file?)")
    lokr = any(d.kron is not None for ps in parts.values() for *_, d in ps)
    deltas = [_combine(target, ps, linears[target], path) for target, ps in parts.items()]  # each part checked
    fmt = "+".join(sorted(formats)) + (" LoKr" if lokr else "")
    return LoraFile(path=path, format=fmt, deltas=deltas)


def _check_delta(d: Delta, linear: nn.Linear, path: str, rows: int | None = None) -> None:
    """A ValueError naming the file and layer unless `d`'s factors make a delta of the layer's shape (or of
    `rows` of it: one of diffusers' q, k, v parts) with finite values: a LoRA of another model, or a broken
    file, is refused before anything is applied (factors that merely broadcast included)."""
    out, inp = rows or linear.out_features, linear.in_features
    where = f"{path or 'LoRA'}: layer {d.module}"
    if d.kron is not None:
        (a, b), (c, e) = d.kron[0].shape, d.kron[1].shape
        made, factors = (a * c, b * e), [d.kron[0], d.kron[1]]
    else:
        if d.down.ndim != 2 or d.up.ndim != 2 or d.up.shape[1] != d.down.shape[0]:
            raise ValueError(f"{where}: factors {tuple(d.up.shape)} x {tuple(d.down.shape)} do not multiply")
        made, factors = (d.up.shape[0], d.down.shape[1]), [d.down, d.up]
    if made != (out, inp):
        raise ValueError(f"{where} makes a {made[0]}x{made[1]} change; this model's layer is {out}x{inp} (a LoRA "
                         "of another model?)")  # fmt: skip
    if not all(torch.isfinite(f.float()).all() for f in factors):  # (fp8 factors: no isfinite of their own)
        raise ValueError(f"{where} holds NaN or infinite values")


def _delta(target: str, g: dict[str, Tensor], peft_alpha, alpha_pattern: dict, name: str) -> Delta:
    if "lora_A" in g and "lora_B" in g:
        down, up = g["lora_A"], g["lora_B"]
        rank = down.shape[0]
        alpha = g["alpha"].item() if "alpha" in g else alpha_pattern.get(name, peft_alpha)
        scale = (alpha / rank) if alpha is not None else 1.0
        return Delta(target, down=down, up=up * scale)
    if any(k.startswith("lokr_w1") for k in g) and any(k.startswith("lokr_w2") for k in g):
        w1 = g["lokr_w1"] if "lokr_w1" in g else g["lokr_w1_a"].float() @ g["lokr_w1_b"].float()
        w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"].float() @ g["lokr_w2_b"].float()
        # LyCORIS: scale = alpha / dim, dim the rank of the decomposed factor (1 when nothing is decomposed)
        dim = g["lokr_w2_b"].shape[0] if "lokr_w2_b" in g else g["lokr_w1_b"].shape[0] if "lokr_w1_b" in g else None
        scale = g["alpha"].item() / dim if ("alpha" in g and dim) else 1.0
        return Delta(target, kron=(w1, w2), scale=scale)
    raise ValueError(f"LoRA layer {name} is incomplete: has {sorted(g)}, needs lora_A+lora_B or lokr_w1+lokr_w2")


def _combine(target: str, ps: list[tuple[int, int, bool, Delta]], linear: nn.Linear, path: str = "") -> Delta:
    """One delta per layer: diffusers' q, k, v parts become a block-diagonal low-rank delta on qkv."""
    out_features = linear.out_features
    if len(ps) == 1 and ps[0][1] == 1:
        _check_delta(ps[0][3], linear, path)
        _, _, swap, d = ps[0]
        if swap:  # diffusers stores the final adaLN as (scale, shift), ours is (shift, scale)
            if d.kron is not None:
                w = d.weight(_shape(linear))
                a, b = w.chunk(2, dim=0)
                return Delta(target, down=torch.eye(w.shape[1]), up=torch.cat([b, a]))
            a, b = d.up.chunk(2, dim=0)
            d = Delta(target, down=d.down, up=torch.cat([b, a]))
        return d
    n = ps[0][1]
    rows = out_features // n
    downs, ups = [], []
    for part, _, _, d in sorted(ps, key=lambda p: p[0]):
        _check_delta(d, linear, path, rows)
        if d.kron is not None:  # LoKr parts: use the full per-part delta as rank-`in` factors
            w = d.weight(torch.Size((rows, linear.in_features)))
            d = Delta(target, down=torch.eye(linear.in_features), up=w)
        up = torch.zeros(out_features, d.up.shape[1], dtype=d.up.dtype)
        up[part * rows : (part + 1) * rows] = d.up
        downs.append(d.down)
        ups.append(up)
    return Delta(target, down=torch.cat(downs), up=torch.cat(ups, dim=1))


def check_scale(scale: object, name: str | Path = "") -> float:
    """A LoRA's scale as a float (anything `float()` takes), or a ValueError naming it and the range (NaN and
    infinities refused)."""
    try:
        value = float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not abs(value) <= MAX_LORA_SCALE:
        who = f"LoRA {Path(name).name} " if name else "LoRA "
        raise ValueError(f"{who}scale {scale!r} is out of range -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g}")
    return value


def load_lora(path: str | Path, model: nn.Module) -> LoraFile:
    sd, metadata = read_lora(path)
    return parse_lora(sd, metadata, model, str(path))


class Applied:
    """LoRAs applied to a model; `remove()` undoes them exactly (fused weights are restored bit for bit)."""

    def __init__(self) -> None:
        self.backups: dict[nn.Linear, Tensor] = {}
        self.hooks: list = []

    def remove(self) -> None:
        for linear, weight in self.backups.items():
            linear.weight.data = weight
        for hook in self.hooks:
            hook.remove()
        self.backups, self.hooks = {}, []


def apply_loras(
    model: nn.Module, loras: Sequence[tuple[LoraFile, float]], mode: str = "fuse", into: torch.dtype | None = None
) -> Applied:
    """Apply each (LoRA, user scale). mode "fuse": add the deltas into the weights (fast; a backup of each
    touched weight allows an exact `remove`), stored in `into` (the compute dtype, so a model computing in
    fp32 on bf16 or fp8 weights keeps the sum exact) or else as the weight was (bf16 for fp8). mode "hooks":
    add the low-rank path at run time (no copy); packed (quantized) layers always take this path, so that
    they stay packed (a fused copy would be 4-7x their size)."""
    if mode not in ("fuse", "hooks"):
        raise ValueError(f"mode {mode!r}: choose fuse or hooks")
    linears = _linears(model)
    applied = Applied()
    by_layer: dict[str, list[tuple[Delta, float]]] = {}
    for lora, scale in loras:
        for d in lora.deltas:
            by_layer.setdefault(d.module, []).append((d, scale))
    try:
        for name, items in by_layer.items():
            linear = linears[name]
            if mode == "fuse" and not isinstance(linear, QuantLinear):  # packed layers stay packed: hooks
                total = sum(s * d.weight(_shape(linear)) for d, s in items)
                base = dense_weight(linear, torch.float32)  # an fp8 weight times its scale, a packed one unpacked
                narrow = linear.weight.dtype in fp8_dtypes() or not linear.weight.is_floating_point()
                kept = into or (torch.bfloat16 if narrow else linear.weight.dtype)
                fused = (base + total.to(linear.weight.device)).to(kept)
                applied.backups[linear] = linear.weight.data
                linear.weight.data = fused
            else:
                applied.hooks.append(linear.register_forward_hook(_hook(items, linear)))
    except BaseException:  # (out of memory on a large layer): none of it stays applied
        applied.remove()
        raise
    return applied


def _shape(linear: nn.Linear) -> torch.Size:
    """The weight's (out, in) shape, also for packed weights (stored as rows of bytes)."""
    return torch.Size((linear.out_features, linear.in_features))


def _hook(items: list[tuple[Delta, float]], linear: nn.Linear):
    factors = []
    for d, s in items:
        if d.kron is not None:
            factors.append((None, d.weight(_shape(linear)) * s))
        else:
            factors.append((d.down, d.up * s))

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        for down, up in factors:
            up = up.to(x.device, x.dtype)
            output = output + (
                F.linear(x, up) if down is None else F.linear(F.linear(x, down.to(x.device, x.dtype)), up)
            )
        return output

    return hook
