"""The shipped tiny Qwen3-VL answers held-out synthetic visual questions through our loader and generate.

The questions are regenerated from the seed (`training.grid_scenes.eval_questions("test", PER_FAMILY)`), never
stored. The issue's goal is >= 0.90 on every family, and that is the floor asserted for each.

The test asks the first 20 questions of each family: 100 questions, ~5 s with OpenBLAS and ~20 s with MLX's
bundled reference BLAS on 2 shared CPU cores (all 500 took 21 s and 106 s). The list is a prefix of the
100-a-family one measured below (`eval_questions` fills the families in a fixed order), on which the model
answers every question right, so these 100 are answered 1.00 on every family too. With 20 a family a floor
of 0.90 still allows 2 misses, and guessing (at most 0.60 a family, below) reaches 18 of 20 with a
probability below 0.01.

Measured on the 100-a-family question set (500 questions; float16 shipped weights, our loader +
greedy generate; transformers fp32 on the unconverted checkpoint gives the same numbers), against guessing
on the same questions: the majority answer of the family and the best answer for the exact question text
(both learned on 300 val questions a family), and the same model shown a blank image of the scene's size
and background:

| family | measured | floor | majority | question-only | blank image |
|---|---|---|---|---|---|
| colour | 1.00 | 0.90 | 0.14 | 0.17 | 0.05 |
| count  | 1.00 | 0.90 | 0.60 | 0.60 | 0.21 |
| where  | 1.00 | 0.90 | 0.15 | 0.10 | 0.07 |
| read   | 1.00 | 0.90 | 0.07 | 0.04 | 0.00 |
| exists | 1.00 | 0.90 | 0.42 | 0.45 | 0.42 |
| all    | 1.000 | 0.95 | 0.276 | 0.272 | 0.150 |

(On 400 a family the model makes 5 mistakes in 2,000: count 0.99, exists 0.9975, the rest 1.00.)
Every floor is far above what guessing reaches, so a broken loader, processor or generate (which leaves the
model guessing from the question) fails. The model is deterministic: the margin below the measured numbers
only absorbs float16 / platform differences.
"""

import sys
from pathlib import Path

import pytest

import mlx_compact

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(mlx_compact.__file__).parent / "assets" / "qwen3-vl-tiny"
PER_FAMILY = 20  # 5 families -> 100 questions (the first 20 of each family of the measured 100)
FLOORS = {f: 0.90 for f in ("colour", "count", "where", "read", "exists")}
OVERALL_FLOOR = 0.95
EXAMPLE = ("test", 6)  # the scene behind example.png (README's main command)

sys.path.insert(0, str(ROOT))
scenes = pytest.importorskip("training.grid_scenes")  # the world the shipped model was trained on


@pytest.fixture(scope="module")
def shipped():
    from mlx_compact.loader import load

    if not (MODEL / "config.json").exists():
        pytest.skip(f"no shipped model at {MODEL}")
    return load(str(MODEL))


def test_shipped_model_answers_test_split_questions(shipped):
    from mlx_compact.generate import generate

    model, processor = shipped
    questions = scenes.eval_questions("test", PER_FAMILY)  # regenerated from the seed, never stored
    assert len(questions) == PER_FAMILY * len(scenes.FAMILIES)
    right = {f: 0 for f in scenes.FAMILIES}
    total = {f: 0 for f in scenes.FAMILIES}
    wrong = []
    for family, image, question, answer in questions:
        got = generate(model, processor, question, [image], max_tokens=4).text.strip()
        total[family] += 1
        if got == answer:
            right[family] += 1
        else:
            wrong.append((family, question, answer, got))
    accuracy = {f: right[f] / total[f] for f in scenes.FAMILIES}
    missed = {f: (round(accuracy[f], 3), floor) for f, floor in FLOORS.items() if accuracy[f] < floor}
    overall = sum(right.values()) / len(questions)
    assert not missed, f"below floor (accuracy, floor): {missed}; all {accuracy}; wrong: {wrong[:10]}"
    assert overall >= OVERALL_FLOOR, f"overall {overall:.3f} < {OVERALL_FLOOR}; per family {accuracy}"


def test_shipped_example_image_matches_the_test_split(shipped):
    import numpy as np
    from PIL import Image

    image = Image.open(MODEL / "example.png").convert("RGB")
    scene = scenes.make_scene(*EXAMPLE, 1)
    assert np.array_equal(np.asarray(image), np.asarray(scene.image))


def test_readme_question_about_the_example_is_answered_right(shipped):
    from mlx_compact.generate import generate

    model, processor = shipped
    scene = scenes.make_scene(*EXAMPLE, 1)
    truth = str(sum(o.kind == "shape" for o in scene.objects))
    assert "how many shapes are there?" in (ROOT / "README.md").read_text()
    got = generate(model, processor, "how many shapes are there?", [scene.image], max_tokens=4).text.strip()
    assert got == truth
