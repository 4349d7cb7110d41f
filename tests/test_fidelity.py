"""benchmarks/fidelity.py label-free mode on a tiny checkpoint: JSON structure, identity at keep 1.0, KL >= 0."""

import json
import os
import sys

import pytest

import mlx_compact

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks import fidelity  # noqa: E402

OPS = ("diversity", "random")
KEEPS = (1.0, 0.5)


@pytest.fixture(scope="module")
def result(tiny_checkpoint, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fidelity-images")
    for i, im in enumerate(images):
        im.save(folder / f"im{i}.png")
    qfile = folder / "questions.txt"
    qfile.write_text("Describe this image.\nWhat is here?\n")
    model, processor = mlx_compact.load(str(tiny_checkpoint("qwen2_vl")))
    res = fidelity.label_free(model, processor, fidelity.load_images(folder), fidelity.load_questions(qfile),
                              ops=OPS, keeps=KEEPS, max_tokens=4, log=lambda *a: None)
    return json.loads(json.dumps(res))  # must round-trip through JSON


def test_structure(result):
    assert result["mode"] == "label_free"
    assert result["n_images"] == 2 and result["n_pairs"] == 4
    assert len(result["full_answers"]) == 4
    rows = result["rows"]
    assert [(r["method"], r["keep"]) for r in rows] == [(o, k) for o in OPS for k in KEEPS]
    for r in rows:
        assert r["where"] == "post" and r["setting"] == f"{r['method']}@post"
        for key in ("kl", "kl_max", "agreement", "token_agreement", "seconds"):
            assert isinstance(r[key], float)
        assert 0.0 <= r["agreement"] <= 1.0 and 0.0 <= r["token_agreement"] <= 1.0


def test_identity_at_keep_one(result):
    for r in result["rows"]:
        if r["keep"] == 1.0:
            assert abs(r["kl"]) <= 1e-6 and r["kl_max"] <= 1e-6
            assert r["agreement"] == 1.0 and r["token_agreement"] == 1.0


def test_compact_kl_nonnegative(result):
    for r in result["rows"]:
        if r["keep"] == 0.5:
            assert r["kl"] >= 0.0 and r["kl_max"] >= r["kl"]


def test_kl_helper():
    import numpy as np

    p = np.log(np.array([0.5, 0.25, 0.25]))
    q = np.log(np.array([0.25, 0.5, 0.25]))
    assert fidelity.kl(p, p) == 0.0
    assert fidelity.kl(p, q) == pytest.approx(0.25 * np.log(2))
