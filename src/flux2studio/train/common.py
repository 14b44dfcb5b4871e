"""Pieces every training loop here shares: the flow-matching loss, noise levels, EMA, learning-rate
schedule, and checkpoints (safetensors: model, EMA and optimizer moments, step in the metadata)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import sampling
from ..checkpoints import write_safetensors
from ..model.transformer import Flux2Transformer
from ..precision import autocast


def save_checkpoint(path: Path, step: int, tensors: dict[str, Tensor], config: dict) -> None:
    """Atomic (`write_safetensors`): a kill mid-write never leaves a broken checkpoint."""
    meta = {"step": str(step), "config": json.dumps(config)}
    write_safetensors({k: v.detach().cpu() for k, v in tensors.items()}, path, meta)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> dict[str, Tensor]:
    out = {}
    for p, state in opt.state.items():
        for k, v in state.items():
            out[f"opt.{names[p]}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def restore_optimizer(opt: torch.optim.Optimizer, names: dict[nn.Parameter, str], sd: dict[str, Tensor]) -> None:
    for p, name in names.items():
        state = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.startswith(f"opt.{name}.")}
        if state:  # moments beside their parameter; the step count stays on the CPU, as the optimizer keeps it
            opt.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in state.items()}


def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def checkpoint_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


class Ema:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warmup so early EMA is not stale noise
        state = model.state_dict()
        shadow = [self.shadow[k] for k in state]
        torch._foreach_mul_(shadow, d)  # one kernel per op for all tensors: matters on a GPU
        torch._foreach_add_(shadow, [v.float() for v in state.values()], alpha=1 - d)


def train_timesteps(rng: torch.Generator, n: int, shift: float) -> Tensor:
    """Training noise levels: uniform u shifted like the sampling schedule (e^mu ~ 6 at 64 tokens)."""
    u = torch.rand(n, generator=rng).clamp(1e-4, 1 - 1e-4)
    return shift / (shift + (1 / u - 1))


def posterior_mean(xt: Tensor, x0: Tensor, t: Tensor, groups: Tensor) -> Tensor:
    """E[x0 | x_t] over the samples of each one's group: x_t (B, L, C) = (1 - t) x0 + t noise, so a candidate
    x0_j has likelihood exp(-|x_t - (1 - t) x0_j|^2 / 2t^2); the weights are those, normalised over the group
    (the sample itself included). Near pure noise the mean of the group, near t = 0 the sample's own x0.

    A lower-variance regression target than x0 itself for the same optimum (a "stable target field", Xu et
    al. 2023): where x_t still says little, the loss stops asking for one particular layout out of many
    that the caption allows equally, which is most of the loss there.
    """
    a, xf, cf = (1 - t).float()[:, None], xt.flatten(1).float(), x0.flatten(1).float()
    # -|x_t - a x0_j|^2 without |x_t|^2, the same for every candidate j (and the largest term by far)
    logits = (2 * a * (xf @ cf.T) - a**2 * (cf**2).sum(1)[None]) / (2 * t.float().clamp_min(1e-3)[:, None] ** 2)
    logits = logits.masked_fill(groups[:, None] != groups[None], float("-inf"))
    return (logits.softmax(1) @ cf).view_as(x0).to(x0.dtype)


def flow_loss(
    model: Flux2Transformer,
    z: Tensor,
    txt: Tensor,
    t: Tensor,
    noise: Tensor,
    ref: Tensor | None = None,
    ref_ids: Tensor | None = None,
    weight: Tensor | None = None,
    start: Tensor | None = None,
    groups: Tensor | None = None,
) -> Tensor:
    """Rectified flow: x_t = (1 - t) z + t noise, target v = noise - z (so Euler from t=1 to 0 recovers z).

    z, noise (B, 128, h, w); txt (B, L, C); t (B,). With reference tokens `ref` (B, Lr, 128) the model
    sees them after the target tokens, as in editing, and the loss covers the target tokens only.
    `weight` (B, h*w) weighs each token's squared error (the loss is the weighted mean).
    `start` (like z): x_t is made from it instead of z, and the target is the velocity that still lands on z,
    (x_t - z) / t (the same as noise - z where start is z); t must then be > 0.
    `groups` (B,) ints: samples with the same number are draws for the same caption (and their x_t made from
    their own z); the target lands on their posterior mean given x_t instead of on z (`posterior_mean`).
    """
    h, w = z.shape[-2:]
    x0, x1 = sampling.pack(z), sampling.pack(noise)
    tt = t[:, None, None]
    xt = (1 - tt) * (x0 if start is None else sampling.pack(start)) + tt * x1
    target = x1 - x0 if start is None else (xt - x0) / tt
    if groups is not None:  # (x_t - mean) / t, written so that a mean equal to x0 changes nothing
        target = target + (x0 - posterior_mean(xt, x0, t, groups)) / tt
    ids = sampling.image_ids(h, w).to(xt.device)
    if ref is not None:
        xt, ids = torch.cat([xt, ref], dim=1), torch.cat([ids, ref_ids.to(xt.device)])
    with autocast(xt.device) if xt.device.type == "cpu" else contextlib.nullcontext():  # bf16 where the CPU has it
        v = model(xt, ids, txt, sampling.text_ids(txt.shape[1]).to(xt.device), t)[:, : h * w]
    if weight is None:
        return F.mse_loss(v.float(), target)
    err = (v.float() - target).pow(2).mean(-1)  # (B, h*w)
    return (err * weight).sum() / weight.sum()
