"""Make the own-data example: 48 small pictures of one coloured shape each (images/), and the split files of its
four task files (qa, caption, choice, classify). Deterministic; run once from anywhere:

    python examples/own-data/make_images.py
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 48
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
VARIANTS = 4  # pictures per colour and shape: 4 x 3 x 4 = 48


def draw(shape: str, color: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """One shape of a random size and place on a light background."""
    img = Image.new("RGB", (SIZE, SIZE), tuple(rng.randint(225, 255) for _ in range(3)))
    pen = ImageDraw.Draw(img)
    r = rng.randint(11, 17)
    x, y = rng.randint(r + 2, SIZE - r - 3), rng.randint(r + 2, SIZE - r - 3)
    if shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=color)
    elif shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=color)
    else:
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color)
    return img


def main() -> None:
    rng = random.Random(22)
    pictures = []
    (HERE / "images").mkdir(exist_ok=True)
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for k in range(VARIANTS):
                name = f"{color}-{shape}-{k}.png"
                draw(shape, rgb, rng).save(HERE / "images" / name, optimize=True)
                pictures.append((name, color, shape))
    rng.shuffle(pictures)
    splits = {"train": pictures[:32], "val": pictures[32:40], "test": pictures[40:]}
    colors = list(COLORS)
    for split, rows in splits.items():
        write_csv(f"qa-{split}.csv", ["image", "question", "answer"],
                  [row for name, color, shape in rows for row in (
                      [name, "what colour is the shape?", color], [name, "what shape is it?", shape])])
        (HERE / f"caption-{split}.json").write_text(json.dumps(
            [{"image": name, "caption": [f"a {color} {shape}", f"a {shape} in {color}"]} for name, color, shape in
             rows], indent=1) + "\n", encoding="utf-8")
        write_csv(f"choice-{split}.csv", ["image", "question", "choices", "answer"],
                  [[name, "which colour is the shape?", "|".join(colors), color] for name, color, _ in rows])
        write_csv(f"classify-{split}.csv", ["image", "label"], [[name, shape] for name, _, shape in rows])


def write_csv(name: str, header: list[str], rows: list[list[str]]) -> None:
    with open(HERE / name, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


if __name__ == "__main__":
    main()
