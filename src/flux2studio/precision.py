"""Which dtype computes on this machine, and weights stored narrower than they compute.

`--dtype auto` (the default) computes in bf16 where the hardware multiplies bf16 natively (CUDA; CPUs with
AVX512-BF16 or AMX) and in fp32 elsewhere: on an AVX2-only CPU PyTorch's bf16 `nn.Linear` runs ~5x slower
than fp32 and a bf16 `bmm` outside it falls to a reference loop (~250x). Weights then stay in the narrow
dtype of their files (bf16 or fp8, memory-mapped and streamed as before) and each linear layer's weight is
widened when the layer runs and freed after (`widen_on_use`): peak memory grows by one layer's fp32 copy, not
by the model's. Widening bf16 to fp32 is exact (and fp8 is widened with the reference's `w.float() * scale`),
so this computes bit for bit what converting the whole model at load would. fp16 files computing in bf16
(and bf16 in fp16) are converted per layer the same way, which rounds as a cast at load would.

The CPU's features come from torch's own capability queries (`torch.cpu._is_*_supported`, the ones its
compiler uses), limited by `ONEDNN_MAX_CPU_ISA` / `ATEN_CPU_CAPABILITY` when a user caps them. This module
knows nothing about models, files or pipelines; it imports torch only when called (the CLI's --help stays fast).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    # where a tensor that lives for one layer's call may be written (`residency.scratch`)
    Scratch = Callable[[Sequence[tuple[tuple[int, ...], torch.dtype]], torch.device], list[torch.Tensor] | None]

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype name -> torch's (in metadata)
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
QUANTIZE_CHOICES = ("int8", "int4", "fp8")  # --quantize: packed weights (quantize.py)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def fp8_dtypes() -> tuple[torch.dtype, ...]:
    """The float8 formats FLUX.2 files ship (e4m3 from BFL and ComfyUI; e5m2 seen in community files)."""
    import torch

    return (torch.float8_e4m3fn, torch.float8_e5m2)


# oneDNN's ISA names from the first one with bf16 dot products on (its `dnnl_cpu_isa_t` order)
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10")


@functools.cache
def cpu_features() -> dict[str, bool]:
    """The CPU features that decide speed here, as torch sees them (False where this torch cannot tell)."""
    import torch

    def has(name: str) -> bool:
        fn = getattr(torch.cpu, f"_is_{name}_supported", None)
        return bool(fn()) if fn is not None else False

    return {
        "avx2": has("avx2"),
        "avx512": has("avx512"),
        "avx512_vnni": has("vnni"),
        "avx512_bf16": has("avx512_bf16"),
        "amx": has("amx_tile"),
    }


def cpu_capped() -> str | None:
    """The environment variable that keeps PyTorch from the CPU's bf16 instructions, if one does."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # oneDNN reads either spelling
        isa = os.environ.get(name, "").strip().upper()
        if isa and isa not in ("ALL", "DEFAULT") and not isa.startswith(_ONEDNN_BF16_ISAS):
            return f"{name}={isa}"
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("default", "avx2"):
        return f"ATEN_CPU_CAPABILITY={aten}"
    return None


def cpu_bf16_native() -> bool:
    f = cpu_features()
    return (f["avx512_bf16"] or f["amx"]) and cpu_capped() is None


def describe_cpu() -> str:
    """One line for benchmarks and `flux2 models`: the features present, e.g. 'avx2 avx512 avx512_bf16 amx'."""
    present = [name for name, on in cpu_features().items() if on]
    capped = cpu_capped()
    return " ".join(present or ["no avx2"]) + (f" (capped by {capped})" if capped else "")


@dataclass(frozen=True)
class ComputeDtype:
    """The dtype a pipeline computes in, and why (recorded in every image's metadata)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return next(k for k, v in DTYPE_NAMES.items() if f"torch.{v}" == str(self.dtype))


def compute_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> ComputeDtype:
    """`dtype` resolved for `device`: an explicit one wins; None and "auto" pick per machine (module doc)."""
    import torch

    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") not in DTYPE_NAMES.values():
            raise ValueError(f"dtype {dtype} is not one of {', '.join(DTYPE_NAMES.values())}")
        return ComputeDtype(dtype, "given")
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES.values():  # torch's names, as images
        dtype = next(k for k, v in DTYPE_NAMES.items() if v == dtype.removeprefix("torch."))  # record them
    if dtype not in (None, *DTYPE_CHOICES):
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)} (or torch's names: "
                         f"{', '.join(DTYPE_NAMES.values())})")  # fmt: skip
    if dtype not in (None, "auto"):
        return ComputeDtype(torch_dtype(dtype), "given")
    kind = torch.device(device).type
    if kind == "cuda":
        return ComputeDtype(torch.bfloat16, "auto: CUDA computes bf16 natively")
    if kind == "mps":
        return ComputeDtype(torch.float16, "auto: Apple GPUs compute fp16 natively")
    if kind != "cpu":
        return ComputeDtype(torch.float32, f"auto: fp32 on {kind}")
    if cpu_bf16_native():
        which = " and ".join(n for n, k in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")) if cpu_features()[k])
        return ComputeDtype(torch.bfloat16, f"auto: this CPU has {which} (native bf16 matmul)")
    capped = cpu_capped()
    why = f"{capped} keeps PyTorch off the CPU's bf16 instructions" if capped else "this CPU has no AVX512-BF16 or AMX"
    return ComputeDtype(
        torch.float32, f"auto: {why}; bf16 matmul runs ~5x slower there (bf16 weights widened per layer)"
    )


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision for training on `device`: bf16 where it is native, none (fp32) elsewhere."""
    import torch

    return torch.bfloat16 if compute_dtype("auto", device).dtype == torch.bfloat16 else None


def autocast(device: torch.device):
    """Training's mixed precision on `device`: bf16 matmuls where they are native (CUDA, AVX512-BF16/AMX CPUs:
    about 5x faster than fp32 there), plain fp32 elsewhere (`autocast_dtype`)."""
    import torch

    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def storage(sd: dict[str, torch.Tensor], dtype: torch.dtype, streamed: bool = True) -> dict[str, torch.Tensor]:
    """Tensors as a model computing in `dtype` keeps them: fp8 stays fp8 (its scale set on the parameter by the
    loader, `dequantized`), bf16/fp16 stay as they are when `dtype` is fp32, and also in bf16/fp16 when `streamed`
    from their files (an fp16 file computing in bf16 was copied whole at load: klein-4b's 7.4 GiB where streaming
    holds a block), converted per layer at run time (`widen_on_use`); resident or on an accelerator they are cast
    once (the same bytes held, no conversion each step). Every other float tensor is cast."""
    import torch

    keep = (torch.bfloat16, torch.float16) if dtype == torch.float32 or streamed else ()
    return {
        k: v if not v.is_floating_point() or v.dtype in (*keep, *fp8_dtypes()) else v.to(dtype) for k, v in sd.items()
    }


def fp8_to(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An fp8 weight in `dtype`, times its per-tensor scale: `w.float() * scale`, the reference's arithmetic."""
    return (w.float() * (scale.float() if scale is not None else 1.0)).to(dtype)


def dequantized(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored weight in `dtype`: an fp8 one with its scale (`p.fp8_scale`, set by the loader), others cast."""
    if p.dtype not in fp8_dtypes():
        return p.data.to(dtype)
    scale = getattr(p, "fp8_scale", None)
    return fp8_to(p.data, None if scale is None else scale.to(p.device), dtype)  # (a streamed block's is on the host)


def widen_on_use(
    model: nn.Module, blocks: Sequence[nn.Module], dtype: torch.dtype, scratch: Scratch | None = None
) -> list:
    """Compute `model` in `dtype` while it keeps narrower weights: each linear layer's weight is converted just
    before the layer runs and dropped right after, a block's other weights (norms) around the block (forward
    hooks; weights being trained are left alone), so at most one layer's wide copy exists at a time (klein-4b's
    largest: 226 MB in fp32; a whole double block would be 980 MB, its shared modulation layers 566 MB).
    Embedding tables stay narrow and their rows are converted as they are looked up; what is left (small:
    norms outside the blocks) is converted now. `scratch` (`residency.scratch`): where a layer's wide weight may be
    written at inference instead of a new tensor each call (None from it: a new tensor). Returns the hook handles."""
    import torch
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    on_use = {id(p) for m in linears for p in m.parameters(recurse=False)}
    handles = []
    for block in blocks:
        handles += _widen_around(block, [p for p in block.parameters() if id(p) not in on_use], dtype)
        on_use |= {id(p) for p in block.parameters()}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight.dtype != dtype:
            on_use.add(id(m.weight))
            handles.append(m.register_forward_hook(lambda _m, _args, out: out.to(dtype)))
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) not in on_use and t.is_floating_point() and t.dtype != dtype:
                t.data = dequantized(t, dtype)
    for m in linears:
        handles += _widen_around(m, list(m.parameters(recurse=False)), dtype, scratch)
    return handles


def _widen_around(
    module: nn.Module, params: list[nn.Parameter], dtype: torch.dtype, scratch: Scratch | None = None
) -> list:
    """Hooks that give `params` wide data while `module` runs and their stored data back after; with `scratch`, the
    module's weight is written where it says at inference (`widen_on_use`)."""
    import torch

    params = [p for p in params if p.is_floating_point() and p.dtype != dtype]
    if not params:
        return []
    stored: list[tuple[nn.Parameter, torch.Tensor]] = []

    def before(_m: nn.Module, _args) -> None:
        training = torch.is_grad_enabled()
        for p in params:
            if p.dtype != dtype and not (training and p.requires_grad):
                stored.append((p, p.data))
                # a plain cast into the scratch buffer; never while training (autograd keeps the weight for the
                # backward pass)
                plain = scratch and p is getattr(module, "weight", None) and p.dtype not in fp8_dtypes()
                buf = scratch([(p.shape, dtype)], p.device) if plain and not training else None
                p.data = dequantized(p, dtype) if buf is None else buf[0].copy_(p.data)

    def after(_m: nn.Module, _args, _out) -> None:
        for p, data in stored:
            p.data = data
        stored.clear()

    # always_call: a layer that raises (out of memory) still gets its stored weights back
    return [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]
