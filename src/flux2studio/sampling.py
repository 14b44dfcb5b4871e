"""Sampling: noise, position ids, the shifted schedule, pack/unpack and the Euler loop (FLUX2.md §3, §6).

Everything here takes plain tensors and any velocity function, so a test can pass a toy one. This
module knows nothing about prompts, files or the transformer's internals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Schedule constants of FLUX.2's resolution-dependent shift (FLUX2.md §6; BFL sampling.py, diffusers
# pipeline_flux2.compute_empirical_mu).
MU_A1, MU_B1 = 8.73809524e-05, 1.89833333
MU_A2, MU_B2 = 0.00016927, 0.45666666
MU_LONG_SEQ = 4300
# Reference k sits at time coordinate 10 + 10k (FLUX2.md §3).
REF_TIME_SCALE = 10
# One latent token covers 16x16 pixels: VAE 8x down, then 2x2 patchify (FLUX2.md §5).
PIXELS_PER_TOKEN = 16

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x (B, L, C), t (1,) for the batch, or (B,)) -> v (B, L, C)
# (step index, total steps, the step's estimate of the clean latents x0 = x_t - t v, tokens (B, L, C), or None
# where a batch is denoised in parts): what previews show, since the running x_t is mostly noise at first.
StepCallback = Callable[[int, int, Tensor | None], None]


def noise(seeds: Sequence[int], channels: int, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Initial noise (B, channels, H/16, W/16) on the CPU, one generator per image.

    Image i draws from `torch.Generator("cpu").manual_seed(seeds[i])` exactly as diffusers' FLUX.2
    pipelines do for `generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]`, so an image
    is reproducible alone or in a batch, here and in diffusers.
    """
    shape = (1, channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)
    return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=dtype) for s in seeds])


def text_ids(length: int) -> Tensor:
    """(L, 4) ids (0, 0, 0, i) for every text position, padding included."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


def image_ids(h: int, w: int, time: int = 0) -> Tensor:
    """(h*w, 4) ids (time, row, col, 0) of a latent grid in row-major (packing) order."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.zeros(h * w, 4, dtype=torch.long)
    ids[:, 0], ids[:, 1], ids[:, 2] = time, rows.flatten(), cols.flatten()
    return ids


def reference_ids(grids: Sequence[tuple[int, int]]) -> Tensor:
    """Ids of reference latents with grids [(h, w), ...]: reference k at time 10 + 10k, own grid."""
    return torch.cat([image_ids(h, w, REF_TIME_SCALE + REF_TIME_SCALE * k) for k, (h, w) in enumerate(grids)])


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C) tokens in row-major order."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) -> (B, C, h, w)."""
    return tokens.transpose(1, 2).unflatten(2, (h, w))


def empirical_mu(seq_len: int, steps: int) -> float:
    """Shift parameter from the image token count and step count (FLUX2.md §6)."""
    if seq_len > MU_LONG_SEQ:
        return MU_A2 * seq_len + MU_B2
    m200 = MU_A2 * seq_len + MU_B2
    m10 = MU_A1 * seq_len + MU_B1
    a = (m200 - m10) / 190.0
    b = m200 - 200.0 * a
    return a * steps + b


def schedule(steps: int, seq_len: int, mu: float | None = None) -> Tensor:
    """Noise levels (steps + 1,) float32 from 1 to 0, shifted by e^mu / (e^mu + (1/t - 1)).

    Computed in the same float32 order as diffusers' FlowMatchEulerDiscreteScheduler for the FLUX.2
    pipelines (linspace(1, 1/N, N), shift, append 0), so timesteps agree bit for bit. `mu` defaults to
    FLUX.2's empirical one for this token and step count; a model distilled for its own shift passes that.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float()
    # A float32 tensor numerator: torch turns `python_float / tensor` into a reciprocal-multiply,
    # one ulp away from numpy's division in the reference.
    e = torch.tensor(math.exp(empirical_mu(seq_len, steps) if mu is None else mu), dtype=torch.float32)
    return torch.cat([e / (e + (1 / t - 1)), torch.zeros(1)])


def start_index(steps: int, strength: float) -> int:
    """First step an image-to-image / inpainting run takes: diffusers' img2img convention
    (`int(steps - min(steps * strength, steps))`), so `strength` 1 starts from pure noise and runs every step,
    and any strength above 0 runs at least one. The schedule itself is the full one for `steps`."""
    return int(max(steps - min(steps * strength, steps), 0))


def add_noise(clean: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The flow's x_t = t noise + (1 - t) clean, in the latents' dtype (diffusers' `scale_noise`)."""
    sigma = sigma.to(clean.dtype)
    return sigma * noise + (1.0 - sigma) * clean


def mask_tokens(mask: Tensor, h: int, w: int) -> Tensor:
    """(B, 1, H, W) pixel mask -> (B, h*w, 1) token weights: bilinear onto the latent grid (diffusers')."""
    return pack(torch.nn.functional.interpolate(mask, size=(h, w), mode="bilinear"))


class Inpaint:
    """After each step, tokens where `mask` is 0 are reset to the start image noised to the next level
    (the clean image after the last step), so only the masked area is generated (diffusers' inpainting)."""

    def __init__(self, clean: Tensor, noise: Tensor, mask: Tensor) -> None:
        self.clean, self.noise, self.mask = clean, noise, mask.to(clean.dtype)

    def of(self, images: slice) -> Inpaint:
        """The same reset for these images of the batch."""
        return Inpaint(self.clean[images], self.noise[images], self.mask)

    def __call__(self, x: Tensor, sigma_next: Tensor, last: bool) -> Tensor:
        kept = self.clean if last else add_noise(self.clean, self.noise, sigma_next)
        return (1 - self.mask) * kept + self.mask * x


def denoise(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor,
    callback: StepCallback | None = None,
    inpaint: Inpaint | None = None,
) -> Tensor:
    """Euler integration x <- x + (t_next - t) v from sigmas[0] to sigmas[-1]; x (B, L, C) tokens.

    The velocity gets one noise level t (1,) for the whole batch: the transformer embeds it once and broadcasts it,
    so an image's numbers do not depend on the batch it is in. The update runs in float32 and is cast back to the
    velocity's dtype, as diffusers' scheduler does.
    """
    steps = len(sigmas) - 1
    for i in range(steps):
        t = sigmas[i].reshape(1)
        v = velocity(x, t)
        if callback is not None:
            x0 = (x.float() - sigmas[i] * v.float()).to(v.dtype)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
        if inpaint is not None:
            x = inpaint(x, sigmas[i + 1], last=i == steps - 1)
        if callback is not None:
            callback(i, steps, x0)
    return x


def cfg_velocity(
    cond: Velocity, uncond: Velocity, scale: float, interval: tuple[float, float] = (0.0, 1.0)
) -> Velocity:
    """Real classifier-free guidance: v_u + scale (v_c - v_u) (klein Base, FLUX2.md §6).

    `interval` (lo, hi): guidance only at noise levels lo <= t <= hi, the conditional velocity alone
    elsewhere, and no unconditional pass there (Kynkaanniemi et al. 2024, "Applying guidance in a limited
    interval"). The default (0, 1) guides every step, as diffusers does.
    """
    lo, hi = torch.tensor(interval, dtype=torch.float32).tolist()  # the bounds as the float32 noise levels are
    every_step = tuple(interval) == (0.0, 1.0)  # then no per-step test (on a GPU: no sync)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_c = cond(x, t)
        if not every_step and not lo <= float(t[0]) <= hi:  # one noise level per batch (`denoise`)
            return v_c
        v_u = uncond(x, t)
        return v_u + scale * (v_c - v_u)

    return velocity
