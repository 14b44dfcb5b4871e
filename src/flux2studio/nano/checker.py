"""GenEval-style checker for the Shapes world: image -> detected objects -> score against a caption's constraints.

numpy + PIL only. It reads the world's numbers (palette, sizes, grid, backgrounds, lighting falloff)
from shapes.py and knows nothing about how an image was made, so renders and generated images are
measured alike.

Segmentation explains every pixel as a mix of one palette colour and some grey:
pixel = alpha * colour + (1 - alpha) * grey. Anti-aliased edges over any background, lit or not, are
exactly such mixes (every background is achromatic), so removing each pixel's grey component leaves
alpha * the colour's chroma: the colour is the palette entry whose chroma direction fits best, and the
pixel belongs to an object when alpha >= 0.5. Lightness is ignored on purpose: a darker or lighter
red is still red.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import BACKGROUNDS, CELLS, COLORS, LIGHT_FLOOR, RGB, SHAPES, SIZES, Constraints, Obj

# Fill ratio of a shape's bounding box: circle pi/4, square 1, equilateral triangle 1/2.
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
# Skewness of the vertical mass distribution: 0 for circle and square; an upward triangle's width grows
# linearly with depth (a right-triangular distribution), skewness -2 sqrt(2) / 5 with y pointing down.
# Pixelation blunts a 10 px triangle's apex and corners, so its measured fill rises to ~0.64, halfway to
# a circle's; the skew, a moment of the whole mass, stays near -0.55 at that size.
SKEW = {"circle": 0.0, "square": 0.0, "triangle": -2 * math.sqrt(2) / 5}
OBJECT_ALPHA = 0.5  # a pixel is an object pixel when at least half of it is palette colour
BACKGROUND_ALPHA = 0.1  # background pixels for lighting / border statistics are nearly pure grey
# Components smaller than a quarter of the smallest object (a small triangle) are specks.
MIN_AREA = 0.25 * FILL["triangle"] * math.sqrt(3) / 2 * min(SIZES.values()) ** 2  # fraction of min(W, H)^2
BORDER_PERCENTILE = 95  # a lit background's brightest border pixels show its unlit grey level
# Lighting: mean brightness of the lit third over the far third is 1 - (1 - f)/6 vs f + (1 - f)/6; call a
# background lit when the relative difference is at least half of that, and when it is bright enough
# to tell (black is never lit).
LIT_CONTRAST = 0.5 * (1 - LIGHT_FLOOR) * (2 / 3) / (1 - (1 - LIGHT_FLOOR) / 6)
LIT_MIN_LEVEL = 16  # grey levels; below this a background is too dark to show light
MAX_MATCHED = 8  # only the largest detections take part in matching (more can never be correct)
ATTRIBUTES = ("color", "shape", "size", "position", "count", "relation", "background", "lighting", "negation")
OBJECT_FIELDS = {"color": "color", "shape": "shape", "size": "size", "cell": "position"}  # ObjSpec -> attribute

_NAMES = tuple(COLORS)
_GREY = np.ones(3, dtype=np.float32) / math.sqrt(3)  # unit vector along the grey axis
_PALETTE = np.array([RGB[c] for c in _NAMES], dtype=np.float32)  # (8, 3)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) colours minus their grey part (the projection on the grey axis)."""
    return rgb - (rgb @ _GREY)[:, None] * _GREY


_CHROMA = _chroma(_PALETTE)  # (8, 3)


@dataclass(frozen=True)
class Detected:
    """One connected component of one palette colour; `x, y` its centroid as fractions of width / height."""

    shape: str
    color: str
    size: str
    cell: str
    x: float
    y: float
    area: float  # pixels, each counted by its colour share
    fill: float  # area / (longest vertical chord x longest horizontal chord): the bounding box's fill
    skew: float  # skewness of the vertical mass distribution


@dataclass(frozen=True)
class Analysis:
    """What an image shows: background name, lighting (one of LIGHTINGS) and the detected objects."""

    background: str
    lighting: str
    objects: tuple[Detected, ...]  # largest first


@dataclass(frozen=True)
class Score:
    correct: bool  # every stated constraint holds and nothing unstated was added
    attributes: dict[str, bool]  # only the attributes the prompt touches, in ATTRIBUTES order


def as_detected(obj: Obj) -> Detected:
    """What the checker would find for a perfectly drawn `obj` (to score a planned scene without drawing it)."""
    return Detected(obj.shape, obj.color, obj.size, obj.cell, obj.x, obj.y, area=0.0, fill=0.0, skew=0.0)


def check(image: Image.Image, constraints: Constraints) -> Score:
    """Score one image against what its prompt states."""
    return score(constraints, analyze(image))


# ---------------------------------------------------------------------------------------------------
# Image -> Analysis


def analyze(image: Image.Image, extra_colors: dict[str, tuple[int, int, int]] | None = None) -> Analysis:
    """Background, lighting and the objects of a Shapes image of any size.

    `extra_colors` (name -> sRGB) adds colours outside the world's palette, for concepts a LoRA teaches
    (a "teal" object is then told apart from cyan and green instead of being called the nearest of them).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    height, width = rgb.shape[:2]
    names, chroma = _NAMES, _CHROMA
    if extra_colors:
        extra = np.array(list(extra_colors.values()), dtype=np.float32)
        names = _NAMES + tuple(extra_colors)
        chroma = np.concatenate([_CHROMA, _chroma(extra)])
    label, alpha = _unmix(rgb, chroma)  # (H, W) palette index, (H, W) its share of the pixel
    brightness = rgb.mean(axis=2)  # (H, W)
    grey = alpha < BACKGROUND_ALPHA
    background = _background(brightness, grey)
    lighting = _lighting(brightness, grey)
    objects = _objects(label, alpha, width, height, names)
    return Analysis(background, lighting, objects)


def _unmix(rgb: np.ndarray, palette_chroma: np.ndarray = _CHROMA) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette colour whose chroma best explains it, and how much of it there is."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)  # (N, 3); float32 halves the memory traffic
    chroma = _chroma(pixels)  # (N, 3)
    dots, norms = chroma @ palette_chroma.T, (palette_chroma**2).sum(axis=1)  # (N, K), (K,)
    alpha = np.clip(dots / norms, 0, None)  # (N, K) least-squares share of each colour, never negative
    residual = (chroma**2).sum(axis=1, keepdims=True) - 2 * alpha * dots + alpha**2 * norms  # |chroma - a c|^2
    best = residual.argmin(axis=1)  # (N,)
    shape = rgb.shape[:2]
    return best.reshape(shape), alpha[np.arange(len(best)), best].reshape(shape)


def _background(brightness: np.ndarray, grey: np.ndarray) -> str:
    """The grey level nearest to the brightest border pixels (light only ever dims a background)."""
    ring = np.zeros_like(grey)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    values = brightness[ring & grey] if (ring & grey).any() else brightness[ring]
    level = np.percentile(values, BORDER_PERCENTILE)
    return min(BACKGROUNDS, key=lambda name: abs(BACKGROUNDS[name] - level))


def _lighting(brightness: np.ndarray, grey: np.ndarray) -> str:
    """Side whose third of the background is brightest relative to the opposite third, or "none" if flat."""
    height, width = brightness.shape
    cols, rows = np.arange(width)[None, :], np.arange(height)[:, None]
    thirds = {
        "left": cols < width / 3,
        "right": cols >= 2 * width / 3,
        "top": rows < height / 3,
        "bottom": rows >= 2 * height / 3,
    }
    mean = {}
    for side, where in thirds.items():
        pick = np.broadcast_to(where, brightness.shape) & grey
        mean[side] = brightness[pick].mean() if pick.any() else 0.0
    best, contrast = "none", LIT_CONTRAST
    for side, opposite in (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top")):
        lit, far = mean[side], mean[opposite]
        if lit >= LIT_MIN_LEVEL and (lit - far) / lit >= contrast:
            best, contrast = side, (lit - far) / lit
    return best


def _objects(
    label: np.ndarray, alpha: np.ndarray, width: int, height: int, names: tuple[str, ...] = _NAMES
) -> tuple[Detected, ...]:
    """Connected components of each colour, specks dropped, classified; largest first.

    Components come from the thresholded mask, but their measures are soft: each pixel counts with its
    colour share alpha, fringe pixels (alpha < 0.5) of the same colour around the component included.
    A thresholded mask of a 10 px square loses corner and edge pixels that sit near 50% coverage,
    which pushed its fill ratio down to a circle's (0.87); soft measures are exact for a square.
    """
    comp = _components(np.where(alpha >= OBJECT_ALPHA, label, -1))
    side = min(width, height)
    ids, counts = np.unique(comp, return_counts=True)
    found = []
    for root, count in zip(ids, counts, strict=True):
        if root == comp.size or count < MIN_AREA * side**2:  # the background, or a speck
            continue
        rows, cols = np.nonzero(comp == root)
        color = label.flat[root]
        # the component's box grown by one pixel holds its fringe; objects are >= 2 px apart
        r0, r1 = max(rows.min() - 1, 0), min(rows.max() + 2, height)
        c0, c1 = max(cols.min() - 1, 0), min(cols.max() + 2, width)
        own = (comp[r0:r1, c0:c1] == root) | (comp[r0:r1, c0:c1] == comp.size)
        w = np.where(own & (label[r0:r1, c0:c1] == color), np.clip(alpha[r0:r1, c0:c1], 0, 1), 0.0)
        area = w.sum()
        # The box's sides as the longest vertical and horizontal chords (sums along a column / row): for
        # these three shapes those are the bounding box's sides, and sums keep sub-pixel precision.
        fill = area / (w.sum(axis=0).max() * w.sum(axis=1).max())
        ys = np.arange(r0, r1) + 0.5  # pixel centres
        mass_y = w.sum(axis=1) / area  # (rows,) vertical distribution
        my = ys @ mass_y
        skew = ((ys - my) ** 3 @ mass_y) / max((ys - my) ** 2 @ mass_y, 1e-9) ** 1.5
        shape = min(SHAPES, key=lambda s: (FILL[s] - fill) ** 2 + (SKEW[s] - skew) ** 2)
        across = math.sqrt(area / FILL[shape]) / side  # width of the ideal shape with this area
        size = min(SIZES, key=lambda s: abs(math.log(SIZES[s] / across)))
        x, y = (np.arange(c0, c1) + 0.5) @ w.sum(axis=0) / area / width, my / height
        cell = CELLS[3 * min(int(3 * y), 2) + min(int(3 * x), 2)]
        found.append(
            Detected(shape, names[color], size, cell, float(x), float(y), float(area), float(fill), float(skew))
        )
    return tuple(sorted(found, key=lambda d: -d.area))


def _components(label: np.ndarray) -> np.ndarray:
    """(H, W) component id per pixel (4-connected, same label); every background pixel shares one id.

    Each object pixel starts as its own id and repeatedly takes the smallest id among same-label
    neighbours, then jumps to the id its id holds (pointer jumping), until nothing changes: each id
    ends as the smallest pixel index of its component.
    """
    fg = label >= 0
    comp = np.where(fg, np.arange(label.size).reshape(label.shape), label.size)  # background id = size
    across = fg[:, 1:] & (label[:, 1:] == label[:, :-1])  # (H, W-1) pixel joins its left neighbour
    down = fg[1:] & (label[1:] == label[:-1])  # (H-1, W) pixel joins the one above
    flat = comp.ravel()
    while True:
        before = comp.copy()
        comp[:, 1:] = np.where(across, np.minimum(comp[:, 1:], comp[:, :-1]), comp[:, 1:])  # from the left
        comp[:, :-1] = np.where(across, np.minimum(comp[:, :-1], comp[:, 1:]), comp[:, :-1])  # from the right
        comp[1:] = np.where(down, np.minimum(comp[1:], comp[:-1]), comp[1:])  # from above
        comp[:-1] = np.where(down, np.minimum(comp[:-1], comp[1:]), comp[:-1])  # from below
        comp[fg] = flat[comp[fg]]  # pointer jumping
        if np.array_equal(comp, before):
            return comp


# ---------------------------------------------------------------------------------------------------
# Analysis + Constraints -> Score


def score(constraints: Constraints, analysis: Analysis) -> Score:
    """Match stated objects to detections (the assignment agreeing most), then test each stated attribute."""
    stated = constraints.objects
    found = analysis.objects[:MAX_MATCHED]
    match = best_match(constraints, found)
    got: dict[str, bool] = {}
    for field, attribute in OBJECT_FIELDS.items():
        wanted = [(k, getattr(spec, field)) for k, spec in enumerate(stated) if getattr(spec, field) is not None]
        if wanted:
            got[attribute] = all(match[k] is not None and getattr(found[match[k]], field) == v for k, v in wanted)
    got["count"] = len(analysis.objects) == len(stated)
    if constraints.relations:
        got["relation"] = all(_relation_holds(r, match, found) for r in constraints.relations)
    if constraints.background is not None:
        got["background"] = analysis.background == constraints.background
    if constraints.lighting is not None:
        got["lighting"] = analysis.lighting == constraints.lighting
    if constraints.absent:
        got["negation"] = not any(
            getattr(d, kind) == value for kind, value in constraints.absent for d in analysis.objects
        )
    attributes = {a: got[a] for a in ATTRIBUTES if a in got}
    return Score(correct=all(attributes.values()), attributes=attributes)


def best_match(constraints: Constraints, found: tuple[Detected, ...]) -> tuple[int | None, ...]:
    """For each stated object, a detection index (or None); brute force over all injective assignments."""
    stated = constraints.objects
    slots: list[int | None] = [*range(len(found)), *[None] * max(0, len(stated) - len(found))]
    best, best_agree = tuple([None] * len(stated)), -1
    for match in itertools.permutations(slots, len(stated)):  # fixed order: ties keep the first
        agree = sum(
            match[k] is not None and getattr(found[match[k]], field) == getattr(spec, field)
            for k, spec in enumerate(stated)
            for field in OBJECT_FIELDS
            if getattr(spec, field) is not None
        ) + sum(_relation_holds(r, match, found) for r in constraints.relations)
        if agree > best_agree:
            best, best_agree = match, agree
    return best


def _relation_holds(relation: tuple[int, str, int], match: tuple[int | None, ...], found: tuple[Detected, ...]) -> bool:
    i, word, j = relation
    if match[i] is None or match[j] is None:
        return False
    a, b = found[match[i]], found[match[j]]
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[word]
