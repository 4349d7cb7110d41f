"""Sampling knobs reach mlx-lm's samplers and logits processors, from the library and the CLI."""

import json

import pytest
from mlx_lm.sample_utils import make_logits_processors

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact import cli, generate
from mlx_compact.files import InputError
from mlx_compact.loader import load


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load(str(tiny_checkpoint("qwen2_vl")))


def test_top_k_1_samples_the_greedy_answer(model, images):
    m, proc = model
    greedy = generate(m, proc, "describe", images, max_tokens=8)
    for seed in (0, 1, 2):
        assert (
            generate(m, proc, "describe", images, max_tokens=8, temperature=1.5, top_k=1, seed=seed).tokens
            == greedy.tokens
        )


def test_repetition_penalty_is_mlx_lms_processor(model, images):
    m, proc = model
    ours = generate(m, proc, "describe", images, max_tokens=12, repetition_penalty=3.0)
    theirs = generate(
        m, proc, "describe", images, max_tokens=12, logits_processors=make_logits_processors(repetition_penalty=3.0)
    )
    plain = generate(m, proc, "describe", images, max_tokens=12)
    assert ours.tokens == theirs.tokens
    assert ours.tokens != plain.tokens or len(set(plain.tokens)) == len(plain.tokens)


@pytest.mark.parametrize("kw", [dict(top_k=-1), dict(min_p=1.5), dict(repetition_penalty=0.0), dict(temperature=-1)])
def test_bad_knobs_are_refused(model, kw):
    m, proc = model
    with pytest.raises(InputError):
        generate(m, proc, "hi", max_tokens=2, **kw)


def test_cli_flags_reach_the_sampler(tiny_checkpoint, images, tmp_path, capsys):
    images[0].save(tmp_path / "a.png")
    base = [
        "generate",
        "--model",
        str(tiny_checkpoint("qwen2_vl")),
        "--image",
        str(tmp_path / "a.png"),
        "--prompt",
        "describe",
        "--max-tokens",
        "8",
        "--stats",
        "json",
    ]
    assert cli.main(base) == 0
    greedy = json.loads(capsys.readouterr().out)["text"]
    assert cli.main(base + ["--temperature", "2", "--top-k", "1", "--min-p", "0.01", "--seed", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == greedy
