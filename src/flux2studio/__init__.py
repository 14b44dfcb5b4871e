"""flux2studio: run, edit, fine-tune and serve the FLUX.2 family on your own hardware."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # `from flux2studio import load` without importing torch at package import (the CLI's --help stays fast)
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(name)
