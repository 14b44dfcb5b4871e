"""Image-to-image, inpainting and outpainting inputs: the start image, the mask, the strength, the canvas.

Preparation follows diffusers 0.42.1's `Flux2KleinInpaintPipeline` (tested for parity): the start image is
brought under the reference pixel cap and *resized* (Lanczos, not cropped) to multiples of 16; the mask is
resized in its own mode (Lanczos), turned grey, binarised at 0.5 and later sampled bilinearly onto the latent
grid (`sampling.mask_tokens`), so its edges are soft at the token level. White (1) = repaint, black = keep.

Outpainting grows the canvas, fills the new area from the image's edges (blurred) and masks it; after
decoding, the original pixels are put back unchanged and the generated side of the seam takes on the local
colour offset between the original and its decoded copy, fading out with distance (`paste_kept`), so the
kept area does not shift colour and the seam does not show it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from .images import REF_MAX_AREA, as_seen, check_size, image_hash
from .sampling import PIXELS_PER_TOKEN as MULTIPLE
from .sampling import mask_tokens
from .variants import ANCHORS

log = logging.getLogger(__name__)

STRENGTH_DEFAULT = {"image": 0.75, "mask": 1.0}  # image-to-image (as stable-diffusion.cpp); inpainting / outpainting
MAX_MASK_BLUR = 64  # px of Gaussian blur on the mask before it is binarised (diffusers' `mask_processor.blur`)
SEAM_BAND = 32  # px into the generated area over which the kept area's colour offset fades out


@dataclass(frozen=True)
class Init:
    """A validated start for image-to-image (no mask) or inpainting / outpainting (mask)."""

    image: Image.Image  # RGB, exactly the output size (the grown canvas when outpainting)
    mask: Tensor | None  # (1, 1, H, W) of 0/1, 1 = repaint; None: image-to-image (everything is repainted)
    strength: float  # (0, 1]: how much noise the start gets, hence how many steps run (`sampling.start_index`)
    image_hash: str  # of the image as given (before any resize), for the metadata and `--from`
    mask_hash: str | None = None
    mask_blur: int = 0
    expand: tuple[int, int, int, int] = (0, 0, 0, 0)  # px added left, top, right, bottom
    paste_back: bool = False  # outpainting: the unmasked pixels of `image` are put back after decoding

    def metadata(self) -> dict:
        return {
            "image": self.image_hash,
            "mask": self.mask_hash,
            "strength": self.strength,
            "mask_blur": self.mask_blur,
            "expand": list(self.expand) if any(self.expand) else None,
        }


def build_init(
    image: Image.Image,
    mask: Image.Image | None,
    strength: float | None,
    expand: Sequence[int] | None,
    mask_blur: int,
    size: tuple[int, int] | None,
    limits: tuple[int, int, str],
) -> Init:
    """Check and prepare a start; `limits` = (min side, max side, model id). Errors name the value and range."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    if mask is not None and not isinstance(mask, Image.Image):
        raise ValueError(f"mask must be a PIL image, got {type(mask).__name__}")
    default = STRENGTH_DEFAULT["mask" if mask is not None or any(expand or ()) else "image"]
    strength = default if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength!r} is out of range: more than 0, at most 1")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int) or not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise ValueError(f"mask_blur {mask_blur!r} is out of range 0..{MAX_MASK_BLUR} (pixels)")
    if mask_blur and mask is None:
        raise ValueError(f"mask_blur {mask_blur} softens a mask's edges: give a mask too")
    expand = check_expand(expand)
    if any(expand) and size is not None:
        raise ValueError("give an expansion or a size, not both: the canvas is the image plus the expansion")
    lo, hi, model = limits
    hashes = image_hash(image), None if mask is None else image_hash(mask)  # of the files as given
    image, mask = upright(image), None if mask is None else upright(mask)
    w, h = image.size
    if min(w, h) < 1:
        raise ValueError(f"image is {w}x{h}: empty")
    chosen = size is None
    if chosen:
        size = fitted(image.size, expand, hi)
        if size != start_size(image):
            log.info("image %dx%d used at %dx%d: %s takes sides up to %d", w, h, *size, model, hi)
    canvas = (size[0] + expand[0] + expand[2], size[1] + expand[1] + expand[3])
    try:
        check_size(*canvas, lo, hi, model)
    except ValueError as e:
        if any(expand):
            raise ValueError(f"expansion {list(expand)} makes the canvas {canvas[0]}x{canvas[1]}: {e}") from None
        if chosen and min(w, h) < lo:
            raise ValueError(f"the image is {w}x{h}: {model} takes sides of at least {lo} px (pass a size to "
                             "enlarge it)") from None  # fmt: skip
        if chosen:
            raise ValueError(f"the image ({w}x{h}, used at {size[0]}x{size[1]}) does not fit: {e}; "
                             "pass a size to resize it") from None  # fmt: skip
        raise
    start = resized(image, size).convert("RGB")
    binary = None
    if mask is not None:
        if mask.size != image.size:
            log.info("mask %dx%d resized to the image's %dx%d", *mask.size, *image.size)
        binary = prepare_mask(mask, size, mask_blur)
    if any(expand):
        start, grown = expand_canvas(start, expand)
        binary = grown if binary is None else F.pad(binary, (expand[0], expand[2], expand[1], expand[3]), value=1.0)
    if binary is not None and not _any_token(binary):
        raise ValueError("the mask is all black (or its white areas are under one 16x16 cell): nothing to repaint; "
                         "white = repaint, black = keep")  # fmt: skip
    return Init(
        image=start,
        mask=binary,
        strength=float(strength),
        image_hash=hashes[0],
        mask_hash=hashes[1],
        mask_blur=mask_blur,
        expand=expand,
        paste_back=any(expand),
    )


def upright(image: Image.Image) -> Image.Image:
    """As it is meant to be seen (EXIF orientation applied, as browsers do: a mask painted on the page lines up)
    in 8 bits a channel: 16-bit and float greys are scaled to 0..255 (Pillow would clip them), palettes and
    CMYK turned RGB."""
    image = as_seen(image)
    return image if image.mode in ("RGB", "L", "RGBA", "LA") else image.convert("RGB")


def fitted(size: tuple[int, int], expand: Sequence[int], max_side: int) -> tuple[int, int]:
    """The start size for an image of `size` (under the pixel cap, multiples of 16), scaled down if needed so
    that it and its expansion fit `max_side`."""
    w, h = _capped(size)
    left, top, right, bottom = expand or (0, 0, 0, 0)
    room_w, room_h = max_side - left - right, max_side - top - bottom
    scale = min(1.0, room_w / w, room_h / h) if room_w > 0 and room_h > 0 else 1.0
    return int(w * scale) // MULTIPLE * MULTIPLE, int(h * scale) // MULTIPLE * MULTIPLE


def check_expand(expand: Sequence[int] | None) -> tuple[int, int, int, int]:
    if expand is None:
        return (0, 0, 0, 0)
    values = tuple(expand)
    if len(values) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"expansion {values!r} is not four pixel counts LEFT, TOP, RIGHT, BOTTOM")
    for name, v in zip(("left", "top", "right", "bottom"), values, strict=True):
        if v < 0 or v % MULTIPLE:
            raise ValueError(f"expansion {name} {v} must be a non-negative multiple of {MULTIPLE}")
    return values  # type: ignore[return-value]


def start_size(image: Image.Image) -> tuple[int, int]:
    """The output size a start image gives: under the pixel cap, each side floored to a multiple of 16."""
    return prepared_size(image.size)


def prepared_size(size: tuple[int, int]) -> tuple[int, int]:
    """An image of `size` as the pipelines prepare it (a start image, a reference): under the pixel cap, each
    side floored to a multiple of 16."""
    w, h = _capped(size)
    return w // MULTIPLE * MULTIPLE, h // MULTIPLE * MULTIPLE


def _capped(size: tuple[int, int]) -> tuple[int, int]:
    w, h = size
    if w * h <= REF_MAX_AREA:
        return w, h
    scale = math.sqrt(REF_MAX_AREA / (w * h))
    return int(w * scale), int(h * scale)


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos to `size`, through the pixel cap first when the image is over it (diffusers' two resizes)."""
    if (capped := _capped(image.size)) != image.size:
        image = image.resize(capped, Image.Resampling.LANCZOS)
    return image.resize(size, Image.Resampling.LANCZOS)


def prepare_mask(mask: Image.Image, size: tuple[int, int], blur: int = 0) -> Tensor:
    """(1, 1, H, W) float32 of 0/1 at `size`: blurred (optional), resized in its own mode, grey, >= 0.5 -> 1."""
    if mask.mode not in ("L", "RGB", "RGBA"):
        mask = mask.convert("L")
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    grey = np.asarray(mask.resize(size, Image.Resampling.LANCZOS).convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]


def _any_token(mask: Tensor) -> bool:
    h, w = mask.shape[-2] // MULTIPLE, mask.shape[-1] // MULTIPLE
    return bool(mask_tokens(mask, h, w).amax() > 0)


def expand_canvas(image: Image.Image, expand: tuple[int, int, int, int]) -> tuple[Image.Image, Tensor]:
    """The image on a grown canvas (new area filled from its edges, blurred) and the mask of the new area."""
    left, top, right, bottom = expand
    array = np.asarray(image, dtype=np.uint8)
    padded = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(padded)
    blurred = canvas.filter(ImageFilter.GaussianBlur(MULTIPLE))
    mask = torch.ones(1, 1, *padded.shape[:2])
    mask[..., top : top + image.height, left : left + image.width] = 0
    keep = Image.fromarray((255 * (1 - mask[0, 0].numpy())).astype(np.uint8))
    return Image.composite(canvas, blurred, keep), mask


def expansion(
    image_size: tuple[int, int], canvas: tuple[int, int], anchor: str = "center"
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) that grows an image (its start size) to `canvas`, placed at `anchor`."""
    if anchor not in ANCHORS:
        raise ValueError(f"anchor {anchor!r} is not one of {', '.join(ANCHORS)}")
    (w, h), (cw, ch) = image_size, canvas
    if cw < w or ch < h:
        raise ValueError(f"canvas {cw}x{ch} is smaller than the image ({w}x{h}): it can only grow")
    if (cw - w) % MULTIPLE or (ch - h) % MULTIPLE:
        fit = (w + (cw - w) // MULTIPLE * MULTIPLE, h + (ch - h) // MULTIPLE * MULTIPLE)
        raise ValueError(f"canvas {cw}x{ch} grows the image ({w}x{h}) by {cw - w}x{ch - h}: it grows by multiples "
                         f"of {MULTIPLE} on each side, e.g. canvas {fit[0]}x{fit[1]}")  # fmt: skip
    ax, ay = ANCHORS[anchor]
    left = round((cw - w) * ax / MULTIPLE) * MULTIPLE
    top = round((ch - h) * ay / MULTIPLE) * MULTIPLE
    return left, top, cw - w - left, ch - h - top


def paste_kept(image: Image.Image, original: Image.Image, repaint: Tensor, band: int = SEAM_BAND) -> Image.Image:
    """`original`'s pixels put back unchanged wherever `repaint` (1, 1, H, W) is 0; within `band` px of them the
    generated pixels take on the local colour offset between `original` and the decoded image, fading to none
    at the band's end."""
    out = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    kept = torch.from_numpy(np.asarray(original.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    inside = (repaint == 0).float()
    near = _box_mean(inside, band)  # share of kept pixels around each pixel
    offset = _box_mean((kept - out) * inside, band) / near.clamp_min(1e-6)
    fade = (2 * near).clamp(max=1.0)  # 1 at the seam, 0 one band away
    result = torch.where(inside.bool(), kept, out + fade * offset).clamp(0, 255).round()
    return Image.fromarray(result[0].permute(1, 2, 0).to(torch.uint8).numpy())


def _box_mean(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)^2 window of the pixels inside the image, as two 1-D passes (the same numbers)."""
    k = 2 * radius + 1
    rows = F.avg_pool2d(x, (1, k), stride=1, padding=(0, radius), count_include_pad=False)
    return F.avg_pool2d(rows, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)
