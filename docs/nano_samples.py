"""Make docs/nano-samples.png: the README's grid of `nano` samples with each prompt written under its image.

python docs/nano_samples.py [--weights FILE] [--out docs/nano-samples.png]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from flux2studio import load

PROMPTS = (
    "a large red circle in the top left and a small blue square at the bottom right on a white background",
    "three green triangles on a black background",
    "a yellow square to the left of a purple circle",
    "a #4363D8 triangle in the center",
    "a cyan circle, no red shapes",
    "two squares and no triangles",
    "a large orange square on a gray background lit from the left",
    "a small pink circle at the bottom",
)
CELL, SCALE, COLUMNS, TEXT_LINES, LINE = 128, 2, 4, 4, 12


def grid(images: list[Image.Image], prompts: tuple[str, ...]) -> Image.Image:
    side = CELL * SCALE
    rows = -(-len(images) // COLUMNS)
    canvas = Image.new("RGB", (COLUMNS * side, rows * (side + TEXT_LINES * LINE + 8)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        x, y = (i % COLUMNS) * side, (i // COLUMNS) * (side + TEXT_LINES * LINE + 8)
        canvas.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(textwrap.wrap(prompt, width=side // 6 - 2)[:TEXT_LINES]):
            draw.text((x + 4, y + side + 4 + k * LINE), line, fill="black")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="nano transformer weights (default: the shipped ones)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("nano-samples.png")))
    args = parser.parse_args()
    pipe = load("nano", weights=args.weights) if args.weights else load("nano")
    grid(pipe(list(PROMPTS), seeds=[0] * len(PROMPTS)), PROMPTS).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
