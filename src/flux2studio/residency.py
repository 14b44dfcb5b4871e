"""Memory residency of weights: fault a module's pages in, hand file pages back to the OS, and stream a model's
blocks so that about one block's weights are mapped at a time (FLUX2.md §8).

The tensors come memory-mapped from safetensors files (`checkpoints.read_safetensors`); these functions only
decide which of their pages the process holds.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    import ctypes

    if not ranges:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    dropped = 0
    for lo, hi in ranges:
        if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4) == 0:  # MADV_DONTNEED
            dropped += hi - lo
    return dropped


def stream_weights(blocks: Iterable[nn.Module]) -> list:
    """Keep only the running block's file-backed weights in the process's memory (inference on CPU).

    Before a block runs its pages are mapped in one strided read (`prefault`); after it ran they are
    handed back (MADV_DONTNEED). They stay in the OS page cache, so the next step maps them again
    at memory speed (~0.05 s per GB here); if the machine is short of memory the OS may evict them and
    they are read from disk again instead of the process being killed. Peak memory is then about one
    block's weights, not the model's. Each block's file pages are found once, here: a LoRA fused later
    puts its weights in new tensors, and the file pages it leaves are the clean originals (kept for an
    exact unfuse, re-read from the file if needed). Returns the hook handles.
    """

    def before(block: nn.Module, _args) -> None:
        if not torch.is_grad_enabled():
            prefault(block)

    handles = []
    for block in blocks:
        pages = file_pages(list(block.parameters()))

        def after(_block: nn.Module, _args, _out, pages=pages) -> None:
            if not torch.is_grad_enabled():
                _dont_need(pages)

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    return handles


def drop_unused_pages(source: dict[str, Tensor], module: nn.Module) -> int:
    """`drop_file_pages` for the `source` tensors that `module` does not hold (after building it)."""
    used = {t.data_ptr() for t in module.state_dict(keep_vars=True).values()}
    return drop_file_pages([t for t in source.values() if t.data_ptr() not in used])
