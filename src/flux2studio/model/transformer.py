"""The FLUX.2 rectified-flow transformer, as pure math.

Module attributes mirror the official BFL single-file layout (`double_blocks.N.img_attn.qkv`, ...), so
official files load without renaming; diffusers folders convert through `flux2studio.layouts.transformer`.
Numbers and structure: FLUX2.md §2-3; numerics follow diffusers 0.42.1 `transformer_flux2.py`.

This module does not know about files, devices, prompts, schedules or images: it maps
(image tokens, text tokens, positions, timestep) -> velocity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..variants import TransformerConfig

# Post-RoPE keys and values of reference tokens, one (k, v) per block (double blocks first), each
# (B, H, L_ref, head_dim). klein-9b-kv computes them once and reuses them at every step (FLUX2.md §3).
RefKV = list[tuple[Tensor, Tensor]]
SDPA = F.scaled_dot_product_attention


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (cos first) of already-scaled timesteps t (N,) -> (N, dim) in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_freqs(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """Position ids (L, n_axes) -> rotations cos + i sin (L, head_dim / 2), complex64, one per channel pair.

    Angles are computed in float64 as diffusers does (its `Flux2PosEmbed`), cos and sin cast to float32.
    """
    pos = ids.float()
    angles = []
    for i, dim in enumerate(axes_dim):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angles.append(torch.outer(pos[:, i].to(torch.float64), inv))  # (L, dim/2)
    a = torch.cat(angles, dim=-1)
    return torch.complex(a.cos().float(), a.sin().float())


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate channel pairs (x0, x1) of x (B, H, L, D) by (L, D/2) rotations, in float32.

    One complex product per pair: (x0 cos - x1 sin, x1 cos + x0 sin), the same float32 products and sums
    as diffusers' real-valued form (which builds the rotated copy and two full-size products), ~5x faster.
    `rope` is complex, or its real (cos, sin) pairs (L, D/2, 2) (`Flux2Transformer.compiled`).
    """
    if x.device.type == "mps" or not rope.is_complex():  # (complex kernels are incomplete on Apple GPUs)
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = (rope.real, rope.imag) if rope.is_complex() else rope.unbind(-1)
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rope).flatten(-2).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """adaLN: (1 + scale) * LayerNorm(x) + shift, LayerNorm without affine."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=eps) + shift


def swiglu(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


class QKNorm(nn.Module):
    """RMSNorm over the head dim for queries and keys, learnable scales (BFL: `norm.query_norm.scale`)."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.query_norm = _RMSScale(head_dim)
        self.key_norm = _RMSScale(head_dim)
        self.eps = eps

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        q = F.rms_norm(q, q.shape[-1:], self.query_norm.scale, eps=self.eps)
        k = F.rms_norm(k, k.shape[-1:], self.key_norm.scale, eps=self.eps)
        return q, k


class _RMSScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class SelfAttention(nn.Module):
    """Fused qkv projection, q/k norm and output projection of one stream."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads, eps)
        self.proj = nn.Linear(dim, dim, bias=False)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> q, k, v (B, H, L, head_dim), q and k normalised."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k)
        return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor, rope: Tensor, ref_kv=None, at: int = 0, first_query: int = 0, sdpa=SDPA):
    """Joint attention with RoPE. Returns (out (B, L - first_query, H*Dh), (k, v) post-RoPE).

    `ref_kv` (cached reference keys/values, already rotated; one copy serves a batch) are inserted after the first
    `at` tokens (the text), the layout diffusers' KV pipeline uses. Queries before `first_query` are not computed.
    """
    q, k = apply_rope(q[:, :, first_query:], rope[first_query:]), apply_rope(k, rope)
    kv = (k, v)
    if ref_kv is not None:
        ref_k, ref_v = (t.expand(k.shape[0], -1, -1, -1) for t in ref_kv)
        k = torch.cat([k[:, :, :at], ref_k, k[:, :, at:]], dim=2)
        v = torch.cat([v[:, :, :at], ref_v, v[:, :, at:]], dim=2)
    out = sdpa(q, k, v)  # (B, H, L, Dh)
    return out.transpose(1, 2).flatten(2), kv


def _own(kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Keys and values in memory of their own: the values are a view of the block's qkv projection (a single
    block's whole fused one where it runs whole), which a cache holding the view would keep alive (3-9x the values'
    bytes, every block, the whole phase)."""
    return kv[0].contiguous(), kv[1].contiguous()


def _call(block: nn.Module, *args):
    return block(*args)


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt; img]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
        self.eps = cfg.eps
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        # Sequential so keys read img_mlp.0 / img_mlp.2 as in the BFL files; index 1 is the SwiGLU.
        self.img_mlp = nn.Sequential(nn.Linear(d, 2 * mlp, bias=False), _SwiGLU(), nn.Linear(mlp, d, bias=False))
        self.txt_mlp = nn.Sequential(nn.Linear(d, 2 * mlp, bias=False), _SwiGLU(), nn.Linear(mlp, d, bias=False))

    def forward(self, img, txt, rope, mod_img, mod_txt, ref_kv=None, sdpa=SDPA):
        """img (B, Li, D), txt (B, Lt, D); mod_* = 6 tensors (B, 1, D) or (B, L, D) each."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mod_img
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = mod_txt
        iq, ik, iv = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1, self.eps))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1, self.eps))
        n_txt = txt.shape[1]
        q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))
        out, kv = attention(q, k, v, rope, ref_kv, at=n_txt, sdpa=sdpa)
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]

        img = img + i_gate1 * self.img_attn.proj(img_out)
        img = img + i_gate2 * chunked(self.img_mlp, modulate(img, i_shift2, i_scale2, self.eps))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + t_gate2 * chunked(self.txt_mlp, modulate(txt, t_shift2, t_scale2, self.eps))
        return img, txt, kv


def chunked(mlp: nn.Module, x: Tensor) -> Tensor:
    """mlp(x) (B, L, D), TOKEN_CHUNK tokens at a time at inference: row by row the same numbers, with the
    hidden activations of one chunk alive instead of all L tokens'."""
    if torch.is_grad_enabled() or x.shape[1] <= TOKEN_CHUNK:
        return mlp(x)
    return torch.cat([mlp(x[:, s : s + TOKEN_CHUNK]) for s in range(0, x.shape[1], TOKEN_CHUNK)], dim=1)


class SingleStreamBlock(nn.Module):
    """Parallel block: one fused input projection (qkv + MLP-in) and one fused output projection."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.mlp_hidden = int(d * cfg.mlp_ratio)
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.linear1 = nn.Linear(d, 3 * d + 2 * self.mlp_hidden, bias=False)
        self.linear2 = nn.Linear(d + self.mlp_hidden, d, bias=False)
        self.norm = QKNorm(cfg.head_dim, cfg.eps)
        # inference may compute linear1's rows apart (below): true only while linear1 is exactly x @ weight.T,
        # which whoever runs the model decides (`pipeline.allow_split_projection`); off, it is called whole
        self.split_linear1 = False

    def forward(self, x, rope, mod, n_txt: int = 0, ref_kv=None, image_only: bool = False, sdpa=SDPA):
        """x (B, L, D) = [txt; img]; mod = (shift, scale, gate).

        `image_only` (the last block, whose text outputs nobody reads): text tokens give keys and values
        only, and the block returns the image tokens (B, L - n_txt, D): the same numbers for them, without
        the text tokens' queries, MLP and output projection (~3% of a klein step).

        Inference with `split_linear1` (set where linear1 is a plain linear map of its weight) computes its rows
        in two parts, qkv for every token and MLP-in for TOKEN_CHUNK tokens at a time, written straight into
        linear2's input: the same numbers, without holding the whole fused projection (at 512x512 on
        klein-4b, 81 MiB plus its SwiGLU and concatenation copies) at once.
        """
        shift, scale, gate = mod
        d = x.shape[-1]
        first = n_txt if image_only else 0
        h = modulate(x, shift, scale, self.eps)
        lin = self.linear1
        if self.split_linear1 and not torch.is_grad_enabled():
            qkv, mlp = F.linear(h, lin.weight[: 3 * d]), None
        else:
            qkv, mlp = lin(h).split([3 * d, 2 * self.mlp_hidden], dim=-1)
            mlp = mlp[:, first:]
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k)
        out, kv = attention(q, k, v, rope, ref_kv, at=n_txt, first_query=first, sdpa=sdpa)
        del qkv, q, k, v
        if mlp is not None:
            return x[:, first:] + gate * self.linear2(torch.cat([out, swiglu(mlp)], dim=-1)), kv
        joint = out.new_empty((*out.shape[:-1], d + self.mlp_hidden))  # [attention | SwiGLU(MLP-in)]
        joint[..., :d] = out
        del out
        for start in range(first, x.shape[1], TOKEN_CHUNK):
            stop = min(start + TOKEN_CHUNK, x.shape[1])
            joint[:, start - first : stop - first, d:] = swiglu(F.linear(h[:, start:stop], lin.weight[3 * d :]))
        return x[:, first:] + gate * self.linear2(joint), kv


TOKEN_CHUNK = 512  # tokens per MLP chunk at inference: GEMMs stay large, activations stay small


class _SwiGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear on a sinusoidal embedding (BFL `time_in`, `guidance_in`)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """SiLU -> Linear(D, n*D), computed once per forward and shared by all blocks of one kind."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)  # n x (B, 1, D)


class LastLayer(nn.Module):
    """adaLN (BFL order: shift, scale) then projection to the 128 latent channels."""

    def __init__(self, dim: int, out_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale, self.eps))


class Flux2Transformer(nn.Module):
    """FLUX.2 transformer: (B, L_img, 128) image tokens + (B, L_txt, C) text embeddings -> velocity."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d, bias=False)
        self.txt_in = nn.Linear(cfg.context_dim, d, bias=False)
        self.time_in = MLPEmbedder(cfg.timestep_dim, d)
        self.guidance_in = MLPEmbedder(cfg.timestep_dim, d) if cfg.guidance_embed else None
        self.double_stream_modulation_img = Modulation(d, 6)
        self.double_stream_modulation_txt = Modulation(d, 6)
        self.single_stream_modulation = Modulation(d, 3)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(d, cfg.in_channels, cfg.eps)
        self.grad_checkpointing = False  # training: recompute block activations in backward to save memory
        # (q, k, v) (B, H, L, Dh) -> (B, H, Lq, Dh); a pipeline may give a faster kernel with the same arithmetic
        self.sdpa: Callable[[Tensor, Tensor, Tensor], Tensor] = SDPA
        # blocks run through torch.compile (`pipeline.compile_blocks`): they get the rotations as real (cos, sin)
        # pairs (L, D/2, 2), since torch.compile generates no code for complex numbers; the same products
        self.compiled = False

    def _rope(self, ids: Tensor) -> Tensor:
        rope = rope_freqs(ids, self.cfg.axes_dim, self.cfg.theta)
        return torch.view_as_real(rope) if self.compiled else rope

    @staticmethod
    def _checkpointed(block: nn.Module, *args):
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

    def embed_time(self, t: Tensor, guidance: Tensor | None, dtype: torch.dtype) -> Tensor:
        """t, guidance (B,) in [0, 1] / guidance scale -> vec (B, D); (1,) ones -> (1, D), broadcast over the batch.
        Scaled by 1000 (FLUX2.md §2)."""
        # Cast before scaling, as diffusers does: in bf16 the timestep is rounded like the reference.
        t = t.to(dtype) * 1000
        vec = self.time_in(timestep_embedding(t, self.cfg.timestep_dim).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this transformer embeds guidance: pass a guidance scale")
            g = guidance.to(dtype) * 1000
            vec = vec + self.guidance_in(timestep_embedding(g, self.cfg.timestep_dim).to(dtype))
        return vec

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        t: Tensor,
        guidance: Tensor | None = None,
        ref_kv: RefKV | None = None,
    ) -> Tensor:
        """img (B, Li, 128), img_ids (Li, 4), txt (B, Lt, C), txt_ids (Lt, 4), t (B,) -> (B, Li, 128). A t (and
        guidance) of shape (1,) serves every image (the sampler's): embedded once, so each image's numbers are those
        it has alone (B rows through `time_in` can round otherwise than one).

        `img` may carry reference tokens after the target tokens (plain multi-reference); the output then
        covers every image token and the caller slices the target part. With `ref_kv` (from `ref_kv()`),
        reference tokens are not in `img`: their cached keys/values are attended to instead.
        """
        vec = self.embed_time(t, guidance, img.dtype)
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        img, txt = self.img_in(img), self.txt_in(txt)
        rope = self._rope(torch.cat([txt_ids, img_ids]))
        n_txt, n_double = txt.shape[1], len(self.double_blocks)

        run = self._checkpointed if self.grad_checkpointing and torch.is_grad_enabled() else _call
        for i, block in enumerate(self.double_blocks):
            img, txt, _ = run(block, img, txt, rope, mod_img, mod_txt, ref_kv[i] if ref_kv else None, self.sdpa)
        x = torch.cat([txt, img], dim=1)
        last = len(self.single_blocks) - 1
        for i, block in enumerate(self.single_blocks):
            kv_i = ref_kv[n_double + i] if ref_kv else None
            x, _ = run(block, x, rope, mod_single, n_txt, kv_i, i == last, self.sdpa)
        return self.final_layer(x if self.single_blocks else x[:, n_txt:], vec)

    def ref_kv(self, ref: Tensor, ref_ids: Tensor, t: Tensor, guidance: Tensor | None = None) -> RefKV:
        """Keys/values of reference tokens that attend only to themselves (klein-9b-kv, FLUX2.md §3).

        ref (B, Lr, 128), ref_ids (Lr, 4), t (B,) the fixed reference timestep (0 for klein-9b-kv).
        Reference tokens see neither text nor target tokens, so running them alone through every block
        gives exactly the keys/values they have inside the joint sequence, at every denoising step.
        """
        vec = self.embed_time(t, guidance, ref.dtype)
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)
        x = self.img_in(ref)
        no_txt = x[:, :0]  # (B, 0, D): the double blocks run on the image stream alone
        rope = self._rope(ref_ids)
        out: RefKV = []
        for block in self.double_blocks:
            x, _, kv = block(x, no_txt, rope, mod_img, mod_txt, sdpa=self.sdpa)
            out.append(_own(kv))
        for block in self.single_blocks:
            x, kv = block(x, rope, mod_single, sdpa=self.sdpa)
            out.append(_own(kv))
        return out
