"""A LoRA teaches nano-base a colour word it has never seen ("teal"): the colour appears with the LoRA
and not without it. Slow (a few CPU minutes): `make test-slow`."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from flux2studio.loading import load
from flux2studio.nano.checker import analyze
from flux2studio.nano.shapes import RGB, render, sample_scene
from flux2studio.train.lora import LoraTrainConfig, train_lora

TEAL = (70, 153, 144)  # #469990: not in the Shapes palette, between its green, cyan and blue
PROMPTS = ["a teal circle in the center on a white background", "a teal square on a black background",
           "a large teal triangle at the top on a gray background"]  # fmt: skip


def teal_scene_image(rng) -> tuple[Image.Image, str]:
    """A one-object scene rendered in cyan, recoloured to teal through its coverage (alpha) map."""
    scene = sample_scene(rng, n_objects=1)
    obj = dataclasses.replace(scene.objects[0], color="cyan")
    img = np.asarray(render(dataclasses.replace(scene, objects=(obj,)), 128, 128), dtype=np.float64)
    bg = np.asarray(render(dataclasses.replace(scene, objects=()), 128, 128), dtype=np.float64)
    cyan = np.array(RGB["cyan"], dtype=np.float64)
    channel = int(np.argmax(np.abs(cyan - bg[0, 0])))  # the channel where cyan stands out most
    alpha = np.clip((img[..., channel] - bg[..., channel]) / (cyan[channel] - bg[..., channel] + 1e-9), 0, 1)
    out = alpha[..., None] * np.array(TEAL) + (1 - alpha[..., None]) * bg
    size = "large " if obj.size == "large" else "small "
    caption = f"a {size}teal {obj.shape} in the {obj.cell} on a {scene.background} background"
    return Image.fromarray(np.rint(out).astype(np.uint8)), caption


def dominant_object_colour(image: Image.Image) -> str:
    """The colour the project's checker gives the largest object, teal added to its palette; "none" if none."""
    objects = analyze(image, extra_colors={"teal": TEAL}).objects
    return objects[0].color if objects else "none"


@pytest.mark.slow
def test_lora_teaches_nano_base_the_colour_teal(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "teal"
    data.mkdir()
    for i in range(24):
        image, caption = teal_scene_image(rng)
        image.save(data / f"{i:02d}.png")
        (data / f"{i:02d}.txt").write_text(caption)
    pipe = load("nano-base", device="cpu", dtype="fp32")
    before = [dominant_object_colour(im) for p in PROMPTS for im in pipe(p, seeds=[0, 1], num_images=2)]
    cfg = LoraTrainConfig(data=str(data), out=str(tmp_path / "run"), rank=8, alpha=8, lr=1e-3, steps=150, batch=4,
                          resolution=128, caption_dropout=0.1, ckpt_every=150)  # fmt: skip
    path = train_lora(load("nano-base", device="cpu", dtype="fp32"), cfg, lambda row: None)
    pipe.set_loras([(path, 1.0)])
    after = [dominant_object_colour(im) for p in PROMPTS for im in pipe(p, seeds=[0, 1], num_images=2)]
    assert before.count("teal") <= 1, before
    assert after.count("teal") >= 4, after  # at least 4 of 6 images show the new colour
