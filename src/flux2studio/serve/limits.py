"""Every limit the server enforces, in one table, checked before any work is queued (FLUX2.md §8 item 6)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_side: int = 2048  # pixels per side (a model's own range may be tighter)
    max_megapixels: float = 4.0  # width * height / 1e6
    max_steps: int = 100
    max_images: int = 4  # images per job
    max_refs: int = 4
    max_prompt_chars: int = 2000
    max_queue: int = 32  # queued + running jobs; beyond: 429 with Retry-After
    max_upload_bytes: int = 20 * 2**20  # per reference image
    max_upload_pixels: int = 4096 * 4096  # decoded size: a small file can decode to a huge bitmap
    max_loras: int = 4
    max_lora_scale: float = 8.0  # |scale| of each LoRA; larger only ever gives noise


DEFAULT_LIMITS = Limits()
