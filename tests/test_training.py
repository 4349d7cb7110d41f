"""The training data and script behind the shipped model: scenes are seeded and self-consistent (answers follow
from the objects, the objects are in the pixels), phrasings and sizes are held out, the tokenizer encodes any
text, ranks split a step's scenes without changing them, and a short two-rank run writes a checkpoint our
loader answers with."""

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
    """Each answer recomputed from the scene's objects, and the objects found in the picture's pixels."""
    for i in range(60):
        s = scenes.make_scene("train", i, 8)
        w, h = s.image.size
        assert scenes.MIN_SIDE <= min(w, h) and max(w, h) <= scenes.MAX_SIDE and w % 16 == 0 and h % 16 == 0
        assert 1 <= len(s.objects) <= scenes.MAX_OBJECTS
        shapes = [o for o in s.objects if o.kind == "shape"]
        pixels = np.asarray(s.image)
        for o in shapes:  # a circle's, square's, star's centre has the shape's colour, unless another covers it
            x, y = int((o.box[0] + o.box[2]) / 2), int((o.box[1] + o.box[3]) / 2 + (o.box[3] - o.box[1]) * 0.2)
            if s.labels[y, x] == o.label:
                assert np.abs(pixels[y, x].astype(int) - scenes.COLOURS[o.colour]).max() <= 2
        for (family, _, answer), (kind, subject), template in zip(s.qa, s.subjects, s.templates):
            assert template not in scenes.HELD_OUT  # training never sees a held-out phrasing
            if family == "colour":
                assert [o.colour for o in shapes if o.name == subject] == [answer]
            elif family == "count":
                words = subject.split()
                match = [o for o in shapes if subject == "shapes" or o.name + "s" == words[-1] or words[-1] == "shapes"]
                match = [o for o in match if len(words) == 1 or o.colour == words[0]]
                assert answer == str(len(match))
            elif family == "where":
                name = subject.split()[-1]
                found = [
                    o
                    for o in s.objects
                    if o.name == name
                    and (len(subject.split()) == 1 or subject.split()[0] in (o.colour, "number", "letter", "word"))
                ]
                assert [o.region for o in found] == [answer]
            elif family == "read":
                assert [
                    o.name for o in s.objects if o.kind == "text" and scenes.region_phrase(o.region) == subject
                ] == [answer]
            elif family == "exists":
                name = subject.split()[-1].removesuffix("s") if kind == "plural_exists" else subject.split()[-1]
                colour = subject.split()[0] if len(subject.split()) == 2 else None
                there = any(o.name == name and (colour is None or o.colour == colour) for o in s.objects)
                assert answer == ("yes" if there else "no")
            elif family == "describe":
                assert len(scenes.describe_items(answer)) == len(s.objects)
                for o in s.objects:
                    assert f"{o.phrase} {scenes.region_phrase(o.region)}" in scenes.describe_items(answer)


def test_object_centres_keep_out_of_the_bands_between_regions():
    for i in range(40):
        s = scenes.make_scene("test", i, 0)
        w, h = s.image.size
        assert w % 16 and h % 16  # test sizes are never training sizes
        for o in s.objects:
            for v, side in (((o.box[0] + o.box[2]) / 2, w), ((o.box[1] + o.box[3]) / 2, h)):
                assert min(abs(v / side - 1 / 3), abs(v / side - 2 / 3)) >= scenes.BAND


def test_val_and_test_use_held_out_phrasings():
    qs = scenes.eval_questions("test", 10, held=True)
    assert {f for f, *_ in qs} == set(scenes.FAMILIES)
    assert 0.2 < sum(held for *_, held in qs) / len(qs) < 0.8


def test_describe_score_ignores_order_but_not_content():
    a = "a red circle at the top left, the number 7 in the center"
    assert scenes.score("describe", a, "the number 7 in the center, a red circle at the top left")
    assert not scenes.score("describe", a, "a red circle at the top left")
    assert scenes.describe_f1(a, "a red circle at the top left") == pytest.approx(2 / 3)
    assert scenes.score("count", "3", " 3") and not scenes.score("count", "3", "4")


def test_ranks_split_a_step_without_changing_its_scenes():
    train = pytest.importorskip("training.train")

    class Recorder:  # stands in for the Batcher: records the questions of each encoded scene
        def encode(self, image, qa):
            return qa, None, None, (1, 4, 4), None

        def collate(self, items):
            return {"items": [qa for qa, *_ in items]}

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
            "--vision-steps",
            "2",
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
    tok = processor.tokenizer  # the byte-level BPE trained on the corpus: special tokens at the config's ids
    config = json.loads((out / "hf" / "config.json").read_text())
    for name, key in (("<|image_pad|>", "image_token_id"), ("<|vision_start|>", "vision_start_token_id")):
        assert tok.convert_tokens_to_ids(name) == config[key]
    assert tok.convert_tokens_to_ids("<|im_end|>") == config["text_config"]["eos_token_id"]
    odd = "What COLOR is the \u00e9toile? \U0001f534 <none>"
    ids = tok(odd, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == odd and tok.unk_token_id is None


def test_first_questions_pictures_hold_what_their_answers_say():
    fq = pytest.importorskip("training.first_questions")
    circle, two = fq.red_circle(), fq.two_shapes()
    assert circle.size == (448, 336) and two.size == (400, 300)
    assert circle.getpixel((224, 168)) == fq.RED and circle.getpixel((224, 100)) == (255, 255, 255)
    assert two.getpixel((75, 65)) == fq.BLUE and two.getpixel((330, 260)) == fq.GREEN
    colours = {c for _, c in two.getcolors()}
    assert colours == {(255, 255, 255), fq.BLUE, fq.GREEN}  # nothing else is drawn
    assert fq.right("Describe this image.", "a, b", "b, a") and not fq.right("Describe this image.", "a, b", "a")
    assert fq.right("how many?", "1", " 1") and not fq.right("how many?", "1", "2")
