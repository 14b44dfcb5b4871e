"""The Shapes world (NANO.md): scenes of 1-4 flat shapes, their renders, true captions and the eval prompt set.

Pure numpy + PIL. Every number of the world lives in the first section; the checker imports them so
that drawing and measuring agree. This module knows nothing about models, tensors or how an image is
scored: a caption's meaning is its `Constraints`, which `checker.py` tests against an image.

Coordinates: an object's centre `x, y` is a fraction of the canvas width / height (y grows downward),
and it is the shape's area centroid (for a triangle that is 2/3 of the way down from the apex), so the
centroid a checker measures is exactly the stored centre. Sizes are fractions of min(width, height),
so circles stay round on any aspect ratio.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------------
# The world's numbers (NANO.md "The Shapes world")

COLORS: dict[str, str] = {
    "red": "#E6194B",
    "green": "#3CB44B",
    "blue": "#4363D8",
    "yellow": "#FFE119",
    "orange": "#F58231",
    "purple": "#911EB4",
    "cyan": "#42D4F4",
    "pink": "#F032E6",
}
RGB: dict[str, tuple[int, int, int]] = {
    name: tuple(int(h[i : i + 2], 16) for i in (1, 3, 5)) for name, h in COLORS.items()
}
SHAPES = ("circle", "square", "triangle")  # square axis aligned, triangle equilateral pointing up
SIZES: dict[str, float] = {"small": 0.16, "large": 0.32}  # width across, fraction of min(width, height)
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Grey levels. Backgrounds are achromatic and every palette colour is >= 92 RGB units from the grey axis
# (green is closest), so no background, lit or not, is near a palette colour.
BACKGROUNDS: dict[str, int] = {"white": 255, "gray": 128, "black": 0}
LIGHTINGS = ("none", "left", "right", "top", "bottom")  # "left" = lit from the left
LIGHT_FLOOR = 0.6  # a lit background falls off linearly from full brightness to this fraction
RELATIONS = ("left of", "right of", "above", "below")  # compare centre x (left/right) or y (above/below)
MAX_OBJECTS = 4

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 256, 16  # the embedded model's sizes (NANO.md "Model")
SUPERSAMPLE = 4  # anti-aliasing: coverage of a 4x4 grid of samples per pixel (a 4x box downsample)

# Layout margins as fractions of the canvas side; 1/32 is 2 px at the smallest side (64), so there is
# always at least one clean background pixel between two objects and around the border.
GAP = 1 / 32  # between the boxes of any two objects
EDGE_MARGIN = 1 / 32  # between a box and the canvas border
CELL_MARGIN = 0.03  # a centre keeps this far from its cell's borders (about 2 px at 64), so it is unambiguous
RELATION_MARGIN = 0.05  # a caption states a relation only when the centres differ by this much
PLACE_TRIES = 20  # jitter draws per set of cells before the cells are redrawn

# Captions: how often each attribute is stated (the rest is free), and other phrasing odds.
P_STATE = {"color": 0.85, "shape": 0.85, "size": 0.5, "cell": 0.5, "background": 0.75, "lighting": 0.8}
P_COARSE = 0.2  # whole caption states one kind of attribute ("two squares and a circle") or only counts
P_HEX = 0.15  # a colour is written as its hex code ("a #4363D8 triangle")
P_ONE = 0.1  # "one red circle" rather than "a red circle"
P_RELATION = 0.25  # in "random" mode, when the scene has two or more objects
P_NEGATION = 0.2  # in "random" mode
P_TWO = 0.35  # two relation clauses (four objects) / two negations rather than one
# all-MiniLM-L6-v2 reads 64 word pieces; [CLS] and [SEP] take two. Measured with its tokenizer, every
# word captions use is one piece except "cyan" (2) and the hex codes (4 to 6 pieces).
MAX_CAPTION_TOKENS = 60
MAX_CAPTION_WORDS = 44  # NANO brief: captions stay under 45 words
HEX_EXTRA_TOKENS = 5
CAPTION_MODES = ("random", "plain", "relation", "negation")


# ---------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Obj:
    """One filled shape; `x, y` is its area centroid as a fraction of width / height, inside `cell`."""

    shape: str
    color: str
    size: str
    cell: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """A background (a BACKGROUNDS name), its lighting (one of LIGHTINGS) and 1-4 objects."""

    background: str
    lighting: str
    objects: tuple[Obj, ...]


def box(obj: Obj, width: float = 1.0, height: float = 1.0) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the object on a width x height canvas, in the same units.

    The default 1 x 1 gives fractions of a square canvas, the largest the box can be: on any other aspect
    ratio the side shrinks (it is relative to the shorter side) toward the centre, so a square-canvas
    layout that keeps gaps and margins keeps them everywhere.
    """
    d = SIZES[obj.size] * min(width, height)
    cx, cy = obj.x * width, obj.y * height
    if obj.shape == "triangle":
        h = d * math.sqrt(3) / 2  # the centroid sits 2/3 of the height below the apex
        return cx - d / 2, cy - 2 * h / 3, cx + d / 2, cy + h / 3
    return cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: 1-4 objects in distinct cells, boxes at least GAP apart and inside the canvas.

    A black background is never lit: dimming black leaves it black, so the light could not be seen.
    """
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects {n_objects} is outside the supported range 1..{MAX_OBJECTS}")
    background = _pick(rng, tuple(BACKGROUNDS))
    lighting = "none" if background == "black" else _pick(rng, LIGHTINGS)
    while True:  # some draws cannot be placed (three large shapes in one row); draw again
        cells = [CELLS[int(k)] for k in rng.choice(len(CELLS), size=n_objects, replace=False)]
        kinds = [(_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, tuple(SIZES)), cell) for cell in cells]
        objects = place(rng, kinds)
        if objects:
            return Scene(background, lighting, objects)


def with_object_added(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """`scene` with one more random object in a free cell, apart from the others; None when it is full
    (MAX_OBJECTS) or no draw fits."""
    if len(scene.objects) >= MAX_OBJECTS:
        return None
    taken = {o.cell for o in scene.objects}
    free = [c for c in CELLS if c not in taken]
    for _ in range(PLACE_TRIES):
        kind = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, tuple(SIZES)), _pick(rng, tuple(free)))
        new = place(rng, [kind])[0]  # one object always fits its cell
        if all(_apart(box(new), box(o)) for o in scene.objects):
            return dataclasses.replace(scene, objects=(*scene.objects, new))
    return None


def place(rng: np.random.Generator, kinds: list[tuple[str, str, str, str]]) -> tuple[Obj, ...] | None:
    """Jitter each centre inside its cell until no two boxes come within GAP; None if that fails."""
    for _ in range(PLACE_TRIES):
        objects = []
        for shape, color, size, cell in kinds:
            row, col = divmod(CELLS.index(cell), 3)
            probe = box(Obj(shape, color, size, cell, 0.0, 0.0))  # box offsets around a centre at 0
            x = _uniform(rng, col / 3 + CELL_MARGIN, (col + 1) / 3 - CELL_MARGIN, probe[0], probe[2])
            y = _uniform(rng, row / 3 + CELL_MARGIN, (row + 1) / 3 - CELL_MARGIN, probe[1], probe[3])
            objects.append(Obj(shape, color, size, cell, x, y))
        boxes = [box(o) for o in objects]
        if all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return tuple(objects)
    return None


def _uniform(rng: np.random.Generator, lo: float, hi: float, before: float, after: float) -> float:
    """A centre in [lo, hi] whose box (offsets `before` < 0 < `after`) stays EDGE_MARGIN inside [0, 1]."""
    lo, hi = max(lo, EDGE_MARGIN - before), min(hi, 1 - EDGE_MARGIN - after)
    return float(rng.uniform(lo, hi))  # every size fits every cell, so lo < hi


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Boxes are separated by at least GAP along x or along y."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------------
# Rendering


def check_size(width: int, height: int) -> None:
    """Raise a ValueError naming the bad side and the allowed range."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_MULTIPLE:
            raise ValueError(
                f"{name} {value!r} is not supported: use a multiple of {SIDE_MULTIPLE} in {MIN_SIDE}..{MAX_SIDE}"
            )


def render(scene: Scene, width: int = 128, height: int = 128) -> Image.Image:
    """The scene as an RGB image; interiors are exactly the palette colour, edges anti-aliased."""
    check_size(width, height)
    canvas = _background(scene.background, scene.lighting, width, height)  # (H, W, 3) float
    for obj in scene.objects:
        alpha = _coverage(obj, width, height)[..., None]  # (H, W, 1) fraction of the pixel covered
        canvas = alpha * np.array(RGB[obj.color], dtype=np.float64) + (1 - alpha) * canvas
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


def _background(background: str, lighting: str, width: int, height: int) -> np.ndarray:
    """(H, W, 3) grey canvas; when lit, brightness falls linearly from the lit side to LIGHT_FLOOR."""
    level = np.full((height, width), float(BACKGROUNDS[background]))
    if lighting != "none":
        along = width if lighting in ("left", "right") else height
        t = (np.arange(along) + 0.5) / along  # distance from the left / top edge, pixel centres
        if lighting in ("right", "bottom"):
            t = 1 - t
        falloff = 1 - (1 - LIGHT_FLOOR) * t
        level *= falloff[None, :] if lighting in ("left", "right") else falloff[:, None]
    return np.repeat(level[..., None], 3, axis=2)


def _coverage(obj: Obj, width: int, height: int) -> np.ndarray:
    """(H, W) fraction of each pixel inside the shape, from SUPERSAMPLE^2 samples per pixel."""
    x0, y0, x1, y1 = box(obj, width, height)
    # only the pixels the box touches need samples
    c0, c1 = max(math.floor(x0), 0), min(math.ceil(x1), width)
    r0, r1 = max(math.floor(y0), 0), min(math.ceil(y1), height)
    s = SUPERSAMPLE
    xs = c0 + (np.arange((c1 - c0) * s) + 0.5) / s  # sample positions in pixels
    ys = r0 + (np.arange((r1 - r0) * s) + 0.5) / s
    dx = xs[None, :] - obj.x * width
    dy = ys[:, None] - obj.y * height
    d = SIZES[obj.size] * min(width, height)
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= (d / 2) ** 2
    elif obj.shape == "square":
        inside = (np.abs(dx) <= d / 2) & (np.abs(dy) <= d / 2)
    else:  # apex 2h/3 above the centroid, base h/3 below; half-width grows by 1/sqrt(3) per unit of depth
        h = d * math.sqrt(3) / 2
        depth = dy + 2 * h / 3
        inside = (dy <= h / 3) & (np.abs(dx) <= depth / math.sqrt(3))
    cover = np.zeros((height, width))
    cover[r0:r1, c0:c1] = inside.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
    return cover


# ---------------------------------------------------------------------------------------------------
# Captions: what a caption states (Constraints) and how it is phrased


@dataclass(frozen=True)
class ObjSpec:
    """What a caption says about one object; None = unstated (free)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    cell: str | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("cell", CELLS)):
            _check_value(name, getattr(self, name), allowed)


@dataclass(frozen=True)
class Constraints:
    """Exactly what a caption states. `objects` is complete (counts are exact); None = unstated.

    `lighting` is one of LIGHTINGS; captions state it only for lit scenes, so "none" appears only in
    hand-made constraints. `relations` are (object index, relation, object index); `absent` holds
    ("color", name) or ("shape", name): no object has that colour / shape.
    """

    objects: tuple[ObjSpec, ...]
    background: str | None = None
    lighting: str | None = None
    relations: tuple[tuple[int, str, int], ...] = ()
    absent: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _check_value("background", self.background, BACKGROUNDS)
        _check_value("lighting", self.lighting, LIGHTINGS)
        for i, relation, j in self.relations:
            _check_value("relation", relation, RELATIONS)
            for k in (i, j):
                if not 0 <= k < len(self.objects):
                    raise ValueError(f"relation index {k} is outside 0..{len(self.objects) - 1}")
        for kind, value in self.absent:
            _check_value("absent kind", kind, ("color", "shape"))
            _check_value(f"absent {kind}", value, COLORS if kind == "color" else SHAPES)


def _check_value(name: str, value: str | None, allowed: Collection[str]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")


NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
CELL_PHRASES = {
    "top left": ("in the top left", "at the top left", "in the top left corner"),
    "top": ("at the top", "in the top middle"),
    "top right": ("in the top right", "at the top right", "in the top right corner"),
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the bottom right corner"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
BACKGROUND_PHRASES = (" on a {} background", " against a {} background", ", {} background", " on {}")
LIGHTING_PHRASES = (", lit from the {}", " lit from the {}", ", light from the {}", ", with light coming from the {}")
NEGATION_JOINS = (", ", " and ", ", but ", " with ")
ABSENT_COLOR_PHRASES = ("no {} shapes", "no {} objects", "nothing {}")


def caption(
    scene: Scene, rng: np.random.Generator, mode: str = "random", p_state: dict[str, float] | None = None
) -> tuple[str, Constraints]:
    """A varied caption that is true of `scene`, and the constraints it states.

    mode: "plain" (objects, background, lighting), "relation" (also one or two "A left of B" clauses;
    needs two objects), "negation" (also "no red shapes" / "no triangles"), or "random" (either, both
    or neither). Captions over MAX_CAPTION_TOKENS or MAX_CAPTION_WORDS are redrawn stating less.
    `p_state` overrides entries of P_STATE (how often each attribute is stated), e.g. for a curriculum,
    "coarse" overrides P_COARSE and "hex" P_HEX.
    """
    if mode not in CAPTION_MODES:
        raise ValueError(f"caption mode {mode!r} is not one of {', '.join(CAPTION_MODES)}")
    n = len(scene.objects)
    if mode == "relation" and n < 2:
        raise ValueError(f"a relation caption needs 2..{MAX_OBJECTS} objects, the scene has {n}")
    with_relation = mode == "relation" or (mode == "random" and n >= 2 and rng.random() < P_RELATION)
    with_negation = mode == "negation" or (mode == "random" and rng.random() < P_NEGATION)
    relations = _relations(scene, rng) if with_relation else []
    absent = _absent(scene, rng) if with_negation else []
    shrink = 1.0
    while True:
        text, constraints = _compose(scene, relations, absent, rng, shrink, p_state or {})
        if caption_tokens(text) <= MAX_CAPTION_TOKENS and len(text.split()) <= MAX_CAPTION_WORDS:
            return text, constraints
        shrink *= 0.7  # state less on the next try; with nothing stated, every caption fits


def caption_tokens(text: str) -> int:
    """Word pieces of a caption, at most: one per word or comma, two for "cyan", six per hex code."""
    return len(re.findall(r"[\w#]+|,", text)) + HEX_EXTRA_TOKENS * text.count("#") + text.count("cyan")


def _relations(scene: Scene, rng: np.random.Generator) -> list[tuple[int, str, int]]:
    """One relation between two objects (two disjoint ones for four objects, sometimes), on scene indices."""
    free = list(range(len(scene.objects)))
    out = []
    for _ in range(2 if len(free) == 4 and rng.random() < P_TWO else 1):
        i, j = (free[int(k)] for k in rng.choice(len(free), size=2, replace=False))
        a, b = scene.objects[i], scene.objects[j]
        # distinct cells differ by >= 2 * CELL_MARGIN > RELATION_MARGIN along x or y, so one axis is clear
        axes = [ax for ax, d in (("x", b.x - a.x), ("y", b.y - a.y)) if abs(d) >= RELATION_MARGIN]
        if _pick(rng, tuple(axes)) == "x":
            out.append((i, "left of" if a.x < b.x else "right of", j))
        else:
            out.append((i, "above" if a.y < b.y else "below", j))
        free = [k for k in free if k not in (i, j)]
    return out


def _absent(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """One or two colours / shapes that no object of the scene has."""
    colors = [c for c in COLORS if c not in {o.color for o in scene.objects}]  # at least 4 of 8
    shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
    out: list[tuple[str, str]] = []
    for _ in range(2 if rng.random() < P_TWO else 1):
        if shapes and rng.random() < 0.4:
            out.append(("shape", shapes.pop(int(rng.integers(len(shapes))))))
        else:
            out.append(("color", colors.pop(int(rng.integers(len(colors))))))
    return out


def _compose(
    scene: Scene,
    relations: list[tuple[int, str, int]],
    absent: list[tuple[str, str]],
    rng: np.random.Generator,
    shrink: float,
    p_state: dict[str, float],
) -> tuple[str, Constraints]:
    """Phrase the scene: relation clauses first, then the other objects grouped into counts."""
    p = {k: p_state.get(k, v) * shrink for k, v in P_STATE.items()}  # p_state's "coarse" is read below
    p_hex = p_state.get("hex", P_HEX) if shrink == 1.0 else 0.0
    coarse = _pick(rng, ("shape", "color", "count")) if rng.random() < p_state.get("coarse", P_COARSE) else None
    specs = [_state(obj, rng, p, coarse) for obj in scene.objects]
    related = {k for i, _, j in relations for k in (i, j)}
    for k in related:  # the relation places these two; a cell as well reads clumsily
        specs[k] = ObjSpec(specs[k].shape, specs[k].color, specs[k].size, None)

    order: list[int] = []  # scene index of each stated object, in caption order
    parts: list[str] = []
    stated_relations = []
    for i, relation, j in relations:
        stated_relations.append((len(order), relation, len(order) + 1))
        order += [i, j]
        words = _pick(rng, RELATION_PHRASES[relation])
        parts.append(f"{_phrase(specs[i], 1, rng, p_hex)} {words} {_phrase(specs[j], 1, rng, p_hex)}")
    groups: dict[ObjSpec, list[int]] = {}  # identical statements become one counted phrase
    for k in range(len(specs)):
        if k not in related:
            groups.setdefault(specs[k], []).append(k)
    for spec, members in groups.items():
        order += members
        parts.append(_phrase(spec, len(members), rng, p_hex))
    text = _join(parts, rng)

    if absent:
        said = [
            _pick(rng, ABSENT_COLOR_PHRASES).format(value) if kind == "color" else f"no {value}s"
            for kind, value in absent
        ]
        text += _pick(rng, NEGATION_JOINS) + " and ".join(said)
    background = scene.background if rng.random() < p["background"] else None
    if background:
        name = "grey" if background == "gray" and rng.random() < 0.3 else background
        text += _pick(rng, BACKGROUND_PHRASES).format(name)
    lighting = scene.lighting if scene.lighting != "none" and rng.random() < p["lighting"] else None
    if lighting:
        text += _pick(rng, LIGHTING_PHRASES).format(lighting)
    constraints = Constraints(
        objects=tuple(specs[k] for k in order),
        background=background,
        lighting=lighting,
        relations=tuple(stated_relations),
        absent=tuple(absent),
    )
    return text, constraints


def _state(obj: Obj, rng: np.random.Generator, p: dict[str, float], coarse: str | None) -> ObjSpec:
    """Which of the object's attributes the caption states."""
    if coarse:
        return ObjSpec(shape=obj.shape if coarse == "shape" else None, color=obj.color if coarse == "color" else None)
    said = {k: getattr(obj, k) if rng.random() < p[k] else None for k in ("shape", "color", "size", "cell")}
    return ObjSpec(**said)


def _phrase(spec: ObjSpec, count: int, rng: np.random.Generator, p_hex: float) -> str:
    """'a large #4363D8 triangle in the center', 'three green triangles', 'two shapes'."""
    words = []
    if spec.size:
        words.append(spec.size)
    if spec.color:
        words.append(COLORS[spec.color] if rng.random() < p_hex else spec.color)
    noun = spec.shape or _pick(rng, ("shape", "object"))
    words.append(noun + "s" if count > 1 else noun)
    if count > 1:
        article = NUMBER_WORDS[count]
    elif rng.random() < P_ONE:
        article = "one"
    else:
        article = "an" if words[0][0] in "aeiou" else "a"
    text = " ".join([article, *words])
    return f"{text} {_pick(rng, CELL_PHRASES[spec.cell])}" if spec.cell else text


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    comma = "," if len(parts) > 2 and rng.random() < 0.5 else ""  # the Oxford comma, sometimes
    return ", ".join(parts[:-1]) + f"{comma} and {parts[-1]}"


def sample(rng: np.random.Generator, width: int = 128, height: int = 128) -> tuple[Image.Image, str, Constraints]:
    """A random scene's render, a caption of it and what that caption states."""
    scene = sample_scene(rng)
    text, constraints = caption(scene, rng)
    return render(scene, width, height), text, constraints


# ---------------------------------------------------------------------------------------------------
# The fixed evaluation prompt set (NANO.md "Measuring prompt adherence")

# category -> (object counts cycled through, caption mode)
EVAL_CATEGORIES: dict[str, tuple[tuple[int, ...], str]] = {
    "one_two": ((1, 2), "plain"),
    "three_four": ((3, 4), "plain"),
    "relation": ((2, 3, 4), "relation"),
    "negation": ((1, 2, 3, 4), "negation"),
}
EVAL_PER_CATEGORY = 64
EVAL_TOP_UP_TRIES = 10_000  # extra draws allowed to cover every feature; seeds 0-9 needed at most one


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the fixed eval set; category is one of EVAL_CATEGORIES."""

    text: str
    constraints: Constraints
    category: str
    scene: Scene  # the scene the caption was written for: proof that the prompt is satisfiable


def eval_prompts(seed: int = 0) -> list[EvalPrompt]:
    """EVAL_PER_CATEGORY prompts per category, topped up until every feature (`eval_features`) appears."""
    rng = np.random.default_rng(seed)
    prompts = []
    for category in EVAL_CATEGORIES:
        prompts += [_eval_prompt(rng, category, k) for k in range(EVAL_PER_CATEGORY)]
    missing = eval_features() - set().union(*(prompt_features(p) for p in prompts))
    for k in range(EVAL_TOP_UP_TRIES):
        if not missing:
            return prompts
        extra = _eval_prompt(rng, tuple(EVAL_CATEGORIES)[k % len(EVAL_CATEGORIES)], k)
        if prompt_features(extra) & missing:
            prompts.append(extra)
            missing -= prompt_features(extra)
    raise RuntimeError(f"eval prompts for seed {seed} miss features {sorted(missing)}")


def _eval_prompt(rng: np.random.Generator, category: str, k: int) -> EvalPrompt:
    counts, mode = EVAL_CATEGORIES[category]
    scene = sample_scene(rng, counts[k % len(counts)])
    text, constraints = caption(scene, rng, mode)
    return EvalPrompt(text, constraints, category, scene)


def eval_features() -> set[str]:
    """Everything the eval set must exercise, as 'kind:value' strings."""
    return (
        {f"color:{c}" for c in COLORS}
        | {f"hex:{c}" for c in COLORS}
        | {f"shape:{s}" for s in SHAPES}
        | {f"size:{s}" for s in SIZES}
        | {f"cell:{c}" for c in CELLS}
        | {f"background:{b}" for b in BACKGROUNDS}
        | {f"lighting:{d}" for d in LIGHTINGS if d != "none"}  # an unlit scene's lighting is left unstated
        | {f"count:{n}" for n in (2, 3, 4)}
        | {f"relation:{r}" for r in RELATIONS}
        | {"negation:color", "negation:shape"}
    )


def prompt_features(prompt: EvalPrompt) -> set[str]:
    """The features one prompt states (hex codes and counts are read from its text)."""
    c = prompt.constraints
    out = {f"{k}:{getattr(o, k)}" for o in c.objects for k in ("color", "shape", "size", "cell") if getattr(o, k)}
    out |= {f"hex:{name}" for name, code in COLORS.items() if code in prompt.text}
    out |= {f"count:{n}" for n, word in NUMBER_WORDS.items() if n > 1 and re.search(rf"\b{word}\b", prompt.text)}
    out |= {f"relation:{r}" for _, r, _ in c.relations} | {f"negation:{kind}" for kind, _ in c.absent}
    if c.background:
        out.add(f"background:{c.background}")
    if c.lighting:
        out.add(f"lighting:{c.lighting}")
    return out
