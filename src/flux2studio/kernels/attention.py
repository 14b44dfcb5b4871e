"""bf16 softmax attention on CPUs with AVX512-BF16, twice as fast as PyTorch's for FLUX.2's shapes.

PyTorch's CPU flash attention runs q k^T for bf16 inputs at about 0.18 TFLOPS on 2 cores, where its bf16 GEMMs
reach 0.43; at klein-4b's 1,536 tokens that is 15% of a denoising step. `attention.c` computes the same
arithmetic (fp32 scores and softmax, bf16 probabilities times v accumulated in fp32) with vdpbf16ps in both
products, ~0.37 TFLOPS; results differ from SDPA's only in rounding order (tests/test_kernels.py). It is
compiled on first use with the system C compiler into the cache folder (a second or so, once per source
version) and called through ctypes; anything it does not take (other dtypes, devices, gradients, odd
strides, no compiler, a CPU without AVX512-BF16) runs PyTorch's SDPA.

This module does not know about models or pipelines: it maps q, k, v (B, H, L, Dh) -> (B, H, Lq, Dh),
exactly the signature of `torch.nn.functional.scaled_dot_product_attention` without mask or dropout.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import cpu_features
from . import ATTENTION_MODES

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.c")
# Each instruction set the kernel uses is named (not -march=native): the built file is correct on any CPU that
# has these, and its name changes with the source, the compiler and these flags.
# -fopenmp: the kernel runs on PyTorch's OpenMP thread pool (attention.c, run_parallel).
FLAGS = [
    *("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"),
    *("-fopenmp", "-fPIC", "-shared"),
]

BUILD_TIMEOUT_S = 120  # ~1 s normally; a stuck compiler must not stop generation

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has the instructions the kernel is built with (torch's capability query)."""
    return platform.machine() in ("x86_64", "AMD64") and cpu_features()["avx512_bf16"]


def _build(cache: Path) -> Path:
    """Compile attention.c into cache/kernels (once per source, compiler and flags) and return the library."""
    cc = shlex.split(os.environ.get("CC") or "cc")  # may carry a wrapper: CC="ccache gcc"
    if not cc or shutil.which(cc[0]) is None:
        raise RuntimeError(f"no C compiler ({' '.join(cc)!r} not found; install gcc or set CC)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache / "kernels" / f"attention-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: no half files
        out = Path(tmp) / target.name
        cmd = [*cc, *FLAGS, "-o", str(out), str(SOURCE), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if res.returncode:
            raise RuntimeError(f"{' '.join(cc)} failed to build {SOURCE.name}:\n{res.stderr[-2000:]}")
        os.replace(out, target)
    return target


@functools.cache
def _library(cache: Path) -> ctypes.CDLL | str:
    """The loaded kernel, or why it is not available (a sentence)."""
    if not cpu_has_avx512_bf16():
        return "this CPU has no AVX512-BF16"
    try:
        lib = ctypes.CDLL(str(_build(cache)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:  # no compiler, read-only cache, a hang
        return str(e)
    fn = lib.flux2_attention_bf16
    i64, ptr, strides = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64 * 3
    fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, strides, strides, strides, strides, ctypes.c_float]
    fn.argtypes += [ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def unavailable_reason(cache: Path) -> str | None:
    """None when the kernel is built and loaded (building it if needed), else why not."""
    lib = _library(cache)
    return lib if isinstance(lib, str) else None


def _takes(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Inputs the kernel computes; everything else goes to SDPA."""
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False  # inference only: no backward
    (b, h, lq, d), (lk, dk) = q.shape, k.shape[2:]
    if k.shape != v.shape or k.shape[:2] != (b, h) or dk != d or d % 16 or 0 in (b, h, lq, lk):
        return False
    # q and k rows are read as 32-bit channel pairs
    return all(s % 2 == 0 for t in (q, k) for s in t.stride()[:3]) and q.data_ptr() % 4 == 0 == k.data_ptr() % 4


def cpu_bf16_attention(cache: Path) -> Attention:
    """The kernel as an SDPA replacement (building it if needed); raises if it cannot be built or run here."""
    lib = _library(cache)
    if isinstance(lib, str):
        raise RuntimeError(f"the CPU attention kernel is not available: {lib}")
    fn = lib.flux2_attention_bf16

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, Lq, Dh), k and v (B, H, Lk, Dh) -> (B, H, Lq, Dh), a view of a (B, Lq, H, Dh) tensor."""
        if not _takes(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)
        b, h, lq, d = q.shape
        # heads-last memory (B, Lq, H, Dh): the caller's transpose(1, 2).flatten(2) copies nothing
        out = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)

        def strides(t: Tensor) -> ctypes.Array:
            return (ctypes.c_int64 * 3)(*t.stride()[:3])

        status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), b, h, lq, k.shape[2], d,
                    strides(q), strides(k), strides(v), strides(out), d**-0.5, torch.get_num_threads())  # fmt: skip
        if status == 1:  # its work buffers (about twice k and v) could not be allocated: PyTorch's may fit
            log.warning("CPU attention: no memory for the buffers of %d keys, using PyTorch's SDPA", k.shape[2])
            return F.scaled_dot_product_attention(q, k, v)
        if status:
            raise ValueError(f"CPU attention refused q {tuple(q.shape)} strides {q.stride()}")
        return out

    return attention


def attention_for(mode: str, device: torch.device, dtype: torch.dtype, cache: Path) -> Attention:
    """The attention a pipeline uses: "sdpa" (PyTorch's), "kernel" (ours, or an error saying why not), or
    "auto": ours for bf16 on a CPU that has AVX512-BF16 and a C compiler, else SDPA (the reason logged once)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention {mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
    if mode == "sdpa":
        return F.scaled_dot_product_attention
    if device.type != "cpu" or dtype != torch.bfloat16:
        if mode == "kernel":
            raise ValueError(f"attention 'kernel' runs bf16 on the CPU, not {str(dtype).removeprefix('torch.')} on "
                             f"{device.type}: use auto or sdpa")  # fmt: skip
        return F.scaled_dot_product_attention
    if mode == "auto" and (reason := unavailable_reason(cache)):
        _log_once(reason)
        return F.scaled_dot_product_attention
    return cpu_bf16_attention(cache)


@functools.cache
def _log_once(reason: str) -> None:
    log.info("bf16 CPU attention uses PyTorch's SDPA: %s", reason)
