"""Prompt upsampling for the Shapes world: read a prompt, plan a scene it allows, state everything.

FLUX.2 upsamples prompts with a language model (BFL's `upsample_prompt_mode`, the API's
`prompt_upsampling`): the model draws best from a prompt that leaves little open. The nano models have
no language model to spare, but their world has a grammar, so a planner does the same job exactly:
`parse` reads a Shapes prompt into its `Constraints`, `plan` draws a scene those constraints allow (every
attribute the prompt leaves free drawn at random, negations respected, relations kept at the level of grid
cells), and `upsample` writes that scene's caption with every object's size, colour, shape and cell. The
image is still scored against what the user wrote. A prompt outside the grammar is left as it is.

Pure numpy, like shapes.py and checker.py.
"""

from __future__ import annotations

import re

import numpy as np

from .checker import Analysis, as_detected, score
from .shapes import (
    BACKGROUNDS,
    CELL_PHRASES,
    CELLS,
    COLORS,
    LIGHTINGS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
    Constraints,
    ObjSpec,
    Scene,
    caption,
    place,
)

PLAN_TRIES = 200  # layout draws before a prompt counts as unplannable (a satisfiable one needs a few at most)
# The planned caption states every attribute, in plain words (hex codes are harder for the text encoder).
STATE_ALL = {"color": 1.0, "shape": 1.0, "size": 1.0, "cell": 1.0, "background": 1.0, "lighting": 1.0}
PLAIN = {**STATE_ALL, "coarse": 0.0, "hex": 0.0}

_COUNTS = {"a": 1, "an": 1} | {word: n for n, word in NUMBER_WORDS.items()}
_HEX = {code.lower(): name for name, code in COLORS.items()}
_COLOR = "|".join([*COLORS, r"#[0-9a-f]{6}"])
_CELL_OF = {phrase: cell for cell, phrases in CELL_PHRASES.items() for phrase in phrases}
_CELL = "|".join(re.escape(p) for p in sorted(_CELL_OF, key=len, reverse=True))
_OBJECT = re.compile(
    rf"(?P<count>{'|'.join(_COUNTS)}) (?:(?P<size>{'|'.join(SIZES)}) )?(?:(?P<color>{_COLOR}) )?"
    rf"(?P<noun>{'|'.join(SHAPES)}|shape|object)(?P<plural>s?)(?: (?P<cell>{_CELL}))?"
)
# longest first, so "to the right of" is not read as "right of"
_RELATION_OF = {phrase: rel for rel, phrases in RELATION_PHRASES.items() for phrase in phrases}
_RELATIONS = sorted(_RELATION_OF, key=len, reverse=True)
_GREYS = "|".join([*BACKGROUNDS, "grey"])
_BACKGROUND = re.compile(
    rf"(?: (?:on|against) a (?P<a>{_GREYS}) background|, (?P<b>{_GREYS}) background| on (?P<c>{_GREYS}))$"
)
_LIGHTS = "|".join(d for d in LIGHTINGS if d != "none")
_LIGHTING = re.compile(rf"(?:,? lit|, light|, with light coming) from the (?P<side>{_LIGHTS})$")
_NEGATION = re.compile(r"\b(?:no|nothing)\b")
_NEGATION_JOIN = re.compile(r"(?:, but|,| and| with)$")
_ABSENT = re.compile(
    rf"no (?P<color>{_COLOR}) (?:shapes|objects)|nothing (?P<color2>{_COLOR})|no (?P<shape>{'|'.join(SHAPES)})s"
)
_PART_SPLIT = re.compile(r",? and |, ")


def parse(prompt: str) -> Constraints | None:
    """The constraints a Shapes-world prompt states, or None when any part of it is outside the grammar
    the world's captions use (case, spacing and a final full stop do not matter)."""
    text = " ".join(prompt.lower().split()).removesuffix(".")
    lighting = background = None
    if m := _LIGHTING.search(text):
        lighting, text = m["side"], text[: m.start()]
    if m := _BACKGROUND.search(text):
        name = m["a"] or m["b"] or m["c"]
        background, text = "gray" if name == "grey" else name, text[: m.start()]
    absent: list[tuple[str, str]] = []
    if m := _NEGATION.search(text):
        for item in text[m.start() :].split(" and "):
            if not (a := _ABSENT.fullmatch(item)):
                return None
            absent.append(("shape", a["shape"]) if a["shape"] else ("color", _color(a["color"] or a["color2"])))
        text = _NEGATION_JOIN.sub("", text[: m.start()].rstrip())
    objects: list[ObjSpec] = []
    relations: list[tuple[int, str, int]] = []
    for part in _PART_SPLIT.split(text):
        if (pair := _relation(part)) is not None:
            relations.append((len(objects), pair[1], len(objects) + 1))
            objects += [pair[0], pair[2]]
        elif (group := _group(part)) is not None:
            objects += group
        else:
            return None
    if not 1 <= len(objects) <= MAX_OBJECTS:
        return None
    return Constraints(tuple(objects), background, lighting, tuple(relations), tuple(absent))


def _color(word: str | None) -> str | None:
    return _HEX.get(word, word) if word else None


def _group(text: str) -> list[ObjSpec] | None:
    """'two large red circles in the top left' -> that many specs; None if it is no object phrase."""
    if not (m := _OBJECT.fullmatch(text)):
        return None
    count = _COUNTS[m["count"]]
    if (count > 1) != bool(m["plural"]):
        return None
    shape = m["noun"] if m["noun"] in SHAPES else None
    cell = _CELL_OF[m["cell"]] if m["cell"] else None
    return [ObjSpec(shape, _color(m["color"]), m["size"], cell)] * count


def _relation(text: str) -> tuple[ObjSpec, str, ObjSpec] | None:
    """'a red circle to the left of a blue square' -> (red circle, 'left of', blue square), else None."""
    for phrase in _RELATIONS:
        left, found, right = text.partition(f" {phrase} ")
        if found:
            a, b = _group(left), _group(right)
            return (a[0], _RELATION_OF[phrase], b[0]) if a and b and len(a) == len(b) == 1 else None
    return None


def plan(constraints: Constraints, rng: np.random.Generator) -> Scene | None:
    """A scene that `constraints` allow, every free attribute drawn at random; None when none exists
    (a stated colour or shape that a negation forbids, two objects in one cell, lighting on black)
    or PLAN_TRIES layouts fail. Relations are kept by the cells (a different column for left / right, a
    different row for above / below), so they hold wherever inside its cell an object is drawn."""
    no_colors = {v for kind, v in constraints.absent if kind == "color"}
    no_shapes = {v for kind, v in constraints.absent if kind == "shape"}
    colors = [c for c in COLORS if c not in no_colors]
    shapes = [s for s in SHAPES if s not in no_shapes]
    specs = constraints.objects
    stated_cells = [s.cell for s in specs if s.cell]
    lit = constraints.lighting not in (None, "none")
    if (any(s.color in no_colors or s.shape in no_shapes for s in specs) or not colors or not shapes
            or len(set(stated_cells)) < len(stated_cells) or (lit and constraints.background == "black")):  # fmt: skip
        return None
    background = constraints.background or _pick(rng, [b for b in BACKGROUNDS if not (lit and b == "black")])
    lighting = constraints.lighting or "none"
    for _ in range(PLAN_TRIES):
        free = [c for c in CELLS if c not in stated_cells]
        rng.shuffle(free)
        cells = [s.cell or free.pop() for s in specs]
        if not all(_cells_hold(cells[i], word, cells[j]) for i, word, j in constraints.relations):
            continue
        kinds = [(s.shape or _pick(rng, shapes), s.color or _pick(rng, colors), s.size or _pick(rng, list(SIZES)), c)
                 for s, c in zip(specs, cells, strict=True)]  # fmt: skip
        objects = place(rng, kinds)
        if objects and score(constraints, Analysis(background, lighting, tuple(map(as_detected, objects)))).correct:
            return Scene(background, lighting, objects)
    return None


def _cells_hold(a: str, word: str, b: str) -> bool:
    (row_a, col_a), (row_b, col_b) = divmod(CELLS.index(a), 3), divmod(CELLS.index(b), 3)
    return {"left of": col_a < col_b, "right of": col_a > col_b, "above": row_a < row_b, "below": row_a > row_b}[word]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def upsample(prompt: str, seed: int) -> str:
    """The prompt with every attribute it leaves free stated, from a scene planned with `seed` (the same
    prompt and seed give the same text); a prompt outside the grammar or with no possible scene as it is."""
    constraints = parse(prompt)
    if constraints is None:
        return prompt
    rng = np.random.default_rng(seed)
    scene = plan(constraints, rng)
    return prompt if scene is None else caption(scene, rng, "plain", PLAIN)[0]
