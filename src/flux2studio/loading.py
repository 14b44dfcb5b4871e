"""`load(model_id)`: a ready `Pipeline` for a registered variant, from the embedded weights or a path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoints import EMBEDDED, build, read_safetensors
from .model.autoencoder import AutoEncoder
from .model.transformer import Flux2Transformer
from .pipeline import DTYPES, Pipeline
from .text_encoders import load_minilm
from .variants import Variant, get_variant

EMBEDDED_IDS = ("nano", "nano-base")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """bf16 by default (fast on CUDA and on CPUs with bf16 matmul); fp16 on Apple GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = "fp16" if device == "mps" else "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_files(model_id: str) -> tuple[Path, Path]:
    """(transformer, vae) files shipped inside the package for nano / nano-base."""
    transformer, vae = EMBEDDED / f"{model_id}.safetensors", EMBEDDED / "nano-vae.safetensors"
    for path in (transformer, vae):
        if not path.is_file():
            raise FileNotFoundError(
                f"embedded weights {path.name} are missing from {EMBEDDED}: reinstall flux2studio, "
                "or rebuild them with `flux2 train nano` (see the README)"
            )
    return transformer, vae


def load(
    model_id: str = "nano",
    *,
    weights: str | Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Pipeline:
    """A `Pipeline` for `model_id`. The embedded models need no download and no `weights`."""
    variant: Variant = get_variant(model_id)
    if variant.hosted:
        raise ValueError(f"{model_id} is a hosted model (Black Forest Labs API); it has no local weights")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if model_id not in EMBEDDED_IDS:
        raise NotImplementedError(f"loading {model_id} from {weights!r} is not available in this version")
    t_path, vae_path = embedded_files(model_id)
    if weights is not None:
        t_path = Path(weights)
    transformer = build(lambda: Flux2Transformer(variant.transformer), read_safetensors(t_path), model_id, torch_dtype)
    vae = build(lambda: AutoEncoder(variant.vae), read_safetensors(vae_path), "nano VAE", torch_dtype)
    text_encoder = load_minilm(variant.text_encoder, device=device)
    return Pipeline(dataclasses.replace(variant), transformer, vae, text_encoder, device=device, dtype=torch_dtype)
