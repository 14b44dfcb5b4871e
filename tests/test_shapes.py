"""Shapes world and its checker: true captions score 100% on renders, deliberate mistakes are caught,
layouts never overlap, sizes are validated, and the eval prompt set is fixed, complete and satisfiable."""

import dataclasses
import itertools
import math
import re

import numpy as np
import pytest

from flux2studio.nano.checker import analyze, check, score
from flux2studio.nano.shapes import (
    BACKGROUNDS,
    CELLS,
    COLORS,
    EVAL_CATEGORIES,
    LIGHTINGS,
    MAX_CAPTION_TOKENS,
    RELATIONS,
    RGB,
    SHAPES,
    SIZES,
    Constraints,
    ObjSpec,
    Scene,
    box,
    caption,
    caption_tokens,
    eval_prompts,
    render,
    sample,
    sample_scene,
)


def everything(scene: Scene, **changes) -> Constraints:
    """Constraints stating every attribute of every object, the background and the lighting ("none" too)."""
    objects = tuple(ObjSpec(o.shape, o.color, o.size, o.cell) for o in scene.objects)
    return dataclasses.replace(Constraints(objects, scene.background, scene.lighting), **changes)


def failed(s) -> set[str]:
    return {name for name, good in s.attributes.items() if not good}


# (a) ground truth scores 100% -------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height", "n"), [(128, 128, 300), (64, 64, 60), (96, 160, 40), (256, 256, 12)])
def test_renders_satisfy_their_captions(width, height, n):
    rng = np.random.default_rng(width * 1000 + height)
    for _ in range(n):
        scene = sample_scene(rng)
        text, constraints = caption(scene, rng)
        assert len(text.split()) < 45 and caption_tokens(text) <= MAX_CAPTION_TOKENS, text
        analysis = analyze(render(scene, width, height))
        for stated in (constraints, everything(scene)):
            s = score(stated, analysis)
            assert s.correct, (text, stated, s, analysis, scene)


def test_sample_gives_a_true_caption():
    rng = np.random.default_rng(1)
    for _ in range(30):
        image, text, constraints = sample(rng, 112, 80)
        assert image.size == (112, 80) and image.mode == "RGB"
        assert check(image, constraints).correct, text


def test_caption_phrasing_covers_the_spec():
    rng = np.random.default_rng(2)
    texts = " | ".join(caption(sample_scene(rng), rng)[0] for _ in range(400))
    for phrase in ("three", "#", "to the left of", "no ", "background", "lit from the", "in the center"):
        assert phrase in texts, phrase


def test_interiors_are_exact_palette_colours_and_light_falls_to_sixty_percent():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, 4)
    pixels = np.asarray(render(scene, 128, 128))
    for o in scene.objects:
        # a point well inside every shape: a bit below the centroid, on the axis
        assert tuple(pixels[int(o.y * 128 + 1), int(o.x * 128)]) == RGB[o.color], o
    lit = np.asarray(render(Scene("white", "left", ()), 64, 64)).astype(int)
    assert lit[32, 0, 0] >= 253 and abs(lit[32, -1, 0] - 0.6 * 255) <= 2 and (lit[:, :, 0] == lit[:, :, 1]).all()
    # no background grey, at any brightness, comes near a palette colour
    grey_axis = np.ones(3) / math.sqrt(3)
    for name, rgb in RGB.items():
        v = np.array(rgb, dtype=float)
        assert np.linalg.norm(v - (v @ grey_axis) * grey_axis) > 90, name


# (b) deliberate mistakes are caught -----------------------------------------------------------


def mirrored(scene: Scene) -> Scene:
    def flip(o):
        row, col = divmod(CELLS.index(o.cell), 3)
        return dataclasses.replace(o, x=1 - o.x, cell=CELLS[3 * row + 2 - col])

    return dataclasses.replace(scene, objects=tuple(flip(o) for o in scene.objects))


def left_right_pair(scene: Scene) -> tuple[int, int] | None:
    """Indices (i, j) of objects in different columns, i to the left of j."""
    for i, j in itertools.permutations(range(len(scene.objects)), 2):
        a, b = scene.objects[i], scene.objects[j]
        if CELLS.index(a.cell) % 3 < CELLS.index(b.cell) % 3:
            return i, j
    return None


def judge(shown: Scene, stated: Constraints) -> set[str]:
    """Attributes that fail when `shown` is checked against `stated`, which must not be correct."""
    s = check(render(shown, 128, 128), stated)
    assert not s.correct
    return failed(s)


def first_becomes(scene: Scene, **change) -> Scene:
    objs = scene.objects
    return dataclasses.replace(scene, objects=(dataclasses.replace(objs[0], **change), *objs[1:]))


def test_mistakes_fail_the_right_attribute():
    rng = np.random.default_rng(4)
    for _ in range(12):
        scene = sample_scene(rng, 3)
        while left_right_pair(scene) is None:  # mirroring must move something
            scene = sample_scene(rng, 3)
        objs, truth = scene.objects, everything(scene)

        other_color = next(c for c in COLORS if c not in {o.color for o in objs})
        assert judge(first_becomes(scene, color=other_color), truth) == {"color"}
        swap = {"circle": "square", "square": "circle", "triangle": None}[objs[0].shape]  # same box
        if swap:
            assert judge(first_becomes(scene, shape=swap), truth) == {"shape"}
        large = [k for k, o in enumerate(objs) if o.size == "large"]  # shrinking keeps every gap
        if large:
            smaller = [dataclasses.replace(o, size="small") if k == large[0] else o for k, o in enumerate(objs)]
            assert judge(dataclasses.replace(scene, objects=tuple(smaller)), truth) == {"size"}
        assert "count" in judge(dataclasses.replace(scene, objects=objs[1:]), truth)  # an object removed
        assert judge(scene, dataclasses.replace(truth, objects=truth.objects[1:])) == {"count"}  # one added

        # the other side: positions and a left/right relation both break, nothing else
        i, j = left_right_pair(scene)
        related = dataclasses.replace(truth, relations=((i, "left of", j),))
        assert judge(mirrored(scene), related) == {"position", "relation"}

        bg = next(b for b in BACKGROUNDS if b not in (scene.background, "black"))
        unlit = dataclasses.replace(truth, lighting=None)
        assert judge(dataclasses.replace(scene, background=bg), unlit) == {"background"}
        lit = dataclasses.replace(scene, background="white", lighting="left")
        assert judge(dataclasses.replace(lit, lighting="top"), everything(lit)) == {"lighting"}
        for kind in ("color", "shape"):
            present = dataclasses.replace(truth, absent=((kind, getattr(objs[0], kind)),))
            assert judge(scene, present) == {"negation"}


def test_matching_uses_the_best_assignment():
    # Two red circles, the right one larger, so it is detected first: only the assignment that maps the
    # first stated circle to the second detection makes "circle 0 left of circle 1" hold.
    rng = np.random.default_rng(5)
    while True:
        scene = sample_scene(rng, 2)
        pair = left_right_pair(scene)
        if pair and scene.objects[pair[1]].size == "large":
            break
    i, j = pair
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(objs[i], color="red", shape="circle", size="small")
    objs[j] = dataclasses.replace(objs[j], color="red", shape="circle")
    circle = ObjSpec(shape="circle", color="red")
    stated = Constraints(objects=(circle, circle), relations=((0, "left of", 1),))
    s = check(render(dataclasses.replace(scene, objects=tuple(objs))), stated)
    assert s.correct and s.attributes == {"color": True, "shape": True, "count": True, "relation": True}


# (c) layout rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(64, 64), (64, 256), (256, 64)])
def test_objects_never_overlap_and_stay_inside(width, height):
    rng = np.random.default_rng(width + height)
    counts = set()
    for _ in range(1000):
        scene = sample_scene(rng)
        counts.add(len(scene.objects))
        assert scene.background != "black" or scene.lighting == "none"
        boxes = [box(o, width, height) for o in scene.objects]
        for (x0, y0, x1, y1), o in zip(boxes, scene.objects, strict=True):
            assert x0 >= 2 - 1e-9 and y0 >= 2 - 1e-9 and x1 <= width - 2 + 1e-9 and y1 <= height - 2 + 1e-9, o
            row, col = divmod(CELLS.index(o.cell), 3)
            assert col / 3 < o.x < (col + 1) / 3 and row / 3 < o.y < (row + 1) / 3, o
        for a, b in itertools.combinations(boxes, 2):
            gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert gap >= 2 - 1e-9, (a, b)
    assert counts == {1, 2, 3, 4}


# (d) errors name the bad value and the allowed range ------------------------------------------


@pytest.mark.parametrize(("width", "height", "bad"), [(65, 64, "65"), (64, 48, "48"), (272, 128, "272"), (128, 0, "0")])
def test_bad_sizes_raise(width, height, bad):
    scene = sample_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match=rf"\b{bad}\b.*64\.\.256"):
        render(scene, width, height)


def test_bad_values_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"5 .*1\.\.4"):
        sample_scene(rng, 5)
    with pytest.raises(ValueError, match="magenta"):
        ObjSpec(color="magenta")
    with pytest.raises(ValueError, match="sideways"):
        Constraints(objects=(ObjSpec(),), lighting="sideways")
    with pytest.raises(ValueError, match=r"2\.\.4 objects"):
        caption(sample_scene(rng, 1), rng, "relation")


# (e) the eval prompt set ----------------------------------------------------------------------


def test_eval_prompts_are_fixed_complete_and_satisfiable():
    prompts = eval_prompts()
    assert prompts == eval_prompts(0) and prompts != eval_prompts(1)
    assert len(prompts) >= 240
    for category, (counts, _) in EVAL_CATEGORIES.items():
        group = [p for p in prompts if p.category == category]
        assert len(group) >= 60, category
        for p in group:
            c = p.constraints
            assert len(c.objects) in counts and len(p.scene.objects) == len(c.objects)
            assert bool(c.relations) == (category == "relation") and bool(c.absent) == (category == "negation")

    seen = set()
    for p in prompts:
        c = p.constraints
        seen |= {(k, getattr(o, k)) for o in c.objects for k in ("color", "shape", "size", "cell") if getattr(o, k)}
        seen |= {("background", c.background), ("lighting", c.lighting)}
        seen |= {("relation", r) for _, r, _ in c.relations} | {("negation", kind) for kind, _ in c.absent}
        seen |= {("hex", h) for h in re.findall(r"#[0-9A-F]{6}", p.text)}
        seen |= {("count", w) for w in re.findall(r"\b(two|three|four)\b", p.text)}
    wanted = (
        {("color", c) for c in COLORS} | {("hex", h) for h in COLORS.values()} | {("shape", s) for s in SHAPES}
        | {("size", s) for s in SIZES} | {("cell", c) for c in CELLS} | {("background", b) for b in BACKGROUNDS}
        | {("lighting", d) for d in LIGHTINGS if d != "none"} | {("relation", r) for r in RELATIONS}
        | {("negation", "color"), ("negation", "shape")} | {("count", w) for w in ("two", "three", "four")}
    )  # fmt: skip
    assert wanted <= seen, wanted - seen
    assert any(p.scene.lighting == "none" for p in prompts)  # unlit scenes are in the set, lighting unstated

    for p in prompts:
        assert caption_tokens(p.text) <= MAX_CAPTION_TOKENS, p.text
        s = check(render(p.scene), p.constraints)
        assert s.correct, (p.text, s)


def test_checker_tells_an_extra_colour_from_the_palette(monkeypatch):
    """For LoRA concepts: a teal object (not a world colour) is "teal" once teal is in the checker's palette."""
    import flux2studio.nano.shapes as shapes

    teal = (70, 153, 144)
    scene = Scene("white", "none", (shapes.Obj("circle", "cyan", "large", "center", 0.5, 0.5),))
    monkeypatch.setitem(shapes.RGB, "cyan", teal)  # the renderer draws "cyan" in teal
    image = render(scene, 128, 128)
    monkeypatch.undo()
    assert analyze(image, extra_colors={"teal": teal}).objects[0].color == "teal"
    assert all(o.color in COLORS for o in analyze(image).objects)  # without it: a world colour, or nothing
    assert analyze(render(scene, 128, 128), extra_colors={"teal": teal}).objects[0].color == "cyan"
