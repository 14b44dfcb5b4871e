"""Key table between our VAE (the BFL `ae.safetensors` layout) and diffusers' `AutoencoderKLFlux2`.

One declarative table of modules; a config expands it into an exact key map (the number of levels and
resnets fixes which keys exist, and diffusers numbers decoder levels in reverse). Placeholders:
`{i}` a level in diffusers' numbering, `{l}` the same level in BFL's, `{j}` a resnet within the level.
The only tensor change: diffusers' mid-block attention projections are Linear (C, C), BFL's are
1x1 convs (C, C, 1, 1); weights are reshaped (a view, no copy). Every key that maps to nothing raises,
naming it.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ..variants import AutoencoderConfig

Repeat = Literal["once", "enc_resnets", "enc_downs", "dec_resnets", "dec_ups"]

# Tensors inside one module: (diffusers suffix, BFL suffix, Linear weight <-> 1x1 conv weight).
_LAYER = (("weight", "weight", False), ("bias", "bias", False))
_RESNET = tuple(
    (f"{theirs}.{p}", f"{ours}.{p}", False)
    for theirs, ours in (
        ("norm1", "norm1"),
        ("conv1", "conv1"),
        ("norm2", "norm2"),
        ("conv2", "conv2"),
        ("conv_shortcut", "nin_shortcut"),  # present only where the width changes
    )
    for p in ("weight", "bias")
)
_ATTENTION = (
    ("group_norm.weight", "norm.weight", False),
    ("group_norm.bias", "norm.bias", False),
    ("to_q.weight", "q.weight", True),
    ("to_q.bias", "q.bias", False),
    ("to_k.weight", "k.weight", True),
    ("to_k.bias", "k.bias", False),
    ("to_v.weight", "v.weight", True),
    ("to_v.bias", "v.bias", False),
    ("to_out.0.weight", "proj_out.weight", True),
    ("to_out.0.bias", "proj_out.bias", False),
)
_BATCHNORM = tuple((name, name, False) for name in ("running_mean", "running_var", "num_batches_tracked"))

# (diffusers module, BFL module, where it repeats, tensors inside)
VAE_DIFFUSERS: tuple[tuple[str, str, Repeat, tuple[tuple[str, str, bool], ...]], ...] = (
    ("encoder.conv_in", "encoder.conv_in", "once", _LAYER),
    ("encoder.down_blocks.{i}.resnets.{j}", "encoder.down.{l}.block.{j}", "enc_resnets", _RESNET),
    ("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down.{l}.downsample.conv", "enc_downs", _LAYER),
    ("encoder.mid_block.resnets.0", "encoder.mid.block_1", "once", _RESNET),
    ("encoder.mid_block.attentions.0", "encoder.mid.attn_1", "once", _ATTENTION),
    ("encoder.mid_block.resnets.1", "encoder.mid.block_2", "once", _RESNET),
    ("encoder.conv_norm_out", "encoder.norm_out", "once", _LAYER),
    ("encoder.conv_out", "encoder.conv_out", "once", _LAYER),
    ("quant_conv", "encoder.quant_conv", "once", _LAYER),
    ("post_quant_conv", "decoder.post_quant_conv", "once", _LAYER),
    ("decoder.conv_in", "decoder.conv_in", "once", _LAYER),
    ("decoder.mid_block.resnets.0", "decoder.mid.block_1", "once", _RESNET),
    ("decoder.mid_block.attentions.0", "decoder.mid.attn_1", "once", _ATTENTION),
    ("decoder.mid_block.resnets.1", "decoder.mid.block_2", "once", _RESNET),
    ("decoder.up_blocks.{i}.resnets.{j}", "decoder.up.{l}.block.{j}", "dec_resnets", _RESNET),
    ("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up.{l}.upsample.conv", "dec_ups", _LAYER),
    ("decoder.conv_norm_out", "decoder.norm_out", "once", _LAYER),
    ("decoder.conv_out", "decoder.conv_out", "once", _LAYER),
    ("bn", "bn", "once", _BATCHNORM),
)


def _indices(repeat: Repeat, cfg: AutoencoderConfig) -> list[dict[str, int]]:
    """Placeholder values for one table row: diffusers level i, BFL level l, resnet j."""
    n = len(cfg.channels)
    if repeat == "once":
        return [{}]
    if repeat == "enc_resnets":  # same level order in both layouts
        return [{"i": i, "l": i, "j": j} for i in range(n) for j in range(cfg.num_res_blocks)]
    if repeat == "enc_downs":  # every encoder level but the last
        return [{"i": i, "l": i} for i in range(n - 1)]
    if repeat == "dec_resnets":  # diffusers up_blocks.0 is BFL up.{n-1} (lowest resolution)
        return [{"i": i, "l": n - 1 - i, "j": j} for i in range(n) for j in range(cfg.num_res_blocks + 1)]
    if repeat == "dec_ups":  # every decoder level but BFL's up.0
        return [{"i": i, "l": n - 1 - i} for i in range(n - 1)]
    raise ValueError(f"unknown repeat {repeat!r}")


def vae_key_map(cfg: AutoencoderConfig) -> dict[str, tuple[str, bool]]:
    """Every diffusers key a VAE of shape `cfg` may have -> (BFL key, whether it is a Linear/1x1 weight)."""
    out: dict[str, tuple[str, bool]] = {}
    for theirs, ours, repeat, tensors in VAE_DIFFUSERS:
        for idx in _indices(repeat, cfg):
            their_module, our_module = theirs.format(**idx), ours.format(**idx)
            for their_leaf, our_leaf, reshape in tensors:
                out[f"{their_module}.{their_leaf}"] = (f"{our_module}.{our_leaf}", reshape)
    return out


def _raise_unmapped(keys: list[str], layout: str) -> None:
    names = sorted(keys)
    shown = ", ".join(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")
    raise ValueError(f"{len(names)} {layout} VAE key(s) map to nothing: {shown}")


def vae_from_diffusers(sd: dict[str, Tensor], cfg: AutoencoderConfig) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLFlux2` state dict -> ours (BFL layout)."""
    key_map = vae_key_map(cfg)
    unmapped = [k for k in sd if k not in key_map]
    if unmapped:
        _raise_unmapped(unmapped, "diffusers")
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        ours, is_projection = key_map[key]
        # attention projections: Linear (C, C) -> 1x1 conv (C, C, 1, 1); a view, no copy
        out[ours] = tensor.reshape(tensor.shape[0], -1, 1, 1) if is_projection else tensor
    return out


def vae_to_diffusers(sd: dict[str, Tensor], cfg: AutoencoderConfig) -> dict[str, Tensor]:
    """Ours (BFL layout) -> diffusers `AutoencoderKLFlux2` state dict."""
    key_map = {ours: (theirs, reshape) for theirs, (ours, reshape) in vae_key_map(cfg).items()}
    unmapped = [k for k in sd if k not in key_map]
    if unmapped:
        _raise_unmapped(unmapped, "BFL")
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        theirs, is_projection = key_map[key]
        # attention projections: 1x1 conv (C, C, 1, 1) -> Linear (C, C); a view, no copy
        out[theirs] = tensor.reshape(tensor.shape[0], -1) if is_projection else tensor
    return out
