"""Qwen3-VL-MoE through the runtime, which reaches it only through the shared VLModel interface: generation,
compaction (post-merger and in-encoder), the fixed-size rotating cache (float and quantized), chat, and the
memory planner (every expert counted as resident, and said so); plus the README's memory figures for
Qwen3-VL-30B-A3B at 4 bit, computed by `mlx_compact.memory` on the model built lazily from its release config.
The references are the ones the dense models' tests use (full recomputation, masked full runs, a windowed
reference); parity with transformers itself is `test_moe.py`.
"""

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_compaction_e2e import PROMPT, check_masked_full, masked_tower
from test_runtime import LONG, teacher_forced_logits, windowed_reference
from tiny_checkpoints import MOE

from mlx_compact.cache import FixedKVCache
from mlx_compact.chat import ChatSession
from mlx_compact.compaction import Compaction, tower_hooks
from mlx_compact.generate import generate, image_patches, prepare
from mlx_compact.loader import load
from mlx_compact.memory import fmt_bytes, kv_bytes, moe_mlp_peak, plan, weights_bytes
from mlx_compact.models import build_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load(str(ckpt(MOE)))


@pytest.fixture(scope="module")
def full(loaded, images):
    model, proc = loaded
    return prepare(model, proc, PROMPT, images)


def test_generate_equals_full_recomputation(loaded, images):
    model, proc = loaded
    result = generate(model, proc, "describe both", images, max_tokens=10)
    inputs = proc(text=proc.build_prompt("describe both", n_images=2), images=images)
    ids, expected = [int(i) for i in inputs["input_ids"][0]], []
    pv, grid = mx.array(inputs["pixel_values"]), inputs["grid_thw"].tolist()
    for _ in range(10):
        tok = int(mx.argmax(model(mx.array([ids + expected]), pv, grid)[0, -1]).item())
        if tok in set(proc.eos_token_ids):
            break
        expected.append(tok)
    assert result.tokens == expected and len(expected) > 1


@pytest.mark.parametrize(
    "c,merged",
    [
        (Compaction("diversity", keep=0.5, proportional=False), False),
        (Compaction("merge", keep=0.5, proportional=False), True),
    ],
    ids=["diversity", "merge"],
)
def test_post_merger_compaction_equals_masked_full_run(loaded, full, images, c, merged):
    model, proc = loaded
    comp = prepare(model, proc, PROMPT, images, compaction=c)
    assert all(v["after"] < v["before"] for v in comp.visual_tokens)
    assert all(d.shape == comp.embeds.shape for d in comp.deepstack)  # DeepStack follows the kept tokens
    check_masked_full(model, full, comp, merged=merged)


def test_in_encoder_compaction_equals_masked_tower(loaded, full, images):
    model, proc = loaded
    c = Compaction("diversity", keep=0.5, where="encoder", encoder_layer=1)
    inputs = proc(text=proc.build_prompt(PROMPT, n_images=2), images=images)
    pv, grid = mx.array(inputs["pixel_values"]), [tuple(int(v) for v in g) for g in inputs["grid_thw"]]
    out = model.encode(pv, grid, **tower_hooks(model, c))
    ref, ref_ds = masked_tower(model.vision_tower, pv, grid, out.units, c.encoder_layer)
    np.testing.assert_allclose(np.array(out.features), np.array(ref), atol=1e-4 * float(mx.abs(ref).max()))
    for d, r in zip(out.deepstack, ref_ds, strict=True):
        np.testing.assert_allclose(np.array(d), np.array(r), atol=1e-4 * float(mx.abs(r).max()))
    comp = prepare(model, proc, PROMPT, images, compaction=c)
    np.testing.assert_array_equal(np.array(comp.positions)[:, 0], np.array(full.positions)[:, 0][:, comp.kept])


def _pin(model, ids) -> int:
    """Through the last visual block: what the runtime pins in a fixed-size cache."""
    return max(i for i, t in enumerate(ids) if t == model.config.vision_end_token_id) + 1


def test_rotating_cache_equals_pinned_window_reference_across_wraparound(loaded, image_wide):
    model, proc = loaded
    prep = prepare(model, proc, LONG, [image_wide])
    size = prep.embeds.shape[1] // 2 + 40
    cache = [FixedKVCache(size, max_chunk=16) for _ in model.layers]  # small chunks: the prompt itself slides
    tokens = [int(t) for t in np.random.default_rng(0).integers(10, 200, 24)]
    pin = _pin(model, prep.input_ids)
    ours = teacher_forced_logits(model, prep, cache, tokens, pin, step=16)
    assert cache[0].offset > cache[0].max_tokens, "the test must wrap the ring"
    ref = windowed_reference(model, prep, tokens, pin, cache[0].window)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())


def test_quantized_kv_cache_agrees_with_float(loaded, image_wide):
    model, proc = loaded
    prep = prepare(model, proc, "what is in the picture", [image_wide])
    gen = [int(t) for t in np.random.default_rng(1).integers(10, 300, 128)]
    ref = teacher_forced_logits(model, prep, [FixedKVCache(512) for _ in model.layers], gen)
    q = teacher_forced_logits(model, prep, [FixedKVCache(512, bits=8, group_size=32) for _ in model.layers], gen)
    assert (ref.argmax(-1) == q.argmax(-1)).mean() >= 0.95  # measured 0.99


def test_follow_up_turn_reuses_the_cache_and_equals_full_recomputation(loaded, image_wide):
    model, proc = loaded
    chat = ChatSession(model, proc)
    first = chat.ask("what is this", [image_wide], max_tokens=6)
    turn2 = chat.turn_text("and the colour?")
    second = chat.ask("and the colour?", max_tokens=6)
    assert second.stats["visual_tokens"] == []  # the image is not encoded again
    inputs = proc(text=proc.build_prompt("what is this", n_images=1), images=[image_wide])
    closed = turn2.startswith("\n")  # the first answer's <|im_end|> is in the cache already
    history = [int(i) for i in inputs["input_ids"][0]] + first.tokens
    history += [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")] if closed else []
    history += proc.tokenizer(turn2, add_special_tokens=False)["input_ids"]
    pv, grid = mx.array(inputs["pixel_values"]), inputs["grid_thw"].tolist()
    expected = []
    for _ in range(len(second.tokens)):
        expected.append(int(mx.argmax(model(mx.array([history + expected]), pv, grid)[0, -1]).item()))
    assert second.tokens == expected and expected


def test_plan_counts_every_expert_and_says_so(loaded, images):
    model, proc = loaded
    t = model.config.text
    expert_bytes = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".switch_mlp." in k)
    assert expert_bytes == t.sparse_layers * 3 * t.num_experts * t.moe_intermediate_size * t.hidden_size * 4
    p = plan(model, image_patches(proc, images), 20)
    assert p.weights == weights_bytes(model) == 4 * sum(v.size for _, v in tree_flatten(model.parameters()))
    assert p.notes == [
        "all 6 experts resident in each of the 2 MoE layers (2 active per token): the weights count every expert"
    ]
    assert p.summary().splitlines()[-1].strip() == "note: " + p.notes[0]
    assert p.prefill >= moe_mlp_peak(t, 20 + sum(p.visual_tokens), 4)  # the whole prompt is one prefill chunk


def test_cli_plan_prints_the_expert_note(ckpt, image_wide, tmp_path, capsys):
    from mlx_compact.cli import main

    image_wide.save(tmp_path / "wide.png")
    assert main(["plan", "--model", str(ckpt(MOE)), "--image", str(tmp_path / "wide.png")]) == 0
    assert "note: all 6 experts resident in each of the 2 MoE layers" in capsys.readouterr().out


# ---------------------------------------------------------------- Qwen3-VL-30B-A3B, for the README

QWEN3_VL_30B_A3B = {  # the release config.json, less what sizes nothing
    "model_type": "qwen3_vl_moe",
    "tie_word_embeddings": False,
    "text_config": {
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
    },
    "vision_config": {
        "depth": 27,
        "hidden_size": 1152,
        "num_heads": 16,
        "intermediate_size": 4304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
        "hidden_act": "gelu_pytorch_tanh",
    },
}


def test_readme_states_the_30b_a3b_memory_the_planner_computes():
    """Built lazily (nothing is allocated), bfloat16, quantized as mlx-vlm's converter does (4-bit groups of 64
    for the LLM, routers included; the vision tower float), planned for a Mac (fused attention)."""
    model = build_model(QWEN3_VL_30B_A3B)
    model.set_dtype(mx.bfloat16)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    experts = sum(v.size for k, v in tree_flatten(model.parameters()) if ".switch_mlp." in k)
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.startswith("vision_tower"),
    )
    one_image = plan(model, [60 * 34 * 4], 20, max_tokens=512, fused=True)  # 1920x1080 -> 60 x 34 merged tokens
    text = (ROOT / "README.md").read_text()
    figures = {
        "parameters": f"{params / 1e9:.1f}B parameters, {experts / 1e9:.1f}B of them in the experts",
        "weights": f"{fmt_bytes(weights_bytes(model))} of weights",
        "kv": f"{kv_bytes(model.config.text, 1, 2) // 1024} KiB of KV cache per token",
        "plan": f"a 512-token answer plan at {fmt_bytes(one_image.peak)}",
    }
    for name, figure in figures.items():
        assert figure in re.sub(r"\s+", " ", text), f"README's {name}: expected '{figure}'"
