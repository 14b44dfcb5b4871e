"""flux2studio: run, edit, fine-tune and serve the FLUX.2 family on your own hardware."""

from __future__ import annotations

import os

# MKL's conditional numerical reproducibility: without a mode, its fp32 products on some CPUs (measured on an AMD
# EPYC with AVX-512) gave the same pipeline different images depending on where its tensors lay in memory (two
# parity tests failed there); "AUTO" keeps the fastest code path for the CPU and makes results independent of that,
# at no measured cost (docs/performance.md, 2026-12-06). Read by MKL at its first use; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO")

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # `from flux2studio import load` without importing torch at package import (the CLI's --help stays fast)
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(name)
