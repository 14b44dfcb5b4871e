"""Prompt upsampling for the nano models: the Shapes grammar read back exactly, planned scenes that the
prompt allows, upsampled captions whose every reading still satisfies the prompt, and the pipeline option."""

import numpy as np
import pytest

from flux2studio.nano.checker import check
from flux2studio.nano.planner import PLAIN, parse, plan, upsample
from flux2studio.nano.shapes import (
    CAPTION_MODES,
    CELLS,
    COLORS,
    P_STATE,
    Constraints,
    ObjSpec,
    caption,
    eval_prompts,
    render,
    sample_scene,
)
from flux2studio.pipeline import build_request
from flux2studio.variants import get_variant


def test_parse_reads_back_every_caption_the_world_writes():
    rng = np.random.default_rng(7)
    for i in range(1500):
        scene = sample_scene(rng)
        mode = CAPTION_MODES[i % len(CAPTION_MODES)]
        mode = "plain" if mode == "relation" and len(scene.objects) < 2 else mode
        stated = {k: float(rng.uniform(0, 1)) for k in P_STATE} if i % 2 else None  # sparse and dense captions
        text, constraints = caption(scene, rng, mode, stated)
        assert parse(text) == constraints, text


def test_parse_takes_case_spacing_and_a_full_stop_and_refuses_what_it_cannot_read():
    assert parse("  A Large RED circle in the Top Left,  and two squares.") == Constraints(
        (ObjSpec("circle", "red", "large", "top left"), ObjSpec("square"), ObjSpec("square"))
    )
    assert parse("a #42d4f4 triangle below one object, no green shapes") == Constraints(
        (ObjSpec("triangle", "cyan"), ObjSpec()), relations=((0, "below", 1),), absent=(("color", "green"),)
    )
    for text in ("a dog", "a red circle and a dog", "five red circles", "two red circle", "a red circles",
                 "a red circle eating a blue square", "three circles and two squares", "", "no red shapes",
                 "a red circle, no dogs", "a red circle on a purple background"):  # fmt: skip
        assert parse(text) is None, text
        assert upsample(text, 0) == text  # left as written


@pytest.mark.parametrize(
    "text",
    [
        "a red circle, no red shapes",  # stated and forbidden at once
        "a red circle in the center and a blue square in the middle",  # one cell, two objects
        "a red circle on a black background, lit from the left",  # black is never lit
        "a circle, no circles and no squares and no triangles",
        "a red circle to the left of a blue square on the left",  # the blue square cannot have one to its left
    ],
)
def test_prompts_no_scene_satisfies_stay_as_written(text):
    constraints = parse(text)
    assert constraints is not None and plan(constraints, np.random.default_rng(0)) is None
    assert upsample(text, 3) == text


def test_every_reading_of_an_upsampled_eval_prompt_satisfies_the_prompt():
    """For every eval prompt and three seeds: the planned scene satisfies the prompt, its caption states
    every attribute of every object and the background, and other scenes drawn for that caption (the
    objects jittered anew inside the cells it names) satisfy the original prompt too: a model that does
    what the upsampled caption says does what the user asked."""
    for p in eval_prompts():
        for seed in range(3):
            rng = np.random.default_rng(seed)
            scene = plan(p.constraints, rng)
            assert scene is not None and check(render(scene), p.constraints).correct, p.text
            text, stated = caption(scene, rng, "plain", PLAIN)
            assert stated.background and all(o.shape and o.color and o.size and o.cell for o in stated.objects), text
            assert "#" not in text and parse(text) == stated
            again = plan(stated, rng)
            assert again is not None and check(render(again), p.constraints).correct, (p.text, text)


def test_upsampling_is_seeded_and_spreads_what_the_prompt_leaves_free():
    assert upsample("a circle", 5) == upsample("a circle", 5)
    planned = [parse(upsample("a circle", seed)).objects[0] for seed in range(300)]
    assert {o.cell for o in planned} == set(CELLS) and {o.color for o in planned} == set(COLORS)
    assert all(o.shape == "circle" for o in planned)
    kept = parse(upsample("a large green triangle at the bottom right, no blue shapes", 1))
    assert kept.objects == (ObjSpec("triangle", "green", "large", "bottom right"),)


def test_pipeline_upsamples_per_image_for_nano_only():
    nano = get_variant("nano")
    req = build_request(nano, "a circle and a square", num_images=3, seed=10)
    assert req.prompt_upsampling and req.prompts == ("a circle and a square",) * 3
    assert req.texts == tuple(upsample("a circle and a square", s) for s in (10, 11, 12))
    assert len(set(req.texts)) == 3  # each image its own plan
    plain = build_request(nano, "a circle and a square", prompt_upsampling=False)
    assert not plain.prompt_upsampling and plain.texts == plain.prompts
    klein = get_variant("klein-4b")
    assert not build_request(klein, "a cat").prompt_upsampling
    with pytest.raises(ValueError, match="klein-4b has no prompt upsampler"):
        build_request(klein, "a cat", prompt_upsampling=True)
