"""The FLUX.2 VAE (KL autoencoder + 2x2 patchify + BatchNorm latent statistics), as pure math.

Module attributes mirror the official BFL `ae.safetensors` layout (`encoder.down.0.block.1.norm1`,
`encoder.mid.attn_1.q`, `decoder.up.3.upsample.conv`, `bn.running_var`, ...), so official files load
without renaming; diffusers folders convert through `flux2studio.layouts.vae`.
Structure and numbers: FLUX2.md §5; numerics follow diffusers 0.42.1 `AutoencoderKLFlux2` and BFL's
`flux2/autoencoder.py`.

Shapes for the default config (4 levels, z = 32, patch 2): image (B, 3, H, W) in [-1, 1]
  -> moments (B, 64, H/8, W/8) -> mean (B, 32, H/8, W/8) -> patchified (B, 128, H/16, W/16) -> normalised.

This module does not know about files, devices, PIL images or the transformer; it never samples from the
posterior (encoding uses its mean) and never updates the BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..variants import AutoencoderConfig

# GroupNorm eps of every norm in the VAE (BFL autoencoder.py and diffusers vae.py: 1e-6).
NORM_EPS = 1e-6


def patchify(z: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, C*p*p, H/p, W/p); channel order (c pi pj) as diffusers' `_patchify_latents`."""
    if z.shape[-2] % p or z.shape[-1] % p:
        raise ValueError(f"latent size {tuple(z.shape[-2:])} must be a multiple of the patch size {p}")
    return rearrange(z, "b c (i pi) (j pj) -> b (c pi pj) i j", pi=p, pj=p)


def unpatchify(zp: Tensor, p: int) -> Tensor:
    """(B, C*p*p, h, w) -> (B, C, h*p, w*p); the inverse of `patchify`."""
    if zp.shape[1] % (p * p):
        raise ValueError(f"{zp.shape[1]} channels cannot be unpatchified: not a multiple of {p}*{p}")
    return rearrange(zp, "b (c pi pj) i j -> b c (i pi) (j pj)", pi=p, pj=p)


def _silu(h: Tensor) -> Tensor:
    """SiLU of a result nothing else holds: in place where no gradient needs its input (the same numbers)."""
    return F.silu(h, inplace=not torch.is_grad_enabled())


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=NORM_EPS, affine=True)


def tile_grid(size: int, out: int) -> tuple[int, int, int]:
    """Tiles of `size` inputs (pixels or latents) a side, each giving `out` outputs a side -> (inputs between tile
    starts, outputs blended with the previous tile, outputs of each tile kept): a quarter overlaps, as diffusers
    tiles `AutoencoderKLFlux2`."""
    blend = int(out * 0.25)
    return int(size * 0.75), blend, out - blend


def _each(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """`fn` over the images of a batch x (B, ...) one at a time, the results written into one tensor: each image's
    numbers are those it has alone (a convolution over a batch can round otherwise), and the work memory is one
    image's (as diffusers' `enable_slicing()`)."""
    first = fn(x[:1])
    if x.shape[0] == 1:
        return first
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    out[:1] = first
    del first
    for i in range(1, x.shape[0]):
        out[i : i + 1] = fn(x[i : i + 1])
    return out


def _fade(a: Tensor, b: Tensor, extent: int, dim: int) -> None:
    """Blend the last `extent` rows (dim 2) or columns (dim 3) of `a` into the first of `b`, in place: row k is
    a's share (1 - k/extent) plus b's (k/extent), row by row in diffusers' order and arithmetic."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for k in range(extent):
        b.select(dim, k).copy_(
            a.select(dim, a.shape[dim] - extent + k) * (1 - k / extent) + b.select(dim, k) * (k / extent)
        )


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))); a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        # one step a line, each result freeing the one before (nested calls kept conv1's output alive through
        # conv2), the SiLUs in place: one or two feature maps fewer at the encoder's and decoder's peaks
        h = _silu(self.norm1(x))
        h = self.conv1(h)
        h = _silu(self.norm2(h))
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, projections stored as 1x1 convs (the BFL layout).

    `forward` applies the projections as Linear layers through their `.weight` and `.bias`, so a wrapper
    module put in place of `q`, `k`, `v` or `proj_out` (a LoRA layer, say) is not called.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.sdpa: Callable[[Tensor, Tensor, Tensor], Tensor] = F.scaled_dot_product_attention  # see set_attention

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, H*W, C)
        # A 1x1 conv is a Linear over tokens; applied as one so the sums run in diffusers' order.
        q, k, v = (F.linear(tokens, p.weight.flatten(1), p.bias) for p in (self.q, self.k, self.v))
        h = self.sdpa(q[:, None], k[:, None], v[:, None])[:, 0]  # one head of width C
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, H*W, C)
        # h first, viewed as diffusers views it: the sum then keeps h's channels-last strides (a lone image's batch
        # stride included), so the convs that follow pick the same CPU kernels and the whole VAE matches diffusers
        # bit for bit (tests/test_vae.py).
        return h.transpose(1, 2).reshape(*x.shape) + x


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom by one (BFL's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution: `num_res_blocks` resnets, then a 2x downsample except on the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in pairwise(widths))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: `num_res_blocks + 1` resnets, then a 2x upsample except on level 0."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in pairwise(widths))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2z, H/f, W/f), f = 2^(levels-1); mean first, then log-variance."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, n, groups = cfg.channels, len(cfg.channels), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        # level i takes the width of level i-1 (level 0 that of conv_in) and ends with width ch[i]
        self.down = nn.ModuleList(
            DownLevel(ch[max(i - 1, 0)], ch[i], cfg.num_res_blocks, groups, downsample=i < n - 1) for i in range(n)
        )
        self.mid = MidBlock(ch[-1], groups)
        self.norm_out = _group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.z_channels, kernel_size=3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for level in self.down:
            h = level(h)  # (B, ch[-1], H/f, W/f) after the last level
        h = self.mid(h)
        h = self.conv_out(_silu(self.norm_out(h)))  # (B, 2z, H/f, W/f)
        return self.quant_conv(h)


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h*f, w*f). `up[0]` is the highest resolution; runs last."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, n, groups = cfg.decoder_channels or cfg.channels, len(cfg.channels), cfg.norm_groups
        if len(ch) != n:
            raise ValueError(f"decoder_channels {ch} must have one width per level ({n} levels)")
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, ch[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(ch[-1], groups)
        # level l takes the width of level l+1 (the top level that of conv_in) and ends with width ch[l]
        self.up = nn.ModuleList(
            UpLevel(ch[min(l + 1, n - 1)], ch[l], cfg.num_res_blocks + 1, groups, upsample=l > 0) for l in range(n)
        )
        self.norm_out = _group_norm(ch[0], groups)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z))  # (B, ch[-1], h, w)
        h = self.mid(h)
        for level in reversed(self.up):  # lowest resolution first
            h = level(h)  # (B, ch[0], h*f, w*f) after up[0]
        return self.conv_out(_silu(self.norm_out(h)))  # (B, 3, h*f, w*f)


class AutoEncoder(nn.Module):
    """FLUX.2 VAE: images in [-1, 1] <-> normalised patchified latents (B, 4z, H/16, W/16).

    Inputs must already be in the module's dtype and device. `bn` only stores the latent statistics
    (it is never run, so `train()` cannot change them); normalisation uses them in eval form.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.bn = nn.BatchNorm2d(cfg.latent_channels, eps=cfg.bn_eps, affine=False)

    def set_attention(self, sdpa: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        """Run the mid-block attentions with `sdpa` (the signature of F.scaled_dot_product_attention, no mask)."""
        for module in self.modules():
            if isinstance(module, AttnBlock):
                module.sdpa = sdpa

    def moments(self, x: Tensor) -> Tensor:
        """Image (B, 3, H, W) -> posterior mean and log-variance (B, 2z, H/8, W/8), before patchify."""
        return self.encoder(x)

    def normalize(self, zp: Tensor) -> Tensor:
        """Patchified latents (B, 4z, h, w) -> (zp - running_mean) / sqrt(running_var + eps)."""
        mean, std = self._stats(zp)
        return (zp - mean) / std

    def denormalize(self, zp: Tensor) -> Tensor:
        """Inverse of `normalize`: zp * sqrt(running_var + eps) + running_mean."""
        mean, std = self._stats(zp)
        return zp * std + mean

    def encode(self, x: Tensor, tile: int | None = None) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> normalised latents (B, 4z, H/16, W/16), posterior mean, one image at a
        time (`_each`). With `tile` (pixels) and an image larger than a tile, encoded in overlapping tiles (as
        diffusers' `enable_tiling()`: one tile's work memory; the latents near the seams differ from a whole
        encode's)."""
        if x.shape[-2] % self.cfg.downscale or x.shape[-1] % self.cfg.downscale:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {self.cfg.downscale}")

        def mean(image: Tensor) -> Tensor:  # (B, z, H/8, W/8); the log-variance is unused
            return self.moments(image)[:, : self.cfg.z_channels]

        f = self.cfg.spatial_scale
        tiled = tile is not None and max(x.shape[-2:]) > tile
        one = (lambda image: self._tiled(mean, image, tile, tile // f)) if tiled else mean
        return self.normalize(patchify(_each(one, x), self.cfg.patch))

    def decode_raw(self, z: Tensor) -> Tensor:
        """Unpatchified, unnormalised latents (B, z, H/8, W/8) -> image (B, 3, H, W)."""
        return self.decoder(z)

    def decode(self, zp: Tensor, tile: int | None = None) -> Tensor:
        """Normalised latents (B, 4z, H/16, W/16) -> image (B, 3, H, W), roughly in [-1, 1], one image at a time
        (`_each`). With `tile` (pixels) and an image larger than a tile, decoded in overlapping tiles
        (`decode_tiled`)."""
        if zp.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"latents have {zp.shape[1]} channels, expected {self.cfg.latent_channels}")
        z = unpatchify(self.denormalize(zp), self.cfg.patch)
        return _each(self.decode_raw if tile is None else lambda one: self.decode_tiled(one, tile), z)

    def decode_tiled(self, z: Tensor, tile: int) -> Tensor:
        """Unpatchified latents (B, z, H/8, W/8) -> image, decoded in `tile` x `tile` pixel tiles (`_tiled`; images
        no larger than a tile are decoded whole). The decoder's work memory is one tile's; the numbers differ from
        a whole decode near the seams (each tile sees only its own context)."""
        f = self.cfg.spatial_scale
        if max(z.shape[-2:]) * f <= tile:
            return self.decode_raw(z)
        return self._tiled(self.decode_raw, z, tile // f, tile)

    @staticmethod
    def _tiled(fn: Callable[[Tensor], Tensor], x: Tensor, size: int, out: int) -> Tensor:
        """`fn` over `size` x `size` tiles of x (B, C, H, W) overlapping by a quarter, each result (`out` a side)
        blended into its upper and left neighbours linearly over a quarter of `out`, then cut and joined: the
        arithmetic and order of diffusers' `AutoencoderKLFlux2` tiled encode and decode at that tile size."""
        stride, blend, keep = tile_grid(size, out)
        rows: list[list[Tensor]] = []
        for i in range(0, x.shape[-2], stride):
            row = []
            for j in range(0, x.shape[-1], stride):
                t = fn(x[:, :, i : i + size, j : j + size])
                if rows:  # the tile above, already blended, fades into this one's top rows
                    _fade(rows[-1][len(row)], t, blend, dim=2)
                if row:  # and the tile to the left into its first columns
                    _fade(row[-1], t, blend, dim=3)
                row.append(t)
            rows.append(row)
        return torch.cat([torch.cat([t[:, :, :keep, :keep] for t in row], dim=3) for row in rows], dim=2)

    def _stats(self, zp: Tensor) -> tuple[Tensor, Tensor]:
        # sqrt in the buffers' dtype, then cast to the latents' dtype: the order diffusers' pipelines use
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(zp.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps).to(zp.dtype)
        return mean, std
