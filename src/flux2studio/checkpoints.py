"""Find, read and check weights: safetensors only, strict loads that name every bad key.

Modules are built on the meta device and their tensors assigned from the (memory-mapped) file, so
a model never exists twice in memory. Pickle checkpoints are refused: loading one runs code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
EMBEDDED = Path(__file__).parent / "weights"


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Tensors of a .safetensors file (memory-mapped on CPU); pickle and broken files get a clear error."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"{path} is a pickle checkpoint ({path.suffix}); loading it could run arbitrary code. "
            "Convert it to .safetensors first (safetensors' convert tools), or download the .safetensors release."
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def check_keys(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """Raise one error naming every missing key, unexpected key and shape mismatch."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(s)}" for k, s in expected.items()
                   if k in sd and sd[k].shape != s)  # fmt: skip
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            shown = "; ".join(items[:12]) + (f" (+{len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ValueError(f"{what} weights do not fit the model: " + " | ".join(problems))


def build(factory: Callable[[], nn.Module], sd: dict[str, Tensor], what: str, dtype: torch.dtype | None = None):
    """Build `factory()` on the meta device and assign the tensors of `sd` (strict, cast to `dtype`)."""
    with torch.device("meta"):
        module = factory()
    check_keys(module, sd, what)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module.eval()
