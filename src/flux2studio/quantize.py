"""Linear weights that stay quantized at run time: int8, 4-bit, and the GGUF block formats people share.

Every quantized weight is one uint8 tensor of rows of blocks, (out_features, row_bytes), and a type name:
- "int8" (ours): per output channel, each row its in_features int8 values then its fp32 scale
  (w = q * scale). On a CPU it multiplies with dynamically quantized activations (per token, int8) through
  PyTorch's `torch._int_mm` where the CPU has AVX512-VNNI or AMX, else oneDNN's int8 kernel (`int8_kernel`);
  elsewhere it is dequantized per layer.
- GGUF's blocks, byte for byte as ggml lays them out: Q8_0, Q4_0 (our "int4": 32 weights per block, an fp16
  scale, w = d * (q - 8)), Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, and the plain F16 / BF16 / F32, all unpacked
  in PyTorch on the weight's device, bit for bit what the `gguf` package's dequantizer gives. Every block
  format is dequantized one layer at a time as the layer runs, in the compute dtype, and dropped after.
- "fp8" (ours): per output channel, each row its in_features e4m3 values then its fp32 scale. On GPUs with fp8
  units one `torch._scaled_mm` product with per-token e4m3 activations; elsewhere dequantized per layer.
- bitsandbytes' 4-bit "bnb-nf4-bf16", "bnb-fp4-fp16"... (code, then the dtype the file's weights had: the folders
  diffusers and transformers save with `BitsAndBytesConfig(load_in_4bit=True)`): the one format whose scales are
  apart from its rows. The rows are the file's bytes as they are (two weights a byte, the first in the high
  nibble), blocks of 64 weights each scaled by its absmax, kept in a second uint8 tensor of fp32 values,
  (out_features, in_features / 64 * 4): w = code[q] * absmax in fp32, rounded to that dtype, as bitsandbytes.
- ComfyUI's int8, "comfy-int8": the file's int8 weights as they are (out, in), their fp32 scales apart (one a row);
  multiplied in int8 as "int8" is. "comfy-int8-rot256" (and other powers of 4): its "convrot" layers, whose weights
  were rotated before quantizing, each group of that many inputs by a regular Hadamard matrix; the input is rotated
  alike before the product, and the weight rotated back when it is wanted whole.
- ComfyUI's "nvfp4" and "mxfp8" (its per-layer `comfy_quant` formats, made by comfy-kitchen: BFL's
  flux-2-klein-*-nvfp4 files, Comfy-Org's fp4mixed text encoders), scales apart too. nvfp4: the file's bytes as
  rows (two e2m1 weights a byte, the first in the high nibble), per row its blocks' e4m3 scales (one per 16
  weights) then the tensor's fp32 scale (one per layer, kept on every row so fused rows keep theirs). mxfp8: the
  e4m3 weights as rows, per row its blocks' e8m0 exponents (one per 32). Both unpack as comfy-kitchen does, in
  the dtype asked for, bit for bit.

So a file written by `flux2 convert --quantize int4` and a GGUF Q4_0 file hold the same bytes per row.
This module knows nothing of models or files beyond the tensors it is given (`QuantLinear` is an
`nn.Linear`, so LoRA hooks and per-layer widening of its bias see it as one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import QUANTIZE_CHOICES, cpu_bf16_native, cpu_capped, cpu_features, dequantized
from .residency import drop_file_pages, scratch

MODE_FORMAT = {"int8": "int8", "int4": "Q4_0", "fp8": "fp8"}  # --quantize -> the stored format
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# GGUF types we run: (weights per block, bytes per block); F16/BF16/F32 are one weight a "block"
GGUF_BLOCKS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
# bitsandbytes' 4-bit codes (its `get_4bit_type`: NF4 the normal quantiles of QLoRA, FP4 sign-exponent-mantissa
# values over their largest, 12); a file's `quant_map` is checked against them
BNB_CODES = {
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0),
    "fp4": tuple(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3)),
}  # fmt: skip
BNB_BLOCK = 64  # weights per absmax: what diffusers and transformers write for 4-bit
BNB_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the weights' dtype, rounded to
BNB_FORMATS = {f"bnb-{code}-{name}": (code, dtype) for code in BNB_CODES for name, dtype in BNB_DTYPES.items()}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # fp4 e2m1 codes
# ComfyUI's block formats: (weights per block, bytes of those weights in a row)
COMFY_BLOCKS = {"nvfp4": (16, 8), "mxfp8": (32, 32)}
# ComfyUI's int8 layers: the group size their weights were rotated in (0: not rotated)
COMFY_INT8 = {"comfy-int8": 0, **{f"comfy-int8-rot{g}": g for g in (16, 64, 256, 1024)}}
FORMATS = ("int8", "fp8", *GGUF_BLOCKS, *BNB_FORMATS, *COMFY_BLOCKS, *COMFY_INT8)
PLAIN_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}  # one weight a "block"


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {mode!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    return mode


def check_format(fmt: str, where: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{where}: quantization type {fmt} is not supported; supported: {', '.join(FORMATS)}")
    return fmt


def block_shape(fmt: str) -> tuple[int, int]:
    """(weights, bytes) of one block of a GGUF, bitsandbytes or ComfyUI format (the last two keep scales apart)."""
    return GGUF_BLOCKS.get(fmt) or COMFY_BLOCKS.get(fmt) or (BNB_BLOCK, BNB_BLOCK // 2)


def scale_bytes(fmt: str, in_features: int) -> int | None:
    """Bytes a row's scales take apart from the row (`QuantLinear.scales`), or None for formats that hold them in
    the row: bitsandbytes' an fp32 absmax a block; nvfp4 an e4m3 byte a block, then the tensor's fp32 scale;
    mxfp8 an e8m0 byte a block; ComfyUI's int8 an fp32 scale."""
    if fmt in BNB_FORMATS:
        return in_features // BNB_BLOCK * 4
    if fmt in COMFY_BLOCKS:
        return in_features // COMFY_BLOCKS[fmt][0] + (4 if fmt == "nvfp4" else 0)
    return 4 if fmt in COMFY_INT8 else None


def int8_weights(fmt: str) -> bool:
    """Whether `fmt` stores int8 weights with a scale a row (multiplied in int8 on a CPU)."""
    return fmt == "int8" or fmt in COMFY_INT8


def row_bytes(fmt: str, in_features: int) -> int:
    """Bytes of one stored row of `in_features` weights in `fmt`."""
    if fmt in ("int8", "fp8"):
        return in_features + 4
    if fmt in COMFY_INT8:
        return in_features
    per, size = block_shape(fmt)
    if in_features % per:
        raise ValueError(f"{fmt} packs {per} weights a block; a row of {in_features} does not divide")
    return in_features // per * size


def row_inputs(fmt: str, nbytes: int) -> int:
    """How many weights a stored row of `nbytes` bytes in `fmt` holds (`row_bytes`' inverse)."""
    if fmt in ("int8", "fp8"):
        return nbytes - 4
    if fmt in COMFY_INT8:
        return nbytes
    per, size = block_shape(fmt)
    return nbytes // size * per


# ----------------------------------------------------------------------------- packing


def quantize_weight(w: Tensor, fmt: str) -> Tensor:
    """A float weight (out, in) -> its packed rows in `fmt` ("int8" or "Q4_0"; others through `gguf`)."""
    w = w.detach().float()
    if fmt == "int8":
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
        return torch.cat([q.view(torch.uint8), scale.view(torch.uint8).reshape(-1, 4)], dim=1)
    if fmt == "fp8":  # e4m3, the row's largest magnitude at 448
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
        q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch.cat([q.view(torch.uint8), scale.view(torch.uint8).reshape(-1, 4)], dim=1)
    if fmt == "Q4_0":  # ggml's rule: d = (the value of largest magnitude) / -8, q = round(w / d) + 8 in 0..15
        blocks = w.reshape(w.shape[0], -1, 32)
        idx = blocks.abs().argmax(dim=-1, keepdim=True)
        d = blocks.gather(-1, idx) / -8  # the inverse from the fp32 scale, the stored scale in fp16 (as ggml)
        inv = torch.where(d == 0, 0.0, 1.0 / d)
        q = torch.clamp(torch.trunc(blocks * inv + 8.5), 0, 15).to(torch.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)  # elements 0-15 in the low nibbles, 16-31 in the high ones
        return torch.cat([d.to(torch.float16).view(torch.uint8), qs], dim=-1).reshape(w.shape[0], -1)
    if fmt in PLAIN_DTYPES:
        return w.to(PLAIN_DTYPES[fmt]).view(torch.uint8)
    import gguf

    packed = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, fmt))
    return torch.from_numpy(packed)


def dequantize_weight(
    packed: Tensor,
    fmt: str,
    in_features: int,
    dtype: torch.dtype,
    scales: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Packed rows (and for formats with scales apart their `scales`, `scale_bytes`) -> the float weight (out, in)
    in `dtype`, unpacked a few rows at a time into the result (the fp32 temporaries stay in the CPU's cache: 2.5x
    faster than whole-matrix passes on a 3072x12288 Q4_0 weight, the same numbers); into `out` where given."""
    n = packed.shape[0]
    if fmt in PLAIN_DTYPES:
        plain = packed.contiguous().view(PLAIN_DTYPES[fmt])
        return plain.to(dtype) if out is None else out.copy_(plain)
    if out is None:
        out = torch.empty(n, in_features, dtype=dtype, device=packed.device)
    rows = max(1, UNPACK_ELEMENTS // in_features)
    for start in range(0, n, rows):
        part = packed[start : start + rows]
        if fmt in SCALED_UNPACKERS:
            part_scales = scales[start : start + rows]
            out[start : start + rows] = SCALED_UNPACKERS[fmt](part, part_scales, fmt, in_features, dtype)
        else:
            out[start : start + rows] = ROW_UNPACKERS[fmt](part, in_features)
    return out


def bnb_scales_bytes(absmax: Tensor, out_features: int) -> Tensor:
    """Blocks' fp32 absmax in row order -> the uint8 (out, blocks a row * 4) tensor a "bnb-" layer keeps (a view
    where it can be: the file's own bytes)."""
    return absmax.float().contiguous().view(torch.uint8).reshape(out_features, -1)


@functools.cache
def _byte_pairs(code: tuple[float, ...], device: torch.device) -> Tensor:
    """(256, 2) fp32: the two 4-bit weights' values each byte holds (high nibble first). Looking a byte up whole
    (an embedding lookup) unpacks 1.8x faster than gathering nibbles (3072x12288 on 2 Zen 4 cores: 77 vs 140 ms)."""
    table = torch.tensor(code, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([table[byte >> 4], table[byte & 0x0F]], dim=-1).to(device)


def _nibble_values(packed: Tensor, code: tuple[float, ...], block: int) -> Tensor:
    """Rows of bytes (n, in / 2) -> their 4-bit weights' values, fp32 (n, in / block, block)."""
    return F.embedding(packed.long(), _byte_pairs(code, packed.device)).reshape(packed.shape[0], -1, block)


def _unpack_bnb(packed: Tensor, scales: Tensor, fmt: str, in_features: int, _dtype: torch.dtype) -> Tensor:
    """(In the file's dtype, as bitsandbytes: the caller casts.)"""
    code, dtype = BNB_FORMATS[fmt]
    absmax = scales.contiguous().view(torch.float32).unsqueeze(-1)
    return (_nibble_values(packed, BNB_CODES[code], BNB_BLOCK) * absmax).reshape(-1, in_features).to(dtype)


def _unpack_nvfp4(packed: Tensor, scales: Tensor, fmt: str, in_features: int, dtype: torch.dtype) -> Tensor:
    """comfy-kitchen's arithmetic in `dtype`: block scale times the tensor's (that rounded to `dtype` first), the
    product rounded to `dtype`, times the e2m1 value, rounded again. Each product is exact in fp32 (at most 8 + 4
    and 11 + 2 significant bits), so fp32 products rounded once are `dtype` products, bit for bit."""
    blocks = in_features // COMFY_BLOCKS[fmt][0]
    block = scales[:, :blocks].contiguous().view(torch.float8_e4m3fn).float()
    tensor = scales[:, blocks:].contiguous().view(torch.float32).to(dtype).float()
    total = (tensor * block).to(dtype).float().unsqueeze(-1)
    return (_nibble_values(packed, E2M1, COMFY_BLOCKS[fmt][0]) * total).reshape(-1, in_features).to(dtype)


def _unpack_mxfp8(packed: Tensor, scales: Tensor, fmt: str, in_features: int, dtype: torch.dtype) -> Tensor:
    """e4m3 weights times their block's power of two (e8m0: the byte is the fp32 exponent; 0 is taken as 0,
    as comfy-kitchen does), in fp32, then rounded to `dtype`."""
    per = COMFY_BLOCKS[fmt][0]
    q = packed.contiguous().view(torch.float8_e4m3fn).float().reshape(packed.shape[0], -1, per)
    exponent = scales.to(torch.int32)
    power = torch.where(exponent == 0, 0, exponent << 23).view(torch.float32).unsqueeze(-1)
    return (q * power).reshape(-1, in_features).to(dtype)


def _unpack_comfy_int8(packed: Tensor, scales: Tensor, fmt: str, in_features: int, _dtype: torch.dtype) -> Tensor:
    """q * scale in fp32, rotated back (each group of inputs times the Hadamard matrix's transpose) for "convrot"
    layers: comfy-kitchen's arithmetic (`dequantize_int8_convrot_weight`)."""
    q, scale = _int8_parts(packed, in_features, scales)
    w, group = q.float() * scale, COMFY_INT8[fmt]
    if not group:
        return w
    w = torch.matmul(w.reshape(packed.shape[0], -1, group), hadamard(group, packed.device, torch.float32).T)
    return w.reshape(-1, in_features)


@functools.cache
def hadamard(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The regular Hadamard matrix of order `size` (a power of 4: Kronecker powers of the order-4 one with equal
    row sums), scaled to be orthogonal: exact in any dtype (the scale is a power of two). Symmetric."""
    h = base = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])
    while h.shape[0] < size:
        h = torch.kron(h, base)
    return (h / size**0.5).to(device=device, dtype=dtype)


def rotated(x: Tensor, group: int) -> Tensor:
    """x (..., in) with each group of `group` inputs times the Hadamard matrix, in x's dtype (the input of a
    layer whose weights were rotated the same way: products unchanged)."""
    return torch.matmul(x.reshape(-1, x.shape[-1] // group, group), hadamard(group, x.device, x.dtype)).reshape(x.shape)


SCALED_UNPACKERS = {**dict.fromkeys(BNB_FORMATS, _unpack_bnb), "nvfp4": _unpack_nvfp4, "mxfp8": _unpack_mxfp8}
SCALED_UNPACKERS |= dict.fromkeys(COMFY_INT8, _unpack_comfy_int8)


def dequantize_bnb_flat(packed: Tensor, absmax: Tensor, fmt: str, n: int) -> Tensor:
    """A bitsandbytes weight's first `n` values in flat order (its blocks of 64 run across rows), in its dtype."""
    code, dtype = BNB_FORMATS[fmt]
    weights = F.embedding(packed.reshape(-1).long(), _byte_pairs(BNB_CODES[code], packed.device)).reshape(-1)[:n]
    return (weights * absmax.float().repeat_interleave(BNB_BLOCK)[:n]).to(dtype)


UNPACK_ELEMENTS = 2**20  # weights unpacked per piece (4 MB of fp32 temporaries)


def _unpack_int8(packed: Tensor, in_features: int) -> Tensor:
    q, scale = _int8_parts(packed, in_features)
    return q.float() * scale


def _unpack_q8_0(packed: Tensor, in_features: int) -> Tensor:
    blocks = packed.reshape(packed.shape[0], -1, 34)
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    return (blocks[..., 2:].contiguous().view(torch.int8).float() * d).reshape(-1, in_features)


def _unpack_q4_0(packed: Tensor, in_features: int) -> Tensor:
    blocks = packed.reshape(packed.shape[0], -1, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).float()
    qs = blocks[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int8) - 8
    return (q.float() * d).reshape(-1, in_features)


def _unpack_fp8(packed: Tensor, in_features: int) -> Tensor:
    q, scale = _fp8_parts(packed, in_features)
    return q.float() * scale


def _fp16(b: Tensor) -> Tensor:
    """(..., 2) bytes -> (..., 1) fp32: a little-endian fp16 in each pair."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, groups: int) -> Tensor:
    """(blocks, groups * n) bytes -> (blocks, 2 * groups, n): each group's low nibbles, then its high ones."""
    qs = qs.reshape(qs.shape[0], groups, 1, -1)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(qs.shape[0], 2 * groups, -1)


def _bits(b: Tensor) -> Tensor:
    """(blocks, k) bytes -> (blocks, 8k) 0/1 bytes: bit i of the little-endian integer they make."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


def _unpack_q4_1(packed: Tensor, in_features: int) -> Tensor:
    b = packed.reshape(-1, 20)  # d, m (fp16), 16 bytes of nibbles: w = d * q + m
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], 32).float()
    return (_fp16(b[:, 0:2]) * q + _fp16(b[:, 2:4])).reshape(-1, in_features)


def _unpack_q5_0(packed: Tensor, in_features: int) -> Tensor:
    b = packed.reshape(-1, 22)  # d (fp16), 32 high bits, 16 bytes of nibbles: w = d * (q - 16)
    q = (_nibbles(b[:, 6:], 1).reshape(b.shape[0], 32) | (_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return (_fp16(b[:, 0:2]) * q.float()).reshape(-1, in_features)


def _unpack_q5_1(packed: Tensor, in_features: int) -> Tensor:
    b = packed.reshape(-1, 24)  # d, m (fp16), 32 high bits, 16 bytes of nibbles: w = d * q + m
    q = (_nibbles(b[:, 8:], 1).reshape(b.shape[0], 32) | (_bits(b[:, 4:8]) << 4)).float()
    return (_fp16(b[:, 0:2]) * q + _fp16(b[:, 2:4])).reshape(-1, in_features)


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes of a Q4_K / Q5_K block, as fp32 (blocks, 8, 1) each."""
    d, m, md = b.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


def _unpack_q4_k(packed: Tensor, in_features: int) -> Tensor:
    b = packed.reshape(-1, 144)  # d, dmin (fp16), 12 bytes of scales, 128 of nibbles: 8 groups of 32
    sc, mn = _k_scales(b[:, 4:16])
    d, dm = _fp16(b[:, 0:2]).unsqueeze(-1) * sc, _fp16(b[:, 2:4]).unsqueeze(-1) * mn
    return (d * _nibbles(b[:, 16:], 4).float() - dm).reshape(-1, in_features)


def _unpack_q5_k(packed: Tensor, in_features: int) -> Tensor:
    b = packed.reshape(-1, 176)  # as Q4_K, with 32 bytes of fifth bits (bit j of byte l: group j, weight l)
    sc, mn = _k_scales(b[:, 4:16])
    d, dm = _fp16(b[:, 0:2]).unsqueeze(-1) * sc, _fp16(b[:, 2:4]).unsqueeze(-1) * mn
    high = (b[:, 16:48].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1
    q = (_nibbles(b[:, 48:], 4) | (high << 4)).float()
    return (d * q - dm).reshape(-1, in_features)


def _unpack_q6_k(packed: Tensor, in_features: int) -> Tensor:
    b = packed.reshape(-1, 210)  # 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d (fp16)
    n = b.shape[0]
    d = (_fp16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _nibbles(b[:, :128], 2)  # (n, 4, 64) -> groups of 32 below
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = (low.reshape(n, 8, 32) | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(-1, in_features)


ROW_UNPACKERS = {"int8": _unpack_int8, "fp8": _unpack_fp8, "Q8_0": _unpack_q8_0, "Q4_0": _unpack_q4_0,
                 "Q4_1": _unpack_q4_1, "Q5_0": _unpack_q5_0, "Q5_1": _unpack_q5_1, "Q4_K": _unpack_q4_k,
                 "Q5_K": _unpack_q5_k, "Q6_K": _unpack_q6_k}  # fmt: skip


def _int8_parts(packed: Tensor, in_features: int, scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """An int8 row block (or int8 weights and their `scales` apart: ComfyUI's) -> (q (out, in) int8, a view of the
    rows: no copy; scale (out, 1) fp32)."""
    q = packed.view(torch.int8)[:, :in_features]
    scale = (packed[:, in_features:] if scales is None else scales).contiguous().view(torch.float32)
    return q, scale


def _fp8_parts(packed: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
    """An fp8 row block -> (q (out, in) float8_e4m3fn, scale (out, 1) fp32)."""
    q, scale = _int8_parts(packed, in_features)
    return q.view(torch.float8_e4m3fn), scale


def _fp8_rows(q: Tensor, scale: Tensor | None) -> Tensor:
    """An e4m3 weight with one scale for the tensor (fp8 files) as fp8 rows: its bytes, that scale on every row."""
    rows = torch.full((q.shape[0], 1), 1.0 if scale is None else float(scale), device=q.device)
    return torch.cat([q.view(torch.uint8), rows.view(torch.uint8)], dim=1)


# ----------------------------------------------------------------------------- fp8 matmul


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 in hardware: CUDA GPUs of compute capability 8.9 and up (Ada, Hopper,
    Blackwell). Elsewhere an fp8 layer is widened to the compute dtype as it runs (CPUs have no fp8 units)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: Tensor, packed: Tensor, in_features: int, bias: Tensor | None) -> Tensor:
    """x (..., in) @ fp8 weight in one fp8 product (`torch._scaled_mm`): activations scaled per token to e4m3,
    weights per output channel, both scales applied to the fp32 sums (torchao's float8 rowwise recipe);
    returns x's dtype. Not the reference's arithmetic: `--quantize fp8` asks for it."""
    q, scale = _fp8_parts(packed, in_features)
    q = q.contiguous()  # `_scaled_mm` takes the weight's transpose of a dense (out, in) matrix
    rows = x.reshape(-1, in_features).float()
    s = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    xq = (rows / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, q.t(), scale_a=s, scale_b=scale.t().contiguous(), out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# ----------------------------------------------------------------------------- int8 matmul


def _marked_constant(fn: Callable) -> Callable:
    """What `torch.compiler.assume_constant_result` does to `fn` (in PyTorch 2.13: this attribute), done without
    importing the compiler (~1.2 s on a 2-core AVX2 CPU, which every `flux2` command paid), so that a model its
    user compiles takes this CPU's int8 answers as constants; `constant_when_compiled` applies the API itself."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_marked_constant
def int8_weight_limit() -> int:
    """The largest weight magnitude oneDNN's int8 product is exact for on this CPU (`_int8_weight_limit`);
    compiled code takes the answer as it is (`constant_when_compiled`): the probe is not traced."""
    return _int8_weight_limit()


@functools.cache
def constant_when_compiled() -> None:
    """Marks this CPU's int8 answers (`int8_weight_limit`, `int8_kernel`) as constants for torch.compile through
    its API, so that their probes are not traced; called before compiling (`pipeline.compile_blocks`). (They carry
    the mark from import too: `_marked_constant`.)"""
    torch.compiler.assume_constant_result(int8_weight_limit)
    torch.compiler.assume_constant_result(int8_kernel)


@functools.cache
def _int8_weight_limit() -> int:
    """The largest weight magnitude oneDNN's int8 product is exact for on this CPU. Without VNNI (AVX2, plain
    AVX-512) it multiplies unsigned activations by signed weights and adds pairs into int16, which saturates
    unless |w| <= 64 (measured: ±127 weights gave 11% error with PyTorch capped at AVX2, ±64 exact)."""
    f = cpu_features()
    if not (f["avx512_vnni"] or f["amx"]) or cpu_capped() is not None:
        return 64
    # and as the kernel behaves in this process: oneDNN fixes its instruction set at its first use, so a cap set
    # after start-up (or lifted) is not what runs; one small product settles it
    return 127 if _adds_exactly(lambda a, b: torch._int_mm(a, b.t()), 127) else 64


def _adds_exactly(product: Callable[[Tensor, Tensor], Tensor], limit: int) -> bool:
    """Whether `product(a, b)` of int8 matrices a (32, 256) and b (16, 256), |b| <= `limit`, gives a @ b.T's exact
    integer sums here (one small product: how this CPU's kernel behaves in this process)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-limit, limit + 1, (16, 256), dtype=torch.int8, generator=g)
    return torch.equal(product(a, b).long(), a.long() @ b.long().t())


def _int8_weight(packed: Tensor, in_features: int, scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(q, scale) as this CPU's int8 kernels take them exactly: halved (rounded) with a doubled scale where
    `int8_weight_limit()` is 64."""
    q, scale = _int8_parts(packed, in_features, scales)  # `_int_mm` reads q in place from the rows
    if int8_weight_limit() < 127:  # q / 2 rounded half away from zero, in int8 (4.6x faster than via int16)
        q = (q >> 1) + ((q & 1) & (q > 0).view(torch.int8))
        scale = scale * 2
    return q, scale


@_marked_constant
def int8_kernel() -> str:
    """`_int8_kernel`, a plain function so that torch.compile takes it as a constant (`constant_when_compiled`; a
    cached function's mark is not seen)."""
    return _int8_kernel()


@functools.cache
def _int8_kernel() -> str:
    """Which product a CPU int8 layer that holds no prepacked weight calls here: "int_mm" (`torch._int_mm`) where
    the CPU has AVX512-VNNI or AMX, else "onednn" (oneDNN's u8 x s8 kernel, the weight put in its blocked layout
    for the call: `onednn_int8_mm`). Measured on a 2-core AVX2-only Zen 3 (one 768 x 3072 -> 9216 product):
    `torch._int_mm` ~7.7 s (a plain loop), oneDNN's 0.133 s + 0.008 s to lay the weight out, fp32 `F.linear`
    0.28 s; where the CPU has VNNI, `torch._int_mm` itself runs on oneDNN (0.018-0.054 s) and laying the weight
    out costs more than the product (0.05 s). "int_mm" also where this PyTorch has no oneDNN int8 op or it does
    not add exactly (one small product settles it)."""
    f = cpu_features()
    onednn = getattr(torch.ops, "onednn", None)
    if f["avx512_vnni"] or f["amx"] or onednn is None or not hasattr(onednn, "qlinear_prepack"):
        return "int_mm"

    def product(a: Tensor, b: Tensor) -> Tensor:  # u8 = int8 + 128, zero point 128: the same sums
        return onednn_int8_mm(a.to(torch.int16).add_(128).to(torch.uint8), b, torch.ones(b.shape[0]), torch.float32)

    try:
        return "onednn" if _adds_exactly(product, int8_weight_limit()) else "int_mm"
    except RuntimeError:  # registered but not supported by this build or CPU
        return "int_mm"


def _per_token(x: Tensor, in_features: int, unsigned: bool = False) -> tuple[Tensor, Tensor]:
    """x (..., in) -> (int8 rows (tokens, in), their scales (tokens, 1)): each token scaled to ±127; `unsigned`:
    the same values + 128 as uint8 (oneDNN's activations). Three passes over x (max, scale, convert)."""
    rows = x.reshape(-1, in_features)
    s = rows.abs().amax(dim=1, keepdim=True).float().clamp_min_(1e-12) / 127
    q = torch.div(rows, s).round_().clamp_(-127, 127)  # in float32 whatever x's dtype (bf16 promotes)
    return (q.add_(128).to(torch.uint8) if unsigned else q.to(torch.int8)), s


def int8_linear(
    x: Tensor,
    packed: Tensor,
    in_features: int,
    bias: Tensor | None,
    onednn: tuple[Tensor, Tensor] | None = None,
    scales: Tensor | None = None,
) -> Tensor:
    """x (..., in) @ int8 weight: activations quantized per token to int8, one integer product (`torch._int_mm`,
    or oneDNN's u8 x s8 kernel: prepacked when the layer holds one (`prepack_int8`), else laid out for the call
    where `int8_kernel()` says so), both scales applied to the exact int32 sums; returns x's dtype. The scaling
    runs in place (each pass over the (tokens, out) result costs about a tenth of the product at 256x256)."""
    if onednn is not None or int8_kernel() == "onednn":  # u8 = int8 + 128, zero point 128: the same integer sums
        xu, s = _per_token(x, in_features, unsigned=True)
        # bf16 written by oneDNN only where the CPU has it (capped at AVX2 one layer did not finish in a minute)
        out = torch.bfloat16 if x.dtype == torch.bfloat16 and cpu_bf16_native() else torch.float32
        if onednn is not None:
            y = prepacked_int8_mm(xu, *onednn, out)
        else:
            q, scale = _int8_weight(packed, in_features, scales)
            y = onednn_int8_mm(xu, q.contiguous(), scale.reshape(-1).contiguous(), out)
        s = s.to(out)
        y = y.mul_(s) if bias is None else torch.addcmul(bias.to(out), y, s)
    else:
        xq, s = _per_token(x, in_features)
        q, scale = _int8_weight(packed, in_features, scales)
        # the int32 sums, and their scaled copy unless that is the output (fp32), in scratch memory
        shape = (xq.shape[0], q.shape[0])
        parts = [(shape, torch.int32)] + ([(shape, torch.float32)] if x.dtype != torch.float32 else [])
        bufs = scratch(parts, x.device) or [None] * len(parts)
        acc = torch._int_mm(xq, q.t(), out=bufs[0])
        y = torch.mul(acc, s, out=bufs[1] if len(bufs) > 1 else None).mul_(scale.t())  # one float32 result
        if bias is not None:
            y = y.add_(bias)
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def multiplies_int8(model: nn.Module) -> bool:
    """Whether `model` has int8 layers that multiply in int8 here (packed int8 weights on a CPU)."""
    return any(
        isinstance(m, QuantLinear)
        and int8_weights(m.fmt)
        and m.weight.device.type == "cpu"
        and not m.weight.is_floating_point()
        for m in model.modules()
    )


@torch.library.custom_op("flux2studio::prepacked_int8_mm", mutates_args=())
def prepacked_int8_mm(xu: Tensor, packed: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """uint8 activations (zero point 128, scale 1) x oneDNN's prepacked int8 weight, the weight's per-channel
    `scale` applied: (tokens, out) in `out_dtype`. An opaque op to the compiler, so that compiled blocks call the
    prepacked kernel with the blocked weight as an input (traced as the plain op, Inductor stopped with an error:
    it lowers that op only for weights it froze itself) and share one compiled graph across blocks."""
    return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, packed, scale, _zeros(scale.shape[0]), None, 1.0, 0,
                                              out_dtype, "none", [], "")  # fmt: skip


@prepacked_int8_mm.register_fake
def _(xu: Tensor, packed: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    return xu.new_empty((xu.shape[0], scale.shape[0]), dtype=out_dtype)


@torch.library.custom_op("flux2studio::onednn_int8_mm", mutates_args=())
def onednn_int8_mm(xu: Tensor, q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """`prepacked_int8_mm` for an int8 weight `q` (out, in) not prepacked: oneDNN's blocked copy of it is made for
    this product and dropped after (streamed layers; on AVX2 that costs ~6% of the product)."""
    return prepacked_int8_mm(xu, torch.ops.onednn.qlinear_prepack(q, None), scale, out_dtype)


@onednn_int8_mm.register_fake
def _(xu: Tensor, q: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    return xu.new_empty((xu.shape[0], q.shape[0]), dtype=out_dtype)


@functools.cache
def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.long)


def prepack_int8(model: nn.Module) -> int:
    """For models kept resident on a CPU: give every int8 layer a copy of its weight in oneDNN's blocked layout
    (`torch.ops.onednn.qlinear_prepack`, PyTorch's x86 int8 path), which multiplies ~1.5x faster than
    `torch._int_mm` with AMX (0.012 vs 0.018 s for 768 tokens x 3072 -> 9216, 2 cores) but costs 0.05 s a layer
    that size to make (more than the product): worth it only for weights that stay in memory. The int8 rows
    themselves are then read only to rebuild a dense weight (a LoRA fused in, another device): where they are
    pages of a mapped file (a saved int8 file) those pages are handed back, so the layer is held once, not
    twice. Returns how many layers got one (0 where this PyTorch lacks the op)."""
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is None or not hasattr(onednn, "qlinear_prepack"):
        return 0
    packed: list[Tensor] = []
    for m in model.modules():
        if isinstance(m, QuantLinear) and int8_weights(m.fmt) and m.weight.device.type == "cpu":
            q, scale = _int8_weight(m.weight.data, m.in_features, m.stored_scales())
            try:
                m.onednn = (onednn.qlinear_prepack(q.contiguous(), None), scale.reshape(-1).contiguous())
            except RuntimeError:  # registered but not supported by this build or CPU: `torch._int_mm` then
                break
            packed.append(m.weight.data)
    drop_file_pages(packed)  # clean file pages: read again from the file if ever needed
    return len(packed)


# ----------------------------------------------------------------------------- the module


class QuantLinear(nn.Linear):
    """An `nn.Linear` whose weight is stored packed (`fmt`): int8 computes in int8 on a CPU, fp8 in fp8 on GPUs
    that have it, every format is otherwise dequantized to the input's dtype for the call. A float weight (a
    LoRA fused in) runs plainly."""

    # where fp8 layers multiply in fp8 (a class attribute: tests run `_scaled_mm` on the CPU, which has no fp8 units)
    fp8_matmul = staticmethod(fp8_matmul_supported)

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, device=None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        shape = (out_features, row_bytes(fmt, in_features))
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=device), requires_grad=False)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, device=device)) if bias else None)
        if (apart := scale_bytes(fmt, in_features)) is not None:  # bitsandbytes' and ComfyUI's block scales
            scales = torch.empty(out_features, apart, dtype=torch.uint8, device=device)
            self.scales = nn.Parameter(scales, requires_grad=False)
        self.onednn: tuple[Tensor, Tensor] | None = None  # a resident prepacked copy (`prepack_int8`)

    def dense(self, dtype: torch.dtype, reuse: bool = False) -> Tensor:
        """The weight as a float (out, in) tensor in `dtype`; `reuse`: for this call only, written into the thread's
        scratch buffer where it has one (`residency.scratch`: the same memory layer after layer instead of a fresh
        mapping faulted in each call: a klein-4b step from a GGUF Q8_0 file 39.8 -> 31.8 s, AVX2)."""
        w = self.weight
        if w.is_floating_point():
            return w.data.to(dtype)
        reuse = reuse and PLAIN_DTYPES.get(self.fmt) != dtype  # (a GGUF F16 weight at fp16 is a view as it is)
        bufs = scratch([((self.out_features, self.in_features), dtype)], w.device) if reuse else None
        out = bufs[0] if bufs else None
        return dequantize_weight(w.data, self.fmt, self.in_features, dtype, self.stored_scales(), out)

    def stored_scales(self) -> Tensor | None:
        """The scales kept apart from the rows (`scale_bytes`), or None."""
        return self.scales.data if self.fmt in SCALED_UNPACKERS else None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        grad = torch.is_grad_enabled() and x.requires_grad  # _int_mm has no gradient: dequantize then
        if not w.is_floating_point() and COMFY_INT8.get(self.fmt):  # rotated weights: rotate the input alike
            x = rotated(x, COMFY_INT8[self.fmt])
            if x.device.type != "cpu" or grad:  # the weight as stored (rotated) then
                bias = self.bias.to(x.dtype) if self.bias is not None else None
                stored = dequantize_weight(w.data, "comfy-int8", self.in_features, x.dtype, self.stored_scales())
                return F.linear(x, stored, bias)
        if not w.is_floating_point() and int8_weights(self.fmt) and x.device.type == "cpu" and not grad:
            return int8_linear(x, w.data, self.in_features, self.bias, self.onednn, self.stored_scales())
        fp8 = self.fmt == "fp8" and self.in_features % 16 == 0 and self.out_features % 16 == 0  # its shapes
        if not w.is_floating_point() and fp8 and not grad and self.fp8_matmul(x.device):
            return fp8_linear(x, w.data, self.in_features, self.bias)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dense(x.dtype, reuse=not grad), bias)  # (autograd keeps a weight it multiplied)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


class QuantEmbedding(nn.Module):
    """An `nn.Embedding` whose table stays packed (a GGUF text encoder's `token_embd`, often Q4_K or Q6_K; a
    ComfyUI one's int8): only the rows of the tokens looked up are dequantized, in `dtype` (each row is whole
    blocks, with its scales)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.fmt, self.dtype = num_embeddings, embedding_dim, fmt, dtype
        shape = (num_embeddings, row_bytes(fmt, embedding_dim))
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device=device), requires_grad=False)
        if (apart := scale_bytes(fmt, embedding_dim)) is not None:
            scales = torch.empty(num_embeddings, apart, dtype=torch.uint8, device=device)
            self.scales = nn.Parameter(scales, requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).to(self.weight.device)
        scales = self.scales.data[flat] if self.fmt in SCALED_UNPACKERS else None
        rows = dequantize_weight(self.weight.data[flat], self.fmt, self.embedding_dim, self.dtype, scales)
        return rows.reshape(*ids.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


def dense_weight(linear: nn.Linear, dtype: torch.dtype) -> Tensor:
    """Any linear layer's weight as a float tensor in `dtype` (packed, fp8 with its scale, or plain)."""
    return linear.dense(dtype) if isinstance(linear, QuantLinear) else dequantized(linear.weight, dtype)


def swap_in(model: nn.Module, formats: dict[str, str]) -> nn.Module:
    """Replace each linear layer named in `formats` ({module name: format}) by an empty `QuantLinear` of that
    format, and each embedding by a `QuantEmbedding`, on the layer's device (meta while a model is being
    built), so packed tensors load into it."""
    for name, fmt in formats.items():
        parent, _, child = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            old = owner.get_submodule(child)
        except AttributeError:
            raise ValueError(f"{name} is quantized ({fmt}) in the file but the model has no such layer") from None
        if isinstance(old, nn.Linear):
            new = QuantLinear(old.in_features, old.out_features, old.bias is not None, fmt, device=old.weight.device)
        elif isinstance(old, nn.Embedding):
            dtype = old.weight.dtype
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, dtype, device=old.weight.device)
        else:
            raise ValueError(f"{name} is quantized ({fmt}) in the file but is not a linear or embedding layer")
        owner.register_module(child, new)
    return model


def quantize_modules(
    model: nn.Module,
    mode: str,
    eligible: Callable[[str], bool],
    release: Callable[[list[Tensor]], object] | None = None,
) -> dict[str, str]:
    """Quantize, in place, every eligible linear layer of a loaded model to `mode` (int8 / int4), one layer at
    a time; each float weight is handed to `release` as soon as it is packed (the loader drops its memory-mapped
    pages, which would otherwise stay resident: 8 GB for Qwen3-4B). Returns {module name: format}."""
    fmt = MODE_FORMAT[check_mode(mode)]
    formats = {}
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and eligible(name)]
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, QuantLinear) or old.in_features % 32:
            continue
        formats[name] = fmt
        swap_in(model, {name: fmt})
        new = model.get_submodule(name)
        if fmt == "fp8" and old.weight.dtype == torch.float8_e4m3fn:  # an fp8 file's bytes as they are, exactly
            new.weight.data = _fp8_rows(old.weight.data, getattr(old.weight, "fp8_scale", None))
        else:
            new.weight.data = quantize_weight(dense_weight(old, torch.float32), fmt).to(old.weight.device)
        if old.bias is not None:
            new.bias = old.bias
        if release is not None:
            release([old.weight.data])
    return formats
