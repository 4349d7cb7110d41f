"""The converter: HF -> MLX directory -> load gives transformers' logits (float exactly, bf16 and
quantized loosely); the output layout is mlx-vlm's; it never leaves a partial directory; the CLI
prints one-line errors with exit code 2.

Measured on the tiny random checkpoints (relative error = max |ours - transformers| / max |transformers|;
cosine of the flattened logits; argmax agreement over the 71 prompt positions):
float32 ~1e-6; bfloat16 weights (computed in float32) 7e-3 to 9e-3, argmax 100%; 8-bit ~1.5e-2,
cosine 0.9999, argmax 96-99%; 4-bit (groups of 64) 0.24-0.28, cosine 0.976-0.979, argmax 59-65%
(random tiny weights have near-flat logits, so 4-bit flips many argmaxes). That quantized loading itself
is exact is checked separately: the loaded 4-bit model equals the float model quantized in memory.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_compact.convert import ConvertError, convert
from safetensors import safe_open
from test_loader import ARCHS, TOL, our_logits, reference_inputs, reference_logits, rel_err

from mlx_compact.loader import LoadError, load_model

# convert() arguments: the bound on the relative error, the least argmax agreement, the least cosine
CASES = {
    "float32": (dict(dtype="float32"), TOL, 1.0, 0.999999),
    "bfloat16": (dict(dtype="bfloat16"), 2e-2, 0.95, 0.9999),
    "q8": (dict(dtype="float32", quantize=True, q_bits=8), 3e-2, 0.9, 0.999),
    "q4": (dict(dtype="float32", quantize=True, q_bits=4), 0.4, 0.5, 0.95),
}


def cosine(a, b) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    """`converted(arch, case) -> path`, each conversion done once per module."""
    done = {}

    def get(arch, case):
        if (arch, case) not in done:
            out = tmp_path_factory.mktemp("converted") / f"{arch}-{case}"
            done[arch, case] = convert(ckpt(arch), out, progress=False, **CASES[case][0])
        return done[arch, case]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_matches_transformers(ckpt, converted, arch, case):
    ref = str(ckpt(arch))
    _, bound, agreement, least_cosine = CASES[case]
    logits = our_logits(load_model(converted(arch, case)), reference_inputs(ref))
    expected = reference_logits(ref)
    assert rel_err(logits, expected) < bound
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() >= agreement
    assert cosine(logits, expected) >= least_cosine


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_load_is_exact(ckpt, converted, arch):
    """The converted 4-bit model gives the same logits as the float model quantized in memory."""
    import mlx.nn as nn

    model = load_model(ckpt(arch))
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.startswith("vision_tower"),
    )
    inputs = reference_inputs(str(ckpt(arch)))
    assert rel_err(our_logits(load_model(converted(arch, "q4")), inputs), our_logits(model, inputs)) < 1e-6


@pytest.mark.parametrize("case", ["bfloat16", "q4"])
def test_output_layout_is_mlx_vlms(ckpt, converted, case):
    out = converted("qwen2_5_vl", case)
    names = sorted(p.name for p in out.iterdir())
    for expected in (
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "generation_config.json",
    ):
        assert expected in names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(str(out / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "mlx"}
    assert set(index["weight_map"]) == keys and set(index["weight_map"].values()) == {"model.safetensors"}
    assert all(k.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.")) for k in keys)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["vision_tower.patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)  # (O, T, H, W, C)
    config = json.loads((out / "config.json").read_text())
    assert list(config) == sorted(config)
    if case == "q4":
        quant = {"group_size": 64, "bits": 4, "mode": "affine"}
        assert config["quantization"] == quant and config["quantization_config"] == quant
        assert weights["language_model.model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
        assert "language_model.model.embed_tokens.scales" in keys
        assert not any(k.startswith("vision_tower.") and k.endswith(".scales") for k in keys)  # vision stays float
    else:
        assert "quantization" not in config
        assert {w.dtype for w in weights.values()} == {mx.bfloat16}


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_quantize_vision(ckpt, tmp_path, arch):
    out = convert(
        ckpt(arch),
        tmp_path / "qv",
        quantize=True,
        q_group_size=32,
        quantize_vision=True,
        dtype="float32",
        progress=False,
    )
    keys = mx.load(str(out / "model.safetensors")).keys()
    assert "vision_tower.blocks.0.mlp.linear_fc1.scales" in keys or "vision_tower.blocks.0.mlp.up_proj.scales" in keys
    assert "vision_tower.pos_embed.scales" not in keys  # Qwen3-VL's position table is read directly
    ref = str(ckpt(arch))
    logits = our_logits(load_model(out), reference_inputs(ref))
    assert cosine(logits, reference_logits(ref)) >= 0.95  # measured 0.977


def test_every_source_layout_converts(ckpt, tmp_path):
    ref = str(ckpt("qwen2_vl"))
    for layout, dialect in (("legacy_sharded", "flat44"), ("nested", "nested457")):
        out = convert(
            ckpt("qwen2_vl", layout=layout, dialect=dialect), tmp_path / layout, dtype="float32", progress=False
        )
        assert rel_err(our_logits(load_model(out), reference_inputs(ref)), reference_logits(ref)) < TOL


def test_existing_output_is_refused_without_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("keep.txt", "mine"), ("config.json", "{}"), ("model.safetensors", "")):
        (out / name).write_text(text)  # a previous output, as far as --force checks
    with pytest.raises(ConvertError, match="already exists.*--force"):
        convert(ckpt("qwen2_vl"), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert(ckpt("qwen2_vl"), out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing(ckpt, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        for name, text in (("keep.txt", "mine"), ("config.json", "{}"), ("model.safetensors", "")):
            (out / name).write_text(text)  # a previous output, as far as --force checks
    real_save = mx.save_safetensors

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)  # a file is half the output when Ctrl-C lands
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt("qwen2_vl"), out, force=existing, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt", "model.safetensors"]


def test_bad_sources_are_named(ckpt, tmp_path):
    config = json.loads((ckpt("qwen2_vl", dialect="flat44") / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt("qwen2_vl", dialect="flat44").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(
        LoadError,
        match=r"tensor \S+ has shape \(\d+, \d+\) in the checkpoint but config.json "
        r"implies \(\d+, \d+\)",
    ):
        convert(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    with pytest.raises(ConvertError, match="is the source checkpoint"):
        convert(bad, bad, force=True, progress=False)


def _cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "mlx_compact.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_converts(ckpt, tmp_path):
    out = tmp_path / "q8"
    run = _cli("convert", "--hf-path", ckpt("qwen3_vl"), "--mlx-path", out, "-q", "--q-bits", "8", "--dtype", "float32")
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    ref = str(ckpt("qwen3_vl"))
    assert rel_err(our_logits(load_model(out), reference_inputs(ref)), reference_logits(ref)) < 2e-2


def test_cli_errors_are_one_line_with_exit_code_2(ckpt, tmp_path):
    not_qwen = tmp_path / "not-qwen"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = [
        ((ckpt("qwen2_vl"), tmp_path), "already exists"),
        ((tmp_path / "missing", tmp_path / "o1"), "does not exist"),
        ((not_qwen, tmp_path / "o2"), "'llama' is not a supported Qwen-VL model"),
    ]
    for (src, dst), message in cases:
        run = _cli("convert", "--hf-path", src, "--mlx-path", dst)
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlx-compact convert: error:") and message in lines[0]
        assert "Traceback" not in run.stderr
