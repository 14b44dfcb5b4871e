"""Uploaded images: checked for size, type and pixel count before decoding, decoded whole off the event loop,
stored as sent under a new id; OpenAI's alpha masks turned into ours (white = repaint)."""

from __future__ import annotations

import asyncio
import io
import threading

from fastapi import HTTPException, UploadFile
from PIL import Image

from .limits import Limits
from .store import UPLOAD_SUFFIXES, Store

UPLOAD_SUFFIX = dict(zip(("PNG", "JPEG", "WEBP"), UPLOAD_SUFFIXES, strict=True))  # Pillow's format -> file
UPLOAD_SUFFIX["MPO"] = UPLOAD_SUFFIX["JPEG"]  # phone cameras' JPEGs with extra frames: the first is the photo
DECODES = threading.BoundedSemaphore(2)  # uploads decoded at once, each in a thread (the event loop keeps answering)


async def save_upload(file: UploadFile, store: Store, limits: Limits) -> str:
    """Check byte size, format and pixel count before decoding, then that it decodes whole; store the bytes as
    they came (no re-encoding: a photo stays a JPEG) under a new id. Old unreferenced uploads go first."""
    checked = await checked_upload(file, limits)
    return (await asyncio.to_thread(save_checked, [checked], store, limits))[0]


async def checked_upload(file: UploadFile, limits: Limits) -> tuple[bytes, str]:
    """An uploaded image's bytes and file suffix, checked (`save_upload`) and not stored yet."""
    raw = await file.read(limits.max_upload_bytes + 1)
    if len(raw) > limits.max_upload_bytes:
        raise HTTPException(413, f"upload is over {limits.max_upload_bytes} bytes")
    return raw, await asyncio.to_thread(_checked_image, raw, limits)


def _checked_image(raw: bytes, limits: Limits) -> str:
    with DECODES:
        return _check_image(raw, limits)


def save_checked(checked: list[tuple[bytes, str]], store: Store, limits: Limits) -> list[str]:
    """Images already checked, stored under new ids, all or none (old uploads expired first, then the disk quota
    counted for them together)."""
    store.expire_refs(limits.upload_ttl_s)
    if (problem := limits.disk_problem(store.disk_bytes, sum(len(raw) for raw, _ in checked))) is not None:
        raise HTTPException(507, problem)
    ids: list[str] = []
    try:
        for raw, suffix in checked:
            ids.append(store.save_ref(raw, suffix))
    except BaseException:
        store.drop_refs(ids)
        raise
    return ids


def alpha_mask(raw: bytes, limits: Limits) -> tuple[bytes, str]:
    """OpenAI's mask (a PNG whose fully transparent pixels mark what to edit) as ours (white = repaint), a PNG's
    bytes and suffix to store."""
    if len(raw) > limits.max_upload_bytes:
        raise HTTPException(413, f"mask is over {limits.max_upload_bytes} bytes")
    with DECODES:
        _check_image(raw, limits)
        with Image.open(io.BytesIO(raw)) as im:
            if not (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):
                raise HTTPException(422, f"mask has no alpha channel (mode {im.mode}): OpenAI's masks are PNGs "
                                         "whose fully transparent pixels mark the area to edit")  # fmt: skip
            alpha = im.convert("RGBA").getchannel("A")
    ours = alpha.point(lambda a: 255 if a == 0 else 0)
    buf = io.BytesIO()
    ours.save(buf, format="PNG")
    return buf.getvalue(), ".png"  # made here from a checked file: no second check


def _check_image(raw: bytes, limits: Limits) -> str:
    """The file suffix of an acceptable image (PNG, JPEG, WEBP within the pixel limit, decodable)."""
    try:
        with Image.open(io.BytesIO(raw)) as probe:  # reads the header only: no decoding yet
            if probe.format not in UPLOAD_SUFFIX:
                raise HTTPException(415, f"image format {probe.format} not accepted: PNG, JPEG or WEBP")
            w, h = probe.size
            if w * h > limits.max_upload_pixels:
                raise HTTPException(413, f"image is {w}x{h}: over {limits.max_upload_pixels} pixels")
            probe.convert("RGB")  # decodes it all: a truncated or corrupt file is refused now, not in a job
            return UPLOAD_SUFFIX[probe.format]
    except HTTPException:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard fired first: same answer
        raise HTTPException(413, f"image is over {limits.max_upload_pixels} pixels") from None
    except Exception:
        raise HTTPException(415, "not a readable image") from None
