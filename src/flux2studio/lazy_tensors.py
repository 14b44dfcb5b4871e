"""Tensors made only when their turn comes to be written, so that converting a model larger than the machine's
memory (dev: 64 GB in bf16, 34 GB in int8) holds about one tensor at a time: a layout's fused q/k/v, an fp8 or
packed weight widened, a weight quantized (`checkpoints.write_safetensors` and `quantized_files.write_gguf` write
them one by one, and hand back the file pages each was read from)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class Pending:
    """A tensor of a known shape and dtype, made by `make()` when it is written; `inputs`: the stored tensors it is
    made from (memory-mapped ones: their pages are handed back once it is written)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]
    inputs: tuple[Tensor, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __call__(self) -> Tensor:
        t = self.make()
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise RuntimeError(f"made a {tuple(t.shape)} {t.dtype} tensor where {self.shape} {self.dtype} was planned")
        return t


Lazy = Tensor | Pending


def materialize(value: Any) -> Any:
    """A Pending one made; anything else as it is."""
    return value() if isinstance(value, Pending) else value


def stored(value: Any) -> tuple[Tensor, ...]:
    """The stored tensors a value is (a tensor) or is made from (a Pending one)."""
    return value.inputs if isinstance(value, Pending) else (value,) if isinstance(value, Tensor) else ()


def pending(fn: Callable[..., Tensor], *args: Any, shape: tuple[int, ...], dtype: torch.dtype) -> Pending:
    """`fn(*args)` made when written (Pending arguments made then too), announced as `shape` and `dtype`."""
    inputs = tuple(t for a in args for t in stored(a))
    return Pending(tuple(int(n) for n in shape), dtype, lambda: fn(*(materialize(a) for a in args)), inputs)
