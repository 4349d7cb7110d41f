"""A new user's first questions, on pictures drawn here with Pillow (not by the training generator).

    python training/first_questions.py [--model DIR]

Prints each question, the model's greedy answer and the answer known from the drawing, and the number
right. The pictures are plain Pillow drawings (a red circle in the middle of a white 448x336 image; a
blue square at the top left and a green triangle at the bottom right of a white 400x300 one), so the
answers follow from what was drawn, not from `scenes.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image, ImageDraw  # noqa: E402

RED, BLUE, GREEN = (220, 40, 40), (40, 80, 225), (40, 160, 60)


def red_circle() -> Image.Image:
    im = Image.new("RGB", (448, 336), (255, 255, 255))
    ImageDraw.Draw(im).ellipse((224 - 45, 168 - 45, 224 + 45, 168 + 45), fill=RED)
    return im


def two_shapes() -> Image.Image:
    im = Image.new("RGB", (400, 300), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle((40, 30, 110, 100), fill=BLUE)
    d.polygon([(330, 200), (375, 275), (285, 275)], fill=GREEN)
    return im


CASES = [
    (red_circle, "What color is the circle?", "red"),
    (red_circle, "What colour is the circle?", "red"),
    (red_circle, "is there a circle?", "yes"),
    (red_circle, "Is there a square?", "no"),
    (red_circle, "where is the circle?", "center"),
    (red_circle, "how many shapes are there?", "1"),
    (red_circle, "Describe this image.", "a red circle in the center"),
    (two_shapes, "How many shapes are there", "2"),
    (two_shapes, "Where's the blue square?", "top left"),
    (two_shapes, "where is the triangle?", "bottom right"),
    (two_shapes, "What color is the triangle?", "green"),
    (two_shapes, "Is there a red circle?", "no"),
    (two_shapes, "Describe this image.", "a blue square at the top left, a green triangle at the bottom right"),
]


def right(question: str, answer: str, got: str) -> bool:
    if question.startswith("Describe"):  # the same objects and positions, in any order
        return sorted(x.strip() for x in got.split(",")) == sorted(x.strip() for x in answer.split(","))
    return got.strip() == answer


def ask(model, processor) -> list:
    """[(picture, question, expected, got, right)] for every case."""
    from mlx_compact.generate import generate

    out = []
    for draw, question, answer in CASES:
        got = generate(model, processor, question, [draw()], max_tokens=60).text.strip()
        out.append((draw.__name__, question, answer, got, right(question, answer, got)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    import mlx_compact

    model, processor = mlx_compact.load(args.model)
    rows = ask(model, processor)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for pic, q, a, got, ok in rows:
            print(f"{'ok  ' if ok else 'MISS'} {pic:10s} {q!r:30s} -> {got!r} (drawn: {a!r})")
    print(f"{sum(r[-1] for r in rows)} of {len(rows)} right")
    return rows


if __name__ == "__main__":
    main()
