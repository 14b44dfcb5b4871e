"""PIL <-> tensors, reference-image preparation and size checks (FLUX2.md §3).

Reference preparation follows diffusers 0.42.1's FLUX.2 pipelines: images over the pixel cap are
resized (Lanczos) to the cap's area, then centre-cropped to multiples of 16; nothing is stretched.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .sampling import PIXELS_PER_TOKEN as MULTIPLE  # sides are whole latent tokens

log = logging.getLogger(__name__)

REF_MAX_AREA = 1024 * 1024  # reference images above this pixel count are downscaled
REF_MIN_SIDE = 64
REF_MAX_ASPECT = 8


def check_size(width: int, height: int, min_side: int, max_side: int, model_id: str = "") -> None:
    """Raise a ValueError naming the bad side and the allowed range; nothing is silently changed."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % MULTIPLE:
            lo, hi = value // MULTIPLE * MULTIPLE, (value // MULTIPLE + 1) * MULTIPLE
            raise ValueError(f"{name} {value} is not a multiple of {MULTIPLE} (nearest: {lo} or {hi})")
        if not min_side <= value <= max_side:
            who = f" for {model_id}" if model_id else ""
            raise ValueError(f"{name} {value} is outside the supported range {min_side}..{max_side}{who}")


def prepare_reference(image: Image.Image, index: int = 0) -> Image.Image:
    """Validate and crop one reference image as the FLUX.2 pipelines do; returns an RGB image."""
    w, h = image.size
    if w < REF_MIN_SIDE or h < REF_MIN_SIDE:
        raise ValueError(f"reference {index} is {w}x{h}: both sides must be at least {REF_MIN_SIDE} px")
    if max(w / h, h / w) > REF_MAX_ASPECT:
        raise ValueError(f"reference {index} is {w}x{h} (aspect {max(w / h, h / w):.1f}:1): at most {REF_MAX_ASPECT}:1")
    if w * h > REF_MAX_AREA:
        scale = math.sqrt(REF_MAX_AREA / (w * h))
        new = (int(w * scale), int(h * scale))
        log.info("reference %d resized from %dx%d to %dx%d (cap %d pixels)", index, w, h, *new, REF_MAX_AREA)
        image = image.resize(new, Image.Resampling.LANCZOS)
        w, h = image.size
    cw, ch = w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).convert("RGB")


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]
