"""Make docs/editing.png: the README's editing figure, on the Shapes world with the embedded nano-base.

Row 1, inpainting: the start scene (a blue circle top left), the mask (white = repaint: the bottom-right
quadrant), and seeds 0-3 of "a blue circle in the top left and a red square in the bottom right"; under each
result, whether the project's checker finds the red square in the bottom-right cell.
Row 2: image-to-image of the same scene at strengths 0.1, 0.2, 0.3 ("a large green circle ...": nano-base's
shifted schedule enters at noise 0.46, 0.61, 0.78), and outpainting of the scene 64 px to the right ("... and a
yellow square on the right").

python docs/editing_figure.py [--out docs/editing.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from flux2studio import load
from flux2studio.nano.checker import analyze
from flux2studio.nano.shapes import Obj, Scene, render

SCALE, LABEL = 2, 16
INPAINT = "a blue circle in the top left and a red square in the bottom right"
I2I = "a large green circle in the top left on a white background"
OUTPAINT = "a blue circle in the top left and a yellow square on the right"


def strip(cells: list[tuple[Image.Image, str]]) -> Image.Image:
    """Images side by side at 2x (nearest), each with its label underneath."""
    height = max(im.height for im, _ in cells) * SCALE
    width = sum(im.width for im, _ in cells) * SCALE
    canvas = Image.new("RGB", (width, height + LABEL), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for image, label in cells:
        canvas.paste(image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST), (x, 0))
        draw.text((x + 4, height + 2), label, fill="black")
        x += image.width * SCALE
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("editing.png")))
    args = parser.parse_args()
    pipe = load("nano-base", dtype="fp32")
    scene = render(Scene("white", "none", (Obj("circle", "blue", "large", "top left", 0.2, 0.2),)), 128, 128)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (64, 64, 128, 128))
    row1 = [(scene, "start"), (mask.convert("RGB"), "mask")]
    for seed, out in enumerate(pipe(INPAINT, image=scene, mask=mask, seeds=[0, 1, 2, 3], num_images=4,
                                    prompt_upsampling=False)):  # fmt: skip
        hit = any(o.shape == "square" and o.color == "red" and o.cell == "bottom right" for o in analyze(out).objects)
        row1.append((out, f"seed {seed}: {'found' if hit else 'missed'}"))
    row2 = [(scene, "start")]
    for strength in (0.1, 0.2, 0.3):
        out = pipe(I2I, image=scene, strength=strength, seed=0, prompt_upsampling=False)[0]
        row2.append((out, f"strength {strength}"))
    wide = pipe(OUTPAINT, image=scene, expand=(0, 0, 64, 0), seed=0, prompt_upsampling=False)[0]
    row2.append((wide, "outpainted +64 px right"))
    top, bottom = strip(row1), strip(row2)
    figure = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height + 8), "white")
    figure.paste(top, (0, 0))
    figure.paste(bottom, (0, top.height + 8))
    figure.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
