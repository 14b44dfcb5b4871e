"""flux2studio: run, edit, fine-tune and serve the FLUX.2 family on your own hardware."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# MKL's conditional numerical reproducibility: without a mode, its fp32 products on some CPUs (measured on an AMD
# EPYC with AVX-512) gave the same pipeline different images depending on where its tensors lay in memory (two
# parity tests failed there); "AUTO" keeps the fastest code path for the CPU and makes results independent of that,
# at no measured cost (docs/performance.md, 2026-12-06). Read by MKL at its first use; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"

__all__ = ["GenerationSettings", "HostedPipeline", "Pipeline", "__version__", "load", "read_metadata", "save_png"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time imported on first use (below)
    from .hosted import HostedPipeline
    from .images import read_metadata, save_png
    from .loading import load
    from .pipeline import Pipeline
    from .settings import GenerationSettings

_PUBLIC = {"load": "loading", "Pipeline": "pipeline", "HostedPipeline": "hosted", "GenerationSettings": "settings",
           "save_png": "images", "read_metadata": "images"}  # fmt: skip


def __getattr__(name: str):
    # `from flux2studio import load` without importing torch at package import (the CLI's --help stays fast)
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'flux2studio' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
