"""Memory reused while a model computes (`residency.reuse_freed_memory`): glibc's heap held, one scratch buffer per
thread for what lives only while one layer runs, and everything handed back after."""

import ctypes
import os
import threading

import pytest
import torch
import torch.nn.functional as F

from flux2studio import pipeline, precision, residency
from flux2studio import quantize as quantizing
from flux2studio.loading import load
from flux2studio.quantize import QuantLinear, quantize_modules


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap() -> tuple[int, int]:
    """(bytes of the heap, bytes of chunks glibc mapped on their own)."""
    info = _mallinfo()
    return info.arena, info.hblkhd


def _mallinfo() -> MallInfo2:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def _larger_than_the_heaps_free_memory() -> int:
    """A size no free piece of the heap can serve (earlier tests leave free pieces; glibc reuses one that fits
    before it maps a chunk of its own)."""
    return 64 * MB + _mallinfo().fordblks


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


glibc = pytest.mark.skipif(residency._glibc() is None, reason="glibc's allocator (Linux) or a tuned one")
MB = 1 << 20


@glibc
def test_large_tensors_come_from_the_heap_while_computing_and_go_back_after():
    assert residency._held[0] == 0, "a computation of an earlier test still holds the heap"
    size = _larger_than_the_heaps_free_memory()

    def big() -> torch.Tensor:
        return torch.ones(size, dtype=torch.uint8)

    t = big()
    assert _heap()[1] >= size  # glibc's default: a chunk this large is mapped on its own, unmapped when freed
    del t
    with residency.reuse_freed_memory():
        with residency.reuse_freed_memory():  # nested: held until the outer one ends
            pass
        arena, mapped = _heap()
        t = big()
        assert _heap()[1] == mapped and _heap()[0] >= arena + size // 2  # from the heap
        grown = _heap()[0]
        del t
        assert _heap()[0] >= grown  # kept for the next allocation, not handed back (to be faulted in again)
        held = _rss()
    assert _rss() < held - 32 * MB  # handed back at the end (its pages: the heap may not shrink from the top)
    size = max(512 * MB, _larger_than_the_heaps_free_memory())
    t = torch.empty(size, dtype=torch.uint8)  # larger than any free piece of the heap (which it would reuse)
    assert _heap()[1] >= size  # glibc maps large chunks again
    del t


@glibc
def test_a_user_who_tuned_the_allocator_keeps_their_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    residency._glibc.cache_clear()
    try:
        assert residency._glibc() is None
        with residency.reuse_freed_memory():
            size = max(512 * MB, _larger_than_the_heaps_free_memory())
            t = torch.empty(size, dtype=torch.uint8)  # larger than any free piece of the heap
            assert _heap()[1] >= size  # mapped on its own, as glibc does by default: the heap is not held
            del t
    finally:
        monkeypatch.undo()
        residency._glibc.cache_clear()


def test_scratch_is_one_buffer_per_thread_while_computing_and_freed_after():
    parts = [((3, 5), torch.float32), ((7,), torch.int32)]
    assert residency.scratch(parts, torch.device("cpu")) is None  # not computing: callers allocate as usual
    seen = {}
    with residency.reuse_freed_memory():
        a, b = residency.scratch(parts, torch.device("cpu"))
        assert (a.shape, a.dtype, b.shape, b.dtype) == ((3, 5), torch.float32, (7,), torch.int32)
        assert b.data_ptr() >= a.data_ptr() + 60 and b.data_ptr() % 64 == 0  # apart, aligned
        (c,) = residency.scratch([((2, 2), torch.float32)], torch.device("cpu"))
        assert c.data_ptr() == a.data_ptr()  # the same memory again
        (d,) = residency.scratch([((1000,), torch.float32)], torch.device("cpu"))
        assert d.numel() == 1000  # grown when a layer needs more

        def other() -> None:
            with residency.reuse_freed_memory():
                seen["other"] = residency.scratch(parts, torch.device("cpu"))[0].data_ptr()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert seen["other"] != residency.scratch(parts, torch.device("cpu"))[0].data_ptr()  # a thread's own
    assert residency.scratch(parts, torch.device("cpu")) is None


def test_widened_weights_go_to_scratch_at_inference_only_and_give_the_same_numbers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).bfloat16()
    model.requires_grad_(False)  # a frozen base (LoRA training): widened, but kept by autograd
    reference = [m.weight.float() for m in (model[0], model[2])], [m.bias.float() for m in (model[0], model[2])]
    precision.widen_on_use(model, [model], torch.float32, residency.scratch)
    x = torch.randn(4, 16)
    ptrs = []
    for m in (model[0], model[2]):
        m.register_forward_pre_hook(lambda m, _a: ptrs.append(m.weight.data_ptr()))
    (w0, w2), (b0, b2) = reference
    expected = F.linear(F.gelu(F.linear(x, w0, b0)), w2, b2)
    with torch.no_grad(), residency.reuse_freed_memory():
        buffer = residency.scratch([((32, 16), torch.float32)], torch.device("cpu"))[0].data_ptr()  # the largest
        ptrs.clear()
        y = model(x)
    assert ptrs == [buffer, buffer]  # both layers' fp32 weights written into the one buffer
    assert torch.equal(y, expected)
    assert all(m.weight.dtype == torch.bfloat16 for m in (model[0], model[2]))  # stored weights back after

    x.requires_grad_(True)  # with a gradient: autograd keeps each widened weight, so they are new tensors
    with residency.reuse_freed_memory():
        buffer = residency.scratch([((32, 16), torch.float32)], torch.device("cpu"))[0].data_ptr()  # the largest
        ptrs.clear()
        y = model(x)
        y.sum().backward()
    assert buffer not in ptrs and torch.equal(y.detach(), expected)
    x2 = x.detach().requires_grad_(True)
    F.linear(F.gelu(F.linear(x2, w0, b0)), w2, b2).sum().backward()
    assert torch.allclose(x.grad, x2.grad)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "F16"])
def test_packed_weights_unpack_into_scratch_at_inference_only_and_give_the_same_numbers(fmt, monkeypatch):
    """A packed layer that is not multiplied in int8 (GGUF blocks, fp8, ...) unpacks its weight for the call into
    the thread's scratch buffer, as widened weights are: the same buffer layer after layer; new tensors where
    autograd keeps them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantLinear(64, 96, True, fmt), QuantLinear(96, 64, True, fmt))
    for m in model:
        m.weight.data = quantizing.quantize_weight(torch.randn(m.out_features, m.in_features), fmt)
        m.bias.data = torch.randn(m.out_features)
    x = torch.randn(10, 64)
    (w0, b0), (w2, b2) = [(m.dense(torch.float32), m.bias) for m in model]
    expected = F.linear(F.linear(x, w0, b0), w2, b2)
    ptrs, real = [], quantizing.dequantize_weight

    def spy(*args):
        w = real(*args)
        ptrs.append(w.data_ptr())
        return w

    monkeypatch.setattr(quantizing, "dequantize_weight", spy)
    with torch.no_grad(), residency.reuse_freed_memory(hold_heap=False):
        buffer = residency.scratch([((96, 64), torch.float32)], torch.device("cpu"))[0].data_ptr()
        y = model(x)
    assert ptrs == [buffer, buffer] and torch.equal(y, expected)

    x.requires_grad_(True)
    ptrs.clear()
    with residency.reuse_freed_memory(hold_heap=False):
        buffer = residency.scratch([((96, 64), torch.float32)], torch.device("cpu"))[0].data_ptr()
        y = model(x)
        y.sum().backward()
    assert buffer not in ptrs and torch.equal(y.detach(), expected)
    x2 = x.detach().requires_grad_(True)
    F.linear(F.linear(x2, w0, b0), w2, b2).sum().backward()
    assert torch.equal(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_products_in_scratch_give_the_same_numbers_and_their_outputs_survive_the_next(dtype, monkeypatch):
    monkeypatch.setattr("flux2studio.quantize._int8_kernel", lambda: "int_mm")  # the product that writes to scratch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    quantize_modules(model, "int8", lambda name: True)
    assert all(isinstance(m, QuantLinear) for m in model)
    x = torch.randn(10, 64).to(dtype)
    with torch.no_grad():
        first, second = model[0](x), model(x)
        with residency.reuse_freed_memory():
            a = model[0](x)
            b = model[1](a)  # the next int8 product reuses the scratch memory: `a` must not live there
            assert residency._thread.buffers  # (it was used)
            assert torch.equal(a, first) and torch.equal(b, second)


def test_a_generation_computes_with_memory_reused_and_holds_the_heap_where_it_multiplies_in_int8(monkeypatch):
    asked = []
    real = pipeline.reuse_freed_memory

    def spy(hold_heap: bool = True):
        asked.append(hold_heap)
        return real(hold_heap)

    monkeypatch.setattr(pipeline, "reuse_freed_memory", spy)
    for quantize in (None, "int8"):
        asked.clear()
        load("nano", device="cpu", dtype="fp32", quantize=quantize)("a red circle", size=(64, 64), steps=2)
        assert asked == ([False, False] if quantize is None else [False, True])  # encoding, denoising
    assert residency.scratch([((1,), torch.uint8)], torch.device("cpu")) is None  # all freed after
