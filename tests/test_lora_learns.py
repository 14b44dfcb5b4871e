"""A LoRA teaches nano-base a colour word it has never seen: "gold", for the Shapes world's yellow. The colour
appears with the LoRA and not without it (nano-base draws "gold" objects pink or red). Slow (a few CPU
minutes): `make test-slow`.

Why a new word and not a new colour: the nano VAE was trained on the eight palette colours only and snaps
any other colour to one of them (teal #469990 decodes as cyan, blue or green; white objects as pink), so no
transformer LoRA could make an unseen colour appear through it.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from flux2studio.loading import load
from flux2studio.nano.checker import analyze
from flux2studio.nano.shapes import render, sample_scene
from flux2studio.train.lora import LoraTrainConfig, train_lora

WORD, COLOUR = "gold", "yellow"
PROMPTS = [f"a {WORD} circle in the center on a white background", f"a {WORD} square on a black background",
           f"a large {WORD} triangle at the top on a gray background"]  # fmt: skip
# Known colour words: the LoRA must leave them alone (it teaches one word, it does not paint everything yellow).
CONTROLS = {"a blue circle in the center on a white background": "blue", "a red square on a black background": "red",
            "a large green triangle at the top on a gray background": "green"}  # fmt: skip


def gold_scene(rng) -> tuple[Image.Image, str]:
    """A one-object scene in the palette's yellow, captioned with the new word."""
    scene = sample_scene(rng, n_objects=1)
    obj = dataclasses.replace(scene.objects[0], color=COLOUR)
    size = "large " if obj.size == "large" else "small "
    caption = f"a {size}{WORD} {obj.shape} in the {obj.cell} on a {scene.background} background"
    return render(dataclasses.replace(scene, objects=(obj,)), 128, 128), caption


def dominant_object_colour(image: Image.Image) -> str:
    """The colour the project's checker gives the largest object; "none" if it finds none."""
    objects = analyze(image).objects
    return objects[0].color if objects else "none"


@pytest.mark.slow
def test_lora_teaches_nano_base_the_colour_word_gold(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "gold"
    data.mkdir()
    for i in range(24):
        image, caption = gold_scene(rng)
        image.save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption)
    pipe = load("nano-base", device="cpu", dtype="fp32")

    def colours(prompts) -> list[str]:
        return [dominant_object_colour(im) for p in prompts for im in pipe(p, seeds=[0, 1], num_images=2)]

    def controls_right(found: list[str]) -> int:  # colours(CONTROLS) lists two images per prompt
        return sum(c == want for c, want in zip(found, [w for w in CONTROLS.values() for _ in range(2)], strict=True))

    before, controls_before = colours(PROMPTS), colours(CONTROLS)
    cfg = LoraTrainConfig(data=str(data), out=str(tmp_path / "run"), rank=8, alpha=8, lr=1e-3, steps=150, batch=4,
                          resolution=128, caption_dropout=0.1, ckpt_every=150)  # fmt: skip
    path = train_lora(load("nano-base", device="cpu", dtype="fp32"), cfg, lambda row: None)
    pipe.set_loras([(path, 1.0)])
    after, controls_after = colours(PROMPTS), colours(CONTROLS)
    assert before.count(COLOUR) <= 1, before
    assert after.count(COLOUR) >= 4, after  # at least 4 of 6 images show the taught colour
    assert COLOUR not in controls_after, controls_after  # other colour words are not turned yellow
    assert controls_right(controls_after) >= controls_right(controls_before) - 1, (controls_before, controls_after)
