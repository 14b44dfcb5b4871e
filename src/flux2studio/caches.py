"""What a pipeline keeps between calls so that an input seen again is not computed again: prompts' embeddings
(the text encoder skipped) and images' latents (the VAE's encoder skipped). Same numbers either way: an embedding
does not depend on the batch it was encoded in, an image's latents on anything but its pixels, tiles and dtype."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from torch import Tensor

PROMPT_CACHE_BYTES = 128 * 2**20  # prompt embeddings (klein-4b: 16 prompts in bf16, 8 in fp32)
LATENT_CACHE_BYTES = 64 * 2**20  # references' and start images' latents (1024x1024: 1 MB in bf16)


class TensorCache:
    """Tensors kept in host memory by key up to `limit` bytes, the least recently used leaving first (0 keeps none)."""

    def __init__(self, limit: int) -> None:
        self._kept: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._bytes = 0  # of the tensors kept
        self.limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, limit: int) -> None:
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"a cache limit of {limit!r}: give bytes, 0 (keep none) or more")
        self._limit = limit
        while self._kept and self._bytes > limit:
            self._bytes -= self._kept.popitem(last=False)[1].nbytes

    def get(self, key: Hashable) -> Tensor | None:
        value = self._kept.get(key)
        if value is not None:
            self._kept.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Tensor) -> None:
        if value.nbytes > self.limit:
            return
        value = value.detach().to("cpu", copy=True)  # its own memory: a row of a batch would keep the whole batch
        old = self._kept.pop(key, None)
        self._bytes += value.nbytes - (old.nbytes if old is not None else 0)
        self._kept[key] = value
        self.limit = self.limit  # the least recently used out until the rest fits

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()
        self._bytes = 0
