"""Qwen3-VL-MoE: stage-by-stage parity with transformers (torch CPU, fp32) on tiny random checkpoints, in
both expert layouts (transformers-5 [E, 2I, H] and the Qwen release [E, H, 2I]) and both config.json dialects
(transformers 5: num_local_experts, rope_parameters; the release: num_experts, rope_scaling + rope_theta);
the expert orientation decided when shapes alone cannot tell; config validation of the MoE fields.

The reference is transformers on the transformers-5 save; every variant holds the same seeded weights.
Measured (max |ours - transformers| / max |transformers|): vision features 8.6e-7, DeepStack 7.7e-7 / 9.5e-7,
logits with two images 1.0e-6 and with a video 1.2e-6 to 1.4e-6 (both layouts), greedy decoding with a
16-token prefill step equal to transformers' generate.
"""

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_loader import copy_checkpoint
from test_parity import pixel_rows, prompt_ids, rel_err, run_reference
from tiny_checkpoints import MOE, MOE_SIZES, load_reference

import mlx_compact  # noqa: F401  (preloads BLAS before mlx)
from mlx_compact.generate import make_cache, prefill, prepare_ids
from mlx_compact.loader import LoadError, load_model
from mlx_compact.models import build_model
from mlx_compact.models import qwen3_vl_moe as moe_module
from mlx_compact.models.config import ConfigError
from mlx_compact.models.qwen3_vl_moe import SparseMoeBlock, grouped_switch_glu

TOL = 1e-4
VARIANTS = [(layout, dialect) for layout in ("default", "release") for dialect in ("default", "release")]
IMAGES = [(1, 6, 10), (1, 8, 4)]  # patches; non-square, different sizes


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_reference(ckpt(MOE))


@pytest.fixture(scope="module")
def ours(ckpt):
    """`ours(layout, dialect) -> model`, loaded once per variant."""
    done = {}

    def get(layout="default", dialect="default"):
        if (layout, dialect) not in done:
            done[layout, dialect] = load_model(ckpt(MOE, layout=layout, dialect=dialect))
        return done[layout, dialect]

    return get


@pytest.fixture(scope="module")
def cfg(ckpt):
    return json.loads((ckpt(MOE) / "config.json").read_text())


def router_gap(ref, run) -> float:
    """The smallest gap between the k-th and (k+1)-th router logit over every token and MoE layer of ``run()``:
    a near-tie could pick other experts on float32 rounding alone, so the tests' inputs must stay clear of it."""
    gaps, hooks = [], []
    for layer in ref.model.language_model.layers:
        if hasattr(layer.mlp, "gate"):
            k = layer.mlp.gate.top_k

            def hook(module, args, out, k=k):
                top = torch.topk(out[0], k + 1, dim=-1).values
                gaps.append(float((top[:, k - 1] - top[:, k]).min()))

            hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return min(gaps)


def two_image_inputs(cfg, seed=2):
    rng = np.random.default_rng(seed)
    pv = pixel_rows(rng, IMAGES, cfg)
    ids = prompt_ids(cfg, [(cfg["image_token_id"], 15), (cfg["image_token_id"], 8)], rng)
    return ids, pv


# ---------------------------------------------------------------- stages


def test_sparse_layers_follow_the_config(ours):
    model = ours()
    kinds = [type(layer.mlp) is SparseMoeBlock for layer in model.layers]
    assert kinds == [True, False, True]  # mlp_only_layers [1]
    moe = model.layers[0].mlp
    assert moe.switch_mlp.gate_proj.weight.shape == (6, 64, 96) and moe.switch_mlp.down_proj.weight.shape == (6, 96, 64)


@pytest.mark.parametrize("path", ["switch", "grouped"])
def test_moe_block_matches_transformers(ours, ref, monkeypatch, path):
    """Both expert paths: mlx-lm's SwitchGLU (decode, Metal) and the CPU's grouped one (long chunks)."""
    monkeypatch.setattr(moe_module, "GROUPED_MIN_ROWS", 1 if path == "grouped" else 10**9)
    x = np.random.default_rng(5).standard_normal((1, 37, MOE_SIZES["odd"]["hidden_size"])).astype(np.float32)
    block = ref.model.language_model.layers[0].mlp
    with torch.no_grad():
        theirs = block(torch.tensor(x)).numpy()
    assert rel_err(ours().layers[0].mlp(mx.array(x)), theirs) < TOL, "MoE block"


@pytest.mark.parametrize("quantized", [False, True])
def test_grouped_experts_equal_switch_glu(ours, quantized):
    """`grouped_switch_glu` gives SwitchGLU's output ([B, L, k, D], same (token, slot) order), float or quantized."""
    import mlx.nn as nn

    block = copy.deepcopy(ours().layers[0].mlp)
    if quantized:
        nn.quantize(block, group_size=32, bits=4)
    x = mx.array(np.random.default_rng(6).standard_normal((2, 41, MOE_SIZES["odd"]["hidden_size"])).astype(np.float32))
    experts = mx.argpartition(-block.gate(x), kth=1, axis=-1)[..., :2]
    a, b = block.switch_mlp(x, experts), grouped_switch_glu(block.switch_mlp, x, experts)
    assert a.shape == b.shape == (2, 41, 2, MOE_SIZES["odd"]["hidden_size"])
    assert rel_err(b, a) < 1e-6


def test_vision_features_and_deepstack_match(ours, ref, cfg):
    pv = pixel_rows(np.random.default_rng(0), IMAGES, cfg)
    out = ours().encode(mx.array(pv), IMAGES)
    with torch.no_grad():
        theirs = ref.model.visual(torch.tensor(pv), grid_thw=torch.tensor(IMAGES))
    assert rel_err(out.features, theirs.pooler_output) < TOL, "vision features"
    assert len(out.deepstack) == len(theirs.deepstack_features) == 2
    for i, d in enumerate(theirs.deepstack_features):
        assert rel_err(out.deepstack[i], d) < TOL, f"DeepStack feature {i}"


def test_position_ids_match_for_images_and_a_video(ours, ref, cfg):
    rng = np.random.default_rng(1)
    vgrid = [(2, 4, 6)]
    blocks = [(cfg["video_token_id"], 6), (cfg["video_token_id"], 6)] + [(cfg["image_token_id"], n) for n in (15, 8)]
    ids = prompt_ids(cfg, blocks, rng)
    positions, delta = ours().positions(ids, IMAGES, vgrid)
    kinds = torch.tensor([ids])
    kinds = (kinds == cfg["image_token_id"]).long() + 2 * (kinds == cfg["video_token_id"]).long()
    theirs, their_delta = ref.model.get_rope_index(
        torch.tensor([ids]), kinds, torch.tensor(IMAGES), torch.tensor(vgrid)
    )
    np.testing.assert_array_equal(np.array(positions), theirs[:, 0].numpy(), err_msg="position ids")
    assert delta == int(their_delta.reshape(-1)[0])


@pytest.mark.parametrize("layout,dialect", VARIANTS)
def test_logits_match_with_two_images(ours, ref, cfg, layout, dialect):
    model = ours(layout, dialect)
    ids, pv = two_image_inputs(cfg)
    logits = np.array(model(mx.array([ids]), mx.array(pv), IMAGES))
    positions, _ = model.positions(ids, IMAGES)
    visual = dict(pixel_values=pv, image_grid_thw=IMAGES)
    assert router_gap(ref, lambda: run_reference(ref, ids, cfg, positions, **visual)) > 1e-4
    assert rel_err(logits, run_reference(ref, ids, cfg, positions, **visual)) < TOL, "logits"


@pytest.mark.parametrize("layout,dialect", VARIANTS)
def test_logits_match_with_a_video_and_an_image(ours, ref, cfg, layout, dialect):
    model = ours(layout, dialect)
    rng = np.random.default_rng(3)
    vgrid, igrid = [(2, 4, 6)], [(1, 4, 4)]
    pvv, pvi = pixel_rows(rng, vgrid, cfg), pixel_rows(rng, igrid, cfg)
    blocks = [(cfg["video_token_id"], 6), (cfg["video_token_id"], 6), (cfg["image_token_id"], 4)]  # a block per frame
    ids = prompt_ids(cfg, blocks, rng)
    logits = np.array(
        model(mx.array([ids]), mx.array(pvi), igrid, pixel_values_videos=mx.array(pvv), video_grid_thw=vgrid)
    )
    positions, _ = model.positions(ids, igrid, vgrid)
    visual = dict(pixel_values=pvi, image_grid_thw=igrid, pixel_values_videos=pvv, video_grid_thw=vgrid)
    assert router_gap(ref, lambda: run_reference(ref, ids, cfg, positions, **visual)) > 1e-4
    assert rel_err(logits, run_reference(ref, ids, cfg, positions, **visual)) < TOL, "logits with video"


def test_text_only_logits_match(ours, ref, cfg):
    ids = [int(i) for i in np.random.default_rng(4).integers(10, 200, 17)]
    logits = np.array(ours()(mx.array([ids])))
    assert rel_err(logits, run_reference(ref, ids, cfg, [list(range(len(ids)))] * 3)) < TOL


def test_greedy_decoding_with_chunked_prefill_equals_transformers(ours, ref, cfg):
    model = ours("release", "release")
    ids, pv = two_image_inputs(cfg, seed=6)
    n = 12
    kinds = (torch.tensor([ids]) == cfg["image_token_id"]).long()
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(IMAGES),
            mm_token_type_ids=kinds,
            max_new_tokens=n,
            do_sample=False,
        )
    expected = out[0, len(ids) :].tolist()
    eos = set(ref.generation_config.eos_token_id)

    prep = prepare_ids(model, ids, pv, IMAGES)
    step = 16
    assert len(ids) > 2 * step  # three prefill chunks, the first cut inside the first image
    cache = make_cache(model)
    logits = prefill(model, prep, cache, step)
    embed, pos, tokens = model.language_model.model.embed_tokens, int(prep.positions.max().item()) + 1, []
    while len(tokens) < n:
        tokens.append(int(mx.argmax(logits[0]).item()))
        if tokens[-1] in eos:
            break
        step_pos = mx.full((3, 1, 1), pos, mx.int32)
        logits = model.language_model(embed(mx.array([[tokens[-1]]])), step_pos, cache=cache)[:, -1]
        pos += 1
    assert tokens == expected and len(set(tokens)) > 1


# ---------------------------------------------------------------- expert layouts


@pytest.mark.parametrize("layout", ["default", "release", "sharded"])
def test_h_equal_2i_is_decided_by_down_proj(ckpt, layout):
    """H == 2I: gate_up [E, H, H] fits both orientations; down_proj ([E, H, I] or [E, I, H]) decides."""
    ref_path = ckpt(MOE, moe="h2i")
    ref = load_reference(ref_path)  # the transformers-5 save: no transposition needed, so transformers is right
    model = load_model(ckpt(MOE, moe="h2i", layout=layout))
    assert [type(layer.mlp) is SparseMoeBlock for layer in model.layers] == [False, True, False, True]  # step 2
    ids = [int(i) for i in np.random.default_rng(7).integers(10, 200, 23)]
    cfg = json.loads((ref_path / "config.json").read_text())
    assert rel_err(np.array(model(mx.array([ids]))), run_reference(ref, ids, cfg, [list(range(len(ids)))] * 3)) < TOL


def _edited(src, dst, edit):
    path = copy_checkpoint(src, dst)
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_undecidable_or_mixed_expert_layouts_are_refused_in_one_line(ckpt, tmp_path):
    down = [f"model.language_model.layers.{i}.mlp.experts.down_proj" for i in (1, 3)]
    only_gate_up = _edited(
        ckpt(MOE, moe="h2i", layout="release"), tmp_path / "undecidable", lambda s: [s.pop(k) for k in down]
    )
    with pytest.raises(
        LoadError,
        match=r"layout cannot be told from their shapes \(hidden_size 64 = 2 x "
        r"moe_intermediate_size 32 and no down_proj",
    ) as e:
        load_model(only_gate_up)
    assert "\n" not in str(e.value)
    key = "model.language_model.layers.2.mlp.experts.down_proj"
    mixed = _edited(
        ckpt(MOE, layout="release"),
        tmp_path / "mixed",
        lambda s: s.update({key: np.ascontiguousarray(s[key].transpose(0, 2, 1))}),
    )
    with pytest.raises(LoadError, match="are in different expert layouts"):
        load_model(mixed)
    key = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    wrong = _edited(ckpt(MOE), tmp_path / "wrong", lambda s: s.update({key: s[key][:, :100]}))
    with pytest.raises(
        LoadError,
        match=r"layers\.0\.mlp\.experts\.gate_up_proj has shape \(6, 100, 96\); for "
        r"hidden_size 96 and moe_intermediate_size 64 expected \[experts, 128, 96\]",
    ):
        load_model(wrong)


# ---------------------------------------------------------------- config validation


def _mutated(raw: dict, key: str, value, delete=False) -> dict:
    raw = copy.deepcopy(raw)
    scope = raw["text_config"]
    if delete:
        scope.pop(key)
    else:
        scope[key] = value
    return raw


@pytest.mark.parametrize("dialect,experts_key", [("default", "num_local_experts"), ("release", "num_experts")])
def test_both_dialects_give_the_same_config(ckpt, dialect, experts_key):
    raw = json.loads((ckpt(MOE, dialect=dialect) / "config.json").read_text())
    assert experts_key in raw["text_config"]
    t = build_model(raw).config.text
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.mlp_only_layers) == (6, 2, 64, (1,))
    assert (t.rope_theta, t.mrope_section, t.mrope_interleaved, t.tie_word_embeddings) == (5e6, (6, 5, 5), True, False)


BAD = [
    ("num_local_experts", 0, "a whole number from 1 to 1024"),
    ("num_local_experts", 1025, "a whole number from 1 to 1024"),
    ("num_local_experts", True, "a whole number from 1 to 1024"),
    ("num_local_experts", 4.0, "a whole number from 1 to 1024"),
    ("num_local_experts", "8", "a whole number from 1 to 1024"),
    ("num_experts_per_tok", 0, "a whole number from 1 to 6"),
    ("num_experts_per_tok", 7, "a whole number from 1 to 6"),
    ("moe_intermediate_size", 0, "a whole number from 1 to 262144"),
    ("moe_intermediate_size", 10**6, "a whole number from 1 to 262144"),
    ("decoder_sparse_step", 0, "a whole number from 1 to 1024"),
    ("mlp_only_layers", [3], "a list of distinct block indexes from 0 to 2"),
    ("mlp_only_layers", [0, 0], "a list of distinct block indexes from 0 to 2"),
    ("mlp_only_layers", "1", "a list of distinct block indexes from 0 to 2"),
    ("num_experts", 4, "text_config.num_local_experts is 6; expected the same as text_config.num_experts = 4"),
]


@pytest.mark.parametrize("key,value,expected", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_moe_fields_are_one_line_config_errors_naming_the_field(cfg, key, value, expected):
    with pytest.raises(ConfigError) as e:
        build_model(_mutated(cfg, key, value))
    message = str(e.value)
    assert "\n" not in message and f"text_config.{key}" in message
    assert expected in message


def test_absent_expert_count_and_accepted_variations(cfg):
    with pytest.raises(ConfigError, match="lacks the language-model key 'num_experts' \\(or 'num_local_experts'\\)"):
        build_model(_mutated(cfg, "num_local_experts", None, delete=True))
    relaxed = _mutated(_mutated(cfg, "mlp_only_layers", None), "num_experts", 6)  # null = none; both names agree
    relaxed["text_config"].pop("decoder_sparse_step")  # transformers' default: 1
    relaxed["text_config"]["norm_topk_prob"] = False  # not read: transformers always renormalises
    t = build_model(relaxed).config.text
    assert t.sparse_layers == 3 and t.mlp_only_layers == () and t.decoder_sparse_step == 1
