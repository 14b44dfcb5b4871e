"""Every limit the server enforces, in one table, checked before any work is queued (FLUX2.md §8 item 6)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..lora import MAX_LORA_SCALE


@dataclass(frozen=True)
class Limits:
    max_side: int = 2048  # pixels per side (a model's own range may be tighter)
    max_megapixels: float = 4.0  # width * height / 1e6
    max_steps: int = 100
    max_images: int = 4  # images per job
    max_refs: int = 4
    max_prompt_chars: int = 2000  # prompt and negative prompt each
    max_queue: int = 32  # queued + running jobs; beyond: 429 with Retry-After
    max_upload_bytes: int = 20 * 2**20  # per reference image
    max_upload_pixels: int = 4096 * 4096  # decoded size: a small file can decode to a huge bitmap
    max_loras: int = 4
    max_lora_scale: float = MAX_LORA_SCALE  # |scale| of each LoRA; larger only ever gives noise
    max_disk_bytes: int | None = None  # images and uploads on disk (`--max-disk`); beyond: 507 for new work
    upload_ttl_s: float = 24 * 3600  # uploads no queued or running job names are deleted after this
    keep_finished_s: float | None = None  # finished jobs and their images are deleted after this (`--keep-days`)
    max_json_bytes: int = 256 * 2**10  # a request body that is not an image upload
    max_form_extra_bytes: int = 64 * 2**10  # a multipart body's fields and boundaries beside its images
    shutdown_grace_s: int = 5  # seconds: on SIGTERM, open event streams and OpenAI waits are cut after this (their
    # jobs stay queued or running in the store and go on after a restart)

    def body_bytes(self, path: str) -> int:
        """The most bytes a request body to `path` may have (checked as it streams in, before parsing)."""
        if path == "/v1/uploads":
            return self.max_upload_bytes + self.max_form_extra_bytes
        if path == "/v1/images/edits":  # the images and a mask
            return (self.max_refs + 1) * self.max_upload_bytes + self.max_form_extra_bytes
        return self.max_json_bytes

    def disk_problem(self, used: Callable[[], int], adding: int = 0) -> str | None:
        """Why `adding` more bytes would go over the disk quota (None if they fit or there is none); `used()`
        counts the bytes in use, only when there is a quota."""
        if self.max_disk_bytes is not None and adding > self.max_disk_bytes:  # (was told to delete jobs)
            return f"{adding} bytes are more than the server's whole disk quota ({self.max_disk_bytes} bytes)"
        if self.max_disk_bytes is not None and (used := used()) + adding > self.max_disk_bytes:
            return (f"disk quota reached: {used} bytes of images and uploads, at most {self.max_disk_bytes}; "
                    "delete finished jobs (DELETE /v1/jobs/{id})")  # fmt: skip
        return None

    def text_problem(self, name: str, text: str | None) -> str | None:
        """Why `text` cannot go to a text encoder (None if it can): over the length limit, a NUL character
        (refused: tokenizers treat it as a terminator or drop it), or a lone surrogate (not a Unicode scalar
        value: no encoding can carry it, and it fails the encoder)."""
        if text is None:
            return None
        if len(text) > self.max_prompt_chars:
            return f"{name} has {len(text)} characters; at most {self.max_prompt_chars}"
        if "\x00" in text:
            return f"{name} contains a NUL character (U+0000) at {text.index(chr(0))}: not accepted"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{name} has a lone surrogate (U+{ord(text[e.start]):04X}) at {e.start}: not a Unicode character"
        return None


DEFAULT_LIMITS = Limits()
