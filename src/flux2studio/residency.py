"""Memory residency of weights: fault a module's pages in, hand file pages back to the OS, and stream a model's
blocks so that about one block's weights are mapped at a time (FLUX2.md §8); and the C library's heap: freed memory
kept for reuse while a model computes, handed back after.

The tensors come memory-mapped from safetensors files (`checkpoints.read_safetensors`); these functions only
decide which of their pages the process holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


def prefault(module: nn.Module) -> None:
    """Map every page of the module's memory-mapped weights now, with one strided read per tensor.

    Left to the first forward pass, the page faults land inside the matrix multiplications, one small
    range at a time: measured on klein-4b's transformer, the first step took ~3 s longer than the next,
    while this read takes ~0.4 s. Embedding tables are skipped (a prompt reads a few of their rows).
    """
    skip = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu" and t.numel() and t.is_contiguous() and id(t) not in skip:
                t.view(-1).view(torch.uint8)[::4096].sum()  # one byte a page, read as bytes (no float arithmetic)


def drop_file_pages(tensors: list[Tensor]) -> int:
    """Hand back to the OS the memory-mapped file pages of tensors that are no longer needed.

    Converting on load (q, k, v fused into qkv; fp8 dequantised; a dtype cast) reads the original
    tensors from the mapped file once; their pages would otherwise stay in the process's resident set
    for as long as any tensor of that file is alive (the whole model). Only whole pages inside such a
    tensor, inside a `.safetensors` or `.gguf` file mapping, are dropped: they are clean, so a later read would
    simply fault them in again from the file. Linux only; returns the bytes dropped.
    """
    return _dont_need(file_pages(tensors))


def file_pages(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """The whole pages (start, end) inside each CPU tensor that lies in a `.safetensors` or `.gguf` file mapping."""
    import sys

    if not sys.platform.startswith("linux"):
        return []
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().endswith((".safetensors", ".gguf")):
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                maps.append((lo, hi))
    page, ranges = 4096, []
    for t in tensors:
        if t.device.type != "cpu":
            continue
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, end // page * page
        if hi > lo and any(a <= start and end <= b for a, b in maps):
            ranges.append((lo, hi))
    return ranges


def _dont_need(ranges: list[tuple[int, int]]) -> int:
    if not ranges:
        return 0
    libc = _libc()
    dropped = 0
    for lo, hi in ranges:
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0:  # MADV_DONTNEED
            dropped += hi - lo
    return dropped


def stream_weights(blocks: Iterable[nn.Module]) -> None:
    """Keep only the running block's file-backed weights in the process's memory (inference on CPU).

    Before a block runs its pages are mapped in one strided read (`prefault`); after it ran they are
    handed back (MADV_DONTNEED). They stay in the OS page cache, so the next step maps them again
    at memory speed (~0.05 s per GB here); if the machine is short of memory the OS may evict them and
    they are read from disk again instead of the process being killed. Peak memory is then about one
    block's weights, not the model's. Each block's file pages are found once, here: a LoRA fused later
    puts its weights in new tensors, and the file pages it leaves are the clean originals (kept for an
    exact unfuse, re-read from the file if needed). The hooks are kept on each block (`stop_streaming_weights`).
    """

    def before(block: nn.Module, _args) -> None:
        if not torch.is_grad_enabled():
            prefault(block)

    for block in blocks:
        pages = file_pages(list(block.parameters()))

        def after(_block: nn.Module, _args, _out, pages=pages) -> None:
            if not torch.is_grad_enabled():
                _dont_need(pages)

        block.page_hooks = [block.register_forward_pre_hook(before), block.register_forward_hook(after)]


def stop_streaming_weights(blocks: Iterable[nn.Module]) -> None:
    """Remove `stream_weights`' hooks (the weights are moving elsewhere: handing back the pages they left would
    hit whatever the freed address range holds next)."""
    for block in blocks:
        for handle in block.__dict__.pop("page_hooks", []):
            handle.remove()


def drop_unused_pages(source: dict[str, Tensor], module: nn.Module) -> int:
    """`drop_file_pages` for the `source` tensors that `module` does not hold (after building it)."""
    used = {t.data_ptr() for t in module.state_dict(keep_vars=True).values()}
    return drop_file_pages([t for t in source.values() if t.data_ptr() not in used])


# ----------------------------------------------------------------------------- the C library's heap

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters (malloc.h)
# glibc's own settings, restored after a computation: at most 65536 mapped chunks, and the mmap threshold (and the
# trim threshold, twice it) where its dynamic threshold ends up once tensors of a few MB have come and gone
_GLIBC_USUAL = ((_M_MMAP_MAX, 65536), (_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
_held = [0]  # computations running with the heap held (threads of a server may overlap)
_held_lock = threading.Lock()


@functools.cache
def _libc() -> ctypes.CDLL:
    """The process's C library (madvise, and glibc's mallopt / malloc_trim where it is glibc)."""
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc and the user has not tuned its allocator (MALLOC_* variables,
    glibc.malloc tunables, a preloaded allocator): theirs to decide then."""
    if any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        return None
    try:
        libc = _libc()
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> None:
    """Give the heap's free memory back to the OS now (glibc keeps it otherwise), so RSS follows the phases."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


_thread = threading.local()  # .buffers: this thread's scratch buffers while it computes ({device: bytes}), or None


def scratch(parts: Sequence[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> list[Tensor] | None:
    """Tensors of the given (shape, dtype)s in this thread's one scratch buffer for `device`, for what lives only
    while one layer runs (a weight widened for its call, an int8 product's sums): one allocation reused layer after
    layer instead of fresh ones each call (mappings of tens to hundreds of MB on klein-4b, faulted in and zeroed page
    by page), and no larger than the largest layer's needs. Each call hands out the same memory again: what an
    earlier call returned is dead then. None outside `reuse_freed_memory` (whose end frees the buffer) and inside
    compiled code (the compiler plans its own buffers)."""
    buffers = getattr(_thread, "buffers", None)
    if buffers is None or torch.compiler.is_compiling():
        return None
    starts, end = [], 0
    for shape, dtype in parts:
        starts.append(end)
        end += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # each part 64-byte aligned
    buf = buffers.get(device)
    if buf is None or buf.numel() < end:
        buffers.pop(device, None)  # the smaller one freed before the larger is made
        buf = buffers[device] = torch.empty(end, dtype=torch.uint8, device=device)
    return [
        buf[a : a + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for a, (shape, dtype) in zip(starts, parts, strict=True)
    ]


@contextlib.contextmanager
def reuse_freed_memory(hold_heap: bool = True) -> Iterator[None]:
    """While a model computes on the CPU: what lives only while one layer runs goes into one buffer for the thread
    (`scratch`); with `hold_heap`, glibc also serves every allocation from its heap and keeps what is freed for the
    next one; at the end the buffer is freed, the free heap handed back (`trim_heap`) and glibc's usual settings
    return.

    By default glibc maps each allocation over ~32 MB as fresh pages and unmaps it when freed, so each layer's
    large temporaries are faulted in and zeroed page by page, every step. Measured on klein-4b at 256x256, 2 cores
    of an AMD EPYC (AVX-512 VNNI/BF16), a step (docs/performance.md, 2026-12-06): fp32 computed from bf16 weights
    (`auto` on AVX2) 30.1 s -> 25.6 s with the widened weights in scratch; int8 5.6 s -> 4.1 s (AVX2: 18.1 ->
    13.3 s) with the heap held as well, where each product's int32 sums, its quantized activations and oneDNN's
    copy of the weight come and go. Holding the heap costs 0.1-0.2 GB of peak memory (freed memory kept in pieces)
    and gave float layers nothing, so callers ask for it where the model multiplies in int8. The heap is left alone
    where the C library is not glibc or the user tuned its allocator (MALLOC_* variables, glibc.malloc tunables)."""
    with _heap_held() if hold_heap else contextlib.nullcontext():
        outer = getattr(_thread, "buffers", None) is None
        if outer:
            _thread.buffers = {}
        try:
            yield
        finally:
            if outer:
                _thread.buffers = None  # freed before the heap is handed back


@contextlib.contextmanager
def _heap_held() -> Iterator[None]:
    libc = _glibc()
    if libc is None:
        yield
        return
    with _held_lock:
        _held[0] += 1
        if _held[0] == 1:
            libc.mallopt(_M_MMAP_MAX, 0)  # no mapped chunks: large tensors come from the heap too
            libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and what is freed stays there for the next step
    try:
        yield
    finally:
        with _held_lock:
            _held[0] -= 1
            if _held[0] == 0:
                for param, value in _GLIBC_USUAL:
                    libc.mallopt(param, value)
                trim_heap()
