"""The training data and script behind the shipped model: scenes are seeded and self-consistent, ranks split
a step's scenes without changing them, and a short two-rank run writes a checkpoint our loader answers with."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
scenes = pytest.importorskip("training.scenes")


def test_scene_is_a_pure_function_of_split_and_index():
    a, b = scenes.make_scene("test", 11, 4), scenes.make_scene("test", 11, 4)
    assert a.qa == b.qa and a.objects == b.objects
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(scenes.make_scene("val", 11, 4).image))


def test_answers_follow_from_the_objects():
    for i in range(60):
        s = scenes.make_scene("train", i, 8)
        shapes = [o for o in s.objects if o.kind == "shape"]
        ch, cw = s.cell
        assert s.image.size == (3 * cw, 3 * ch)
        assert len(s.cell_labels()) == (3 * ch // scenes.MERGED_PX) * (3 * cw // scenes.MERGED_PX)
        for family, q, a in s.qa:
            words = q.rstrip("?").split()
            if q == "how many shapes are there?":
                assert a == str(len(shapes))
            elif family == "count" and words[2] in scenes.COLOURS:
                assert a == str(sum(o.colour == words[2] for o in shapes))
            elif family == "read":
                region = " ".join(words[5:])
                assert [o.name for o in s.objects if o.region == region] == [a]
            elif family == "exists" and len(words) == 4:
                assert a == ("yes" if any(o.name == words[3] for o in s.objects if o.kind == "char") else "no")


def test_ranks_split_a_step_without_changing_its_scenes():
    train = pytest.importorskip("training.train")

    class Recorder:  # stands in for the Batcher: records the questions of each encoded scene
        def encode(self, image, qa):
            return qa

        def collate(self, items):
            return {"items": items}

    def step_items(ranks, rank):
        args = SimpleNamespace(batch=4, ranks=ranks, rank=rank, seed=3, turns=2, family_weights=None)
        return train.train_batch(Recorder(), args, step=5)["items"]

    whole = step_items(1, 0)
    assert len(whole) == 4
    assert step_items(2, 0) + step_items(2, 1) == whole


def test_two_rank_run_writes_a_checkpoint_our_loader_answers_with(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    train = pytest.importorskip("training.train")
    from mlx_compact.convert import convert

    from mlx_compact.generate import generate
    from mlx_compact.loader import load

    out = tmp_path / "run"
    train.main(
        [
            "--out",
            str(out),
            "--ranks",
            "2",
            "--steps",
            "3",
            "--batch",
            "2",
            "--turns",
            "2",
            "--vision-minutes",
            "0.05",
            "--vision-batch",
            "2",
            "--val-per-family",
            "1",
            "--warmup",
            "2",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["args"]["ranks"] == 2
    assert (out / "hf" / "model.safetensors").exists()
    convert(out / "hf", tmp_path / "mlx", dtype="float32", progress=False)
    model, processor = load(str(tmp_path / "mlx"))
    scene = scenes.make_scene("test", 0)
    text = generate(model, processor, "how many shapes are there?", [scene.image], max_tokens=2).text
    assert isinstance(text, str)
