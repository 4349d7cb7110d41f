"""benchmarks/fidelity.py label-free mode on a tiny checkpoint: JSON structure, identity at keep 1.0, KL >= 0."""

import json
import os
import sys

import numpy as np
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
    res = fidelity.label_free(
        model,
        processor,
        fidelity.load_images(folder),
        fidelity.load_questions(qfile),
        ops=OPS,
        keeps=KEEPS,
        max_tokens=4,
        log=lambda *a: None,
    )
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


def test_retention_picks_the_best_prompt_free_operator_and_checks_targets():
    fams = ["colour", "where", "read"]

    def row(setting, method, keep, acc):
        return dict(
            setting=setting, method=method, keep=keep, accuracy=dict(zip(fams, acc)), mean_accuracy=sum(acc) / len(acc)
        )

    res = dict(
        families=fams,
        rows=[
            row("full", "none", 1.0, [1.0, 0.8, 0.5]),
            row("random@post", "random", 0.33, [1.0, 0.8, 0.5]),  # a baseline: never "best"
            row("diversity@post", "diversity", 0.33, [1.0, 0.8, 0.45]),
            row("floor@post", "floor", 0.33, [0.5, 0.4, 0.25]),
            row("diversity@post", "diversity", 0.5, [1.0, 0.8, 0.5]),  # another keep: ignored
        ],
    )
    ret = fidelity.retention(res, keep=0.33)
    assert [r["setting"] for r in ret["rows"]] == ["random@post", "diversity@post", "floor@post"]
    best = ret["best"]
    assert best["setting"] == "diversity@post"
    assert best["where"] == 1.0 and abs(best["read"] - 0.9) < 1e-12
    assert abs(best["mean"] - (2.25 / 3) / (2.3 / 3)) < 1e-12
    assert ret["met"] == {"mean": True, "where": True, "read": False}


def test_mass_repeat_gives_kept_tokens_their_groups_length_and_restores_the_plan(tiny_checkpoint, images):
    from mlx_compact.compaction import Compaction, compose
    from mlx_compact.generate import prepare

    model, processor = mlx_compact.load(str(tiny_checkpoint("qwen2_vl")))
    c = Compaction("diversity", keep=0.33)
    full = prepare(model, processor, "What is here?", images[:1])
    short = prepare(model, processor, "What is here?", images[:1], compaction=c)
    plan = compose.plan
    with fidelity.mass_repeat():
        repeated = prepare(model, processor, "What is here?", images[:1], compaction=c)
    assert compose.plan is plan
    n_full, n_short, n_rep = (int(p.embeds.shape[1]) for p in (full, short, repeated))
    assert n_short < n_full and n_rep == n_full
    # every kept token appears at least once, at its own position, and nothing else appears
    kept = {tuple(col) for col in np.array(short.positions).reshape(3, -1).T}
    assert {tuple(col) for col in np.array(repeated.positions).reshape(3, -1).T} == kept
