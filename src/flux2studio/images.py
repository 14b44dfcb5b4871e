"""PIL <-> tensors, reference-image preparation and size checks (FLUX2.md §3).

Reference preparation follows diffusers 0.42.1's FLUX.2 pipelines: images over the pixel cap are
resized (Lanczos) to the cap's area, then centre-cropped to multiples of 16; nothing is stretched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .sampling import PIXELS_PER_TOKEN as MULTIPLE  # sides are whole latent tokens
from .variants import ASPECTS

log = logging.getLogger(__name__)

REF_MAX_AREA = 1024 * 1024  # reference images above this pixel count are downscaled
REF_MIN_SIDE = 64
REF_MAX_ASPECT = 8


def check_size(width: int, height: int, min_side: int, max_side: int, model_id: str = "") -> None:
    """Raise a ValueError naming the bad side and the allowed range; nothing is silently changed."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not min_side <= value <= max_side:  # (first: a multiple of 16 out of range would not help)
            who = f" for {model_id}" if model_id else ""
            raise ValueError(f"{name} {value} is outside the supported range {min_side}..{max_side}{who}")
        if value % MULTIPLE:
            lo, hi = value // MULTIPLE * MULTIPLE, (value // MULTIPLE + 1) * MULTIPLE
            nearest = f"{lo} or {hi}" if lo else str(hi)
            raise ValueError(f"{name} {value} is not a multiple of {MULTIPLE} (nearest: {nearest})")


def check_reference_size(w: int, h: int, index: int = 0) -> None:
    """A ValueError unless a reference of w x h pixels is one the pipelines take (sides, aspect)."""
    if w < REF_MIN_SIDE or h < REF_MIN_SIDE:
        raise ValueError(f"reference {index} is {w}x{h}: both sides must be at least {REF_MIN_SIDE} px")
    if max(w / h, h / w) > REF_MAX_ASPECT:
        raise ValueError(f"reference {index} is {w}x{h} (aspect {max(w / h, h / w):.1f}:1): at most {REF_MAX_ASPECT}:1")


def prepare_reference(image: Image.Image, index: int = 0) -> Image.Image:
    """Validate and crop one reference image as the FLUX.2 pipelines do; returns an RGB image."""
    image = as_seen(image)
    w, h = image.size
    check_reference_size(w, h, index)
    if w * h > REF_MAX_AREA:
        scale = math.sqrt(REF_MAX_AREA / (w * h))
        new = (int(w * scale), int(h * scale))
        log.info("reference %d resized from %dx%d to %dx%d (cap %d pixels)", index, w, h, *new, REF_MAX_AREA)
        image = image.resize(new, Image.Resampling.LANCZOS)
        w, h = image.size
    cw, ch = w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).convert("RGB")


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """An image file read whole, in its own mode (a mask keeps its greys); a clear error if it is not one."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from None


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def size_for_aspect(aspect: str, pixels: int) -> tuple[int, int]:
    """(width, height) of about `pixels` pixels at `aspect` ("16:9"), each side a multiple of 16."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect {aspect!r} is not one of {', '.join(ASPECTS)}")
    a, b = (int(v) for v in aspect.split(":"))
    w = math.sqrt(pixels * a / b)
    h = w * b / a
    return max(MULTIPLE, round(w / MULTIPLE) * MULTIPLE), max(MULTIPLE, round(h / MULTIPLE) * MULTIPLE)


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and float greys scaled to 8-bit grey ("L": Pillow's own conversion clips them, a 16-bit grey
    becoming white); other images as they are."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 1.0 if image.mode == "F" and values.max() <= 1.0 else 65535.0 if image.mode != "F" else values.max()
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def as_seen(image: Image.Image) -> Image.Image:
    """As it is meant to be seen: its EXIF orientation applied (a phone photo upright, as browsers show it) and
    `eight_bit`. Applying it twice changes nothing (the orientation tag goes)."""
    from PIL import ImageOps

    return eight_bit(ImageOps.exif_transpose(image))


def open_reference(path: str | Path, what: str = "reference image") -> Image.Image:
    """A reference image file as the pipelines read it (LoRA training its images too): upright by its EXIF
    orientation, RGB (16-bit greys scaled, not clipped); `what` names it in an error."""
    return as_seen(open_image(path, what)).convert("RGB")


def pixels_digest(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels and size: what it contributes as a reference or start image, not its file."""
    rgb = eight_bit(image).convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


def image_hash(image: Image.Image) -> str:
    """Short `pixels_digest` (in the metadata)."""
    return pixels_digest(image)[:12]


def parameters_text(meta: dict) -> str:
    """A1111-style `parameters` text: prompt, negative prompt, then `key: value` pairs on one line."""
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    pairs = [
        ("Steps", meta["steps"]),
        ("Sampler", "Euler (flow)"),
        ("CFG scale", meta["guidance"]),
        *([("CFG interval", "{}-{}".format(*meta["guidance_interval"]))] if "guidance_interval" in meta else []),
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model", meta["model"]),
        ("Model hash", meta["weights_hash"]),
        *(
            [("Lora hashes", '"' + ", ".join(f"{Path(lo['file']).stem}: {lo['hash']}" for lo in meta["loras"]) + '"')]
            if meta.get("loras")
            else []
        ),  # (A1111's key; the scales are in the flux2 chunk)
        ("Version", f"flux2studio {meta['version']}"),
    ]
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, overwrite: bool = False) -> Path:
    """Write a PNG carrying the image's `parameters` and `flux2` metadata; an existing file is an error, or with
    `overwrite` replaced once the new one is written whole (never lost to a failed write)."""
    import secrets

    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    for key in ("parameters", "flux2"):
        if key in image.info:
            info.add_text(key, image.info[key])
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        with open(path, "xb") as f:  # "x": fails if the file exists
            image.save(f, format="PNG", pnginfo=info)
        return path
    part = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")  # (opened as any file: the umask's mode)
    try:
        with open(part, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)  # (its random name is this call's alone)
        raise
    return path


def read_metadata(path: str | Path) -> dict:
    """The `flux2` JSON metadata of a PNG written by this tool."""
    with Image.open(path) as image:
        text = image.info.get("flux2")
    if text is None:
        raise ValueError(f"{path} carries no flux2 metadata (not generated by flux2studio, or stripped)")
    return json.loads(text)


def grid(images: list[Image.Image], labels: list[str], columns: int) -> Image.Image:
    """A contact sheet: images in rows of `columns`, each with its label in a strip underneath."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    strip = 18
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(zip(images, labels, strict=True)):
        x, y = (i % columns) * w, (i // columns) * (h + strip)
        sheet.paste(im, (x + (w - im.width) // 2, y + (h - im.height) // 2))
        draw.text((x + 4, y + h + 3), label, fill="black", font=font)
    return sheet
