"""Qwen3.5 and Qwen3.5-MoE (the Gated DeltaNet hybrids): parity with transformers (torch CPU, fp32) on tiny
random checkpoints (`tiny_hybrid`: 4 LLM layers of both kinds, odd sizes, Hk != Hv, dk != dv, every parameter
off its init), in both layouts and dialects and a tied transformers-5 save; and the hybrid cache.

The reference is transformers on its own save; its float32 and float64 logits are compared first, so a
failure of ours cannot be float32 rounding that the random hybrid amplifies.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_parity import pixel_rows, prompt_ids, rel_err, run_reference
from tiny_hybrid import DENSE, HYBRIDS, MOE, load_reference, make_checkpoint

import mlx_compact  # noqa: F401  (preloads BLAS before mlx)
from mlx_compact.cache import FixedKVCache, KVCache, LinearCache
from mlx_compact.generate import _trim, make_cache, prefill, prepare_ids
from mlx_compact.loader import load_model
from mlx_compact.models import build_model
from mlx_compact.models.language import attention_cache

TOL = 1e-4
IMAGES = [(1, 6, 10), (1, 8, 4)]  # patches; non-square, different sizes
VARIANTS = [("default", "default", False), ("release", "release", False), ("default", "default", True)]


@pytest.fixture(scope="session")
def hybrid(tmp_path_factory):
    """`hybrid(arch, layout, dialect, tie) -> path`, built once per session."""
    done = {}

    def get(arch, layout="default", dialect="default", tie=False):
        key = (arch, layout, dialect, tie)
        if key not in done:
            path = tmp_path_factory.mktemp(f"{arch}-{layout}-{dialect}-{tie}")
            done[key] = make_checkpoint(arch, path, layout=layout, dialect=dialect, tie_word_embeddings=tie)
        return done[key]

    return get


@pytest.fixture(scope="module")
def models(hybrid):
    """`models(arch, layout, dialect, tie) -> (ours, transformers float32, raw config)`, loaded once."""
    done = {}

    def get(arch, layout="default", dialect="default", tie=False):
        key = (arch, layout, dialect, tie)
        if key not in done:
            ref_key = (arch, "default", "default", tie)  # the reference: transformers on its own save
            ref = done[ref_key][1] if ref_key in done else load_reference(hybrid(*ref_key))
            path = hybrid(*key)
            done[key] = load_model(path), ref, json.loads((path / "config.json").read_text())
        return done[key]

    return get


def image_prompt(cfg, seed=2):
    rng = np.random.default_rng(seed)
    pv = pixel_rows(rng, IMAGES, cfg)
    ids = prompt_ids(cfg, [(cfg["image_token_id"], 15), (cfg["image_token_id"], 8)], rng, text=14)
    assert len(ids) > 64  # more than one of transformers' 64-token delta-rule chunks
    return ids, pv


def router_gap(ref, run) -> float:
    """The smallest gap between the k-th and (k+1)-th router logit of every MoE layer while ``run()`` runs
    (inf for a dense model): a near-tie could route differently on rounding alone."""
    gaps, hooks = [float("inf")], []
    for layer in ref.model.language_model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):

            def hook(module, args, out, k=gate.top_k):
                top = torch.topk(args[0] @ module.weight.T, k + 1, dim=-1).values
                gaps.append(float((top[:, k - 1] - top[:, k]).min()))

            hooks.append(gate.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return min(gaps)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", HYBRIDS)
def test_layer_pattern_and_no_deepstack(models, arch):
    model, _, _ = models(arch)
    assert model.layer_types == ["linear_attention", "full_attention"] * 2
    assert ["linear_attn" in layer for layer in model.layers] == [True, False, True, False]
    assert not model.vision_tower.deepstack_merger_list
    t = model.config.text
    assert (t.rotary_dim, t.mrope_section, t.rope_theta) == (16, (3, 3, 2), 1e7)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_vision_features_match(models, arch):
    model, ref, cfg = models(arch)
    pv = pixel_rows(np.random.default_rng(0), IMAGES, cfg)
    out = model.encode(mx.array(pv), IMAGES)
    with torch.no_grad():
        theirs = ref.model.visual(torch.tensor(pv), grid_thw=torch.tensor(IMAGES)).pooler_output
    assert out.deepstack == []
    assert rel_err(out.features, theirs) < TOL, "vision features"


@pytest.mark.parametrize("arch", HYBRIDS)
def test_position_ids_match_for_images_and_a_video(models, arch):
    model, ref, cfg = models(arch)
    vgrid = [(2, 4, 6)]
    blocks = [(cfg["video_token_id"], 6), (cfg["video_token_id"], 6)] + [(cfg["image_token_id"], n) for n in (15, 8)]
    ids = prompt_ids(cfg, blocks, np.random.default_rng(1))
    positions, delta = model.positions(ids, IMAGES, vgrid)
    kinds = torch.tensor([ids])
    kinds = (kinds == cfg["image_token_id"]).long() + 2 * (kinds == cfg["video_token_id"]).long()
    theirs, their_delta = ref.model.get_rope_index(
        torch.tensor([ids]), kinds, torch.tensor(IMAGES), torch.tensor(vgrid)
    )
    np.testing.assert_array_equal(np.array(positions), theirs[:, 0].numpy(), err_msg="position ids")
    assert delta == int(their_delta.reshape(-1)[0])


@pytest.mark.parametrize("arch", HYBRIDS)
def test_transformers_float32_agrees_with_float64_far_inside_the_tolerance(models, hybrid, arch):
    """The conditioning works: transformers' own float32 rounding is far below the 1e-4 the port is held to."""
    model, ref, cfg = models(arch)
    ids, pv = image_prompt(cfg)
    positions, _ = model.positions(ids, IMAGES)
    f32 = run_reference(ref, ids, cfg, positions, pixel_values=pv, image_grid_thw=IMAGES)
    f64 = run_reference(
        load_reference(hybrid(arch), torch.float64), ids, cfg, positions, pixel_values=pv.astype(np.float64),
        image_grid_thw=IMAGES,
    )  # fmt: skip
    assert rel_err(f32, f64) < 1e-5
    assert rel_err(np.array(model(mx.array([ids]), mx.array(pv), IMAGES)), f64) < TOL


@pytest.mark.parametrize("layout,dialect,tie", VARIANTS, ids=["transformers5", "release", "tied-transformers5"])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_logits_match_with_two_images(models, arch, layout, dialect, tie):
    model, ref, cfg = models(arch, layout, dialect, tie)
    assert model.config.text.tie_word_embeddings == tie
    ids, pv = image_prompt(cfg)
    logits = np.array(model(mx.array([ids]), mx.array(pv), IMAGES))
    positions, _ = model.positions(ids, IMAGES)
    visual = dict(pixel_values=pv, image_grid_thw=IMAGES)
    assert router_gap(ref, lambda: run_reference(ref, ids, cfg, positions, **visual)) > 1e-3
    assert rel_err(logits, run_reference(ref, ids, cfg, positions, **visual)) < TOL, "logits"


@pytest.mark.parametrize("layout,dialect", [("default", "default"), ("release", "release")])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_logits_match_with_a_video_and_an_image(models, arch, layout, dialect):
    model, ref, cfg = models(arch, layout, dialect)
    rng = np.random.default_rng(3)
    vgrid, igrid = [(2, 4, 6)], [(1, 4, 4)]
    pvv, pvi = pixel_rows(rng, vgrid, cfg), pixel_rows(rng, igrid, cfg)
    blocks = [(cfg["video_token_id"], 6), (cfg["video_token_id"], 6), (cfg["image_token_id"], 4)]  # a block per frame
    ids = prompt_ids(cfg, blocks, rng, text=14)
    logits = np.array(
        model(mx.array([ids]), mx.array(pvi), igrid, pixel_values_videos=mx.array(pvv), video_grid_thw=vgrid)
    )
    positions, _ = model.positions(ids, igrid, vgrid)
    visual = dict(pixel_values=pvi, image_grid_thw=igrid, pixel_values_videos=pvv, video_grid_thw=vgrid)
    assert router_gap(ref, lambda: run_reference(ref, ids, cfg, positions, **visual)) > 1e-3
    assert rel_err(logits, run_reference(ref, ids, cfg, positions, **visual)) < TOL, "logits with video"


def greedy(model, prep, n, step=512, cache=None, eos=()):
    """Greedy decode of ``n`` tokens through the runtime's prefill and one-token steps."""
    cache = make_cache(model) if cache is None else cache
    logits = prefill(model, prep, cache, step)
    embed, pos, tokens = model.language_model.model.embed_tokens, int(prep.positions.max().item()) + 1, []
    while len(tokens) < n:
        tokens.append(int(mx.argmax(logits[0]).item()))
        if tokens[-1] in eos:
            break
        step_pos = mx.full((3, 1, 1), pos, mx.int32)
        logits = model.language_model(embed(mx.array([[tokens[-1]]])), step_pos, cache=cache)[:, -1]
        pos += 1
    return tokens


@pytest.mark.parametrize("arch", HYBRIDS)
def test_greedy_decoding_equals_transformers_with_one_prefill_and_in_chunks(models, arch):
    model, ref, cfg = models(arch, "release", "release")
    ids, pv = image_prompt(cfg, seed=6)
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
    assert len(ids) > 3 * 16  # chunks of 16: the conv and recurrent states cross four chunk borders
    assert greedy(model, prep, n, eos=eos) == expected
    assert greedy(model, prep, n, step=16, eos=eos) == expected
    assert len(set(expected)) > 1


# ---------------------------------------------------------------- the hybrid cache


@pytest.mark.parametrize("arch", HYBRIDS)
def test_cached_decoding_equals_uncached_token_for_token(models, arch):
    model, _, cfg = models(arch)
    ids, pv = image_prompt(cfg, seed=7)
    prep = prepare_ids(model, ids, pv, IMAGES)
    tokens = greedy(model, prep, 10, step=13)
    lm, embeds = model.language_model, prep.embeds
    pos = int(prep.positions.max().item()) + 1
    positions = prep.positions
    for i, t in enumerate(tokens):  # teacher forcing without a cache: the whole sequence each time
        logits = lm(embeds, positions)
        assert int(mx.argmax(logits[0, -1]).item()) == t, f"token {i}"
        embeds = mx.concatenate([embeds, lm.model.embed_tokens(mx.array([[t]]))], axis=1)
        positions = mx.concatenate([positions, mx.full((3, 1, 1), pos + i, mx.int32)], axis=2)


def test_the_cache_is_model_owned_and_hybrid(models):
    model, _, _ = models(DENSE)
    for kw, kind in [({}, KVCache), ({"max_kv_size": 64}, FixedKVCache), ({"max_kv_size": 64, "kv_bits": 8}, None)]:
        cache = make_cache(model, **kw)
        assert [type(c) for c in cache][::2] == [LinearCache, LinearCache]
        assert all(type(c) is FixedKVCache if kind is None else type(c) is kind for c in cache[1::2])
        assert attention_cache(cache) is cache[1]
    cache = make_cache(model)
    ids, pv = image_prompt(models(DENSE)[2])
    prefill(model, prepare_ids(model, ids, pv, IMAGES), cache, 16)
    t = model.config.text
    conv, rec = cache[0].state
    C = 2 * t.linear_num_key_heads * t.linear_key_head_dim + t.linear_num_value_heads * t.linear_value_head_dim
    assert conv.shape == (1, t.linear_conv_kernel_dim - 1, C) and conv.dtype == mx.float32
    assert rec.shape == (1, 4, 16, 24) and rec.dtype == mx.float32  # [B, Hv, dv, dk]
    assert cache[0].offset == cache[1].offset == len(ids) and cache[0].nbytes == conv.nbytes + rec.nbytes


def test_trimming_a_hybrid_cache_is_refused_and_changes_nothing(models):
    """A recurrent state cannot be un-applied: `_trim` trims no layer and says so (the token stays)."""
    model, _, cfg = models(DENSE)
    cache = make_cache(model)
    ids, pv = image_prompt(cfg)
    prefill(model, prepare_ids(model, ids, pv, IMAGES), cache)
    before = [c.offset for c in cache]
    assert not cache[0].is_trimmable() and cache[0].trim(1) == 0
    assert _trim(cache, 1) is False
    assert [c.offset for c in cache] == before


def masked_reference_logits(model, prep, tokens, pinned, window):
    """Logits of every decoded token from one uncached pass whose attention layers see what a fixed rotating
    cache holds (the pinned prefix and the `window` most recent tokens), and whose linear layers see every
    token: the hand-made reference of a fixed cache on a hybrid model."""
    lm = model.language_model
    ids_embeds = lm.model.embed_tokens(mx.array([tokens[:-1]]))
    embeds = mx.concatenate([prep.embeds, ids_embeds], axis=1)
    L0, L = prep.embeds.shape[1], embeds.shape[1]
    start = int(prep.positions.max().item()) + 1
    positions = mx.concatenate([prep.positions, mx.arange(start, start + L - L0)[None, None].astype(mx.int32) * mx.ones((3, 1, 1), mx.int32)], axis=2)  # fmt: skip
    q, k = np.arange(L)[:, None], np.arange(L)[None]
    mask = (k <= q) & ((k < pinned) | (k > q - window))  # [L, L]
    return np.array(lm(embeds, positions, mask=mx.array(mask))[0, L0 - 1 :])  # [1 + decoded, V]


@pytest.mark.parametrize("arch", HYBRIDS)
def test_fixed_rotating_cache_equals_the_hand_made_reference_across_wrap_around(models, arch):
    model, _, cfg = models(arch)
    ids, pv = image_prompt(cfg, seed=8)
    prep = prepare_ids(model, ids, pv, IMAGES)
    pinned, size, chunk = 20, 48, 8
    cache = [
        c if not isinstance(c, FixedKVCache) else FixedKVCache(size, max_chunk=chunk)
        for c in make_cache(model, max_kv_size=size)
    ]
    logits = prefill(model, prep, cache, step=chunk, pin=pinned)
    lm, embed = model.language_model, model.language_model.model.embed_tokens
    ours, tokens, pos = [np.array(logits[0])], [], int(prep.positions.max().item()) + 1
    for i in range(40):  # the ring wraps during the prompt already, and again while decoding
        tokens.append(int(np.argmax(ours[-1])))
        ours.append(
            np.array(lm(embed(mx.array([[tokens[-1]]])), mx.full((3, 1, 1), pos + i, mx.int32), cache=cache)[0, -1])
        )
    fixed = attention_cache(cache)
    assert fixed.offset > 2 * size and fixed.pinned == pinned
    reference = masked_reference_logits(model, prep, tokens + [0], pinned, fixed.window)
    assert rel_err(np.stack(ours), reference) < TOL


@pytest.mark.parametrize("arch", HYBRIDS)
def test_8_bit_kv_top1_agreement_over_256_steps(models, arch):
    model, _, cfg = models(arch)
    ids, pv = image_prompt(cfg, seed=9)
    prep = prepare_ids(model, ids, pv, IMAGES)
    float_tokens = greedy(model, prep, 256)
    cache = make_cache(model, max_kv_size=512, kv_bits=8)
    assert attention_cache(cache).bits == 8
    logits = prefill(model, prep, cache)
    lm, embed, pos = model.language_model, model.language_model.model.embed_tokens, int(prep.positions.max().item()) + 1
    agree = 0
    for i, t in enumerate(float_tokens):  # teacher-forced on the float cache's tokens
        agree += int(mx.argmax(logits[0]).item()) == t
        logits = lm(embed(mx.array([[t]])), mx.full((3, 1, 1), pos + i, mx.int32), cache=cache)[:, -1]
    assert agree / len(float_tokens) >= 0.99


# ---------------------------------------------------------------- config


def test_layer_pattern_falls_back_to_the_interval_and_ids_default_to_qwen35s(models):
    _, _, cfg = models(DENSE)
    raw = json.loads(json.dumps(cfg))
    raw["text_config"].pop("layer_types")
    raw["text_config"]["full_attention_interval"] = 4
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        raw.pop(k)
    raw["text_config"]["vocab_size"] = 248320
    c = build_model(raw).config
    assert c.text.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == (
        248056,
        248057,
        248053,
        248054,
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t, v: t.update(layer_types=["linear_attention"] * 4), "at least one full_attention layer"),
        (lambda t, v: t.update(layer_types=["full_attention"] * 3), "a list of 4 layer kinds"),
        (lambda t, v: t.update(linear_num_value_heads=3), "a multiple of linear_num_key_heads 2"),
        (lambda t, v: v.update(deepstack_visual_indexes=[0]), "has no DeepStack"),
        (lambda t, v: t["rope_parameters"].update(mrope_section=[4, 4, 4]), "the rotary size / 2 = 8"),
    ],
)
def test_bad_hybrid_fields_are_one_line_config_errors(models, edit, message):
    from mlx_compact.models.config import ConfigError

    raw = json.loads(json.dumps(models(DENSE)[2]))
    edit(raw["text_config"], raw["vision_config"])
    with pytest.raises(ConfigError, match=message) as e:
        build_model(raw)
    assert "\n" not in str(e.value)


def test_every_layout_and_dialect_gives_the_same_parameters(models):
    """Fused release experts and mtp.* (dropped) vs transformers' per-expert save: the same weights, the
    zero-centred norms shifted once."""
    from mlx.utils import tree_flatten

    a, _, _ = models(MOE)
    b, _, _ = models(MOE, "release", "release")
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]) for k in pa)
    assert a.layers[0].mlp.switch_mlp.gate_proj.weight.shape == (6, 40, 96)
    assert a.layers[0].linear_attn.conv1d.weight.shape == (160, 4, 1)


# ---------------------------------------------------------------- chat, convert


@pytest.fixture(scope="module")
def loaded(hybrid):
    """`loaded(arch) -> (model, processor)` through the public `load`."""
    from mlx_compact import load

    done = {}

    def get(arch):
        if arch not in done:
            done[arch] = load(hybrid(arch))
        return done[arch]

    return get


@pytest.mark.parametrize("settings", [{}, {"max_kv_size": 160}, {"max_kv_size": 160, "kv_bits": 8}])
def test_a_hybrid_chat_saved_and_loaded_continues_identically(loaded, image_wide, tmp_path, settings):
    from mlx_compact import ChatSession

    model, processor = loaded(DENSE)
    a = ChatSession(model, processor, **settings)
    a.ask("what is this?", [image_wide], max_tokens=6)
    a.ask("and the colours?", max_tokens=5)
    a.save(tmp_path / "s.safetensors")
    b = ChatSession(model, processor, **settings)
    b.load(tmp_path / "s.safetensors")
    assert [c.offset for c in b.cache] == [c.offset for c in a.cache]
    for i in (0, 2):  # the linear layers' state came back, not a fresh one
        assert all(mx.array_equal(x, y) for x, y in zip(b.cache[i].state, a.cache[i].state))
    assert b.ask("and then?", max_tokens=6).tokens == a.ask("and then?", max_tokens=6).tokens


def test_a_session_of_a_dense_model_is_refused_by_a_hybrid_chat(loaded, ckpt, image_wide, tmp_path):
    from mlx_compact import ChatSession, load
    from mlx_compact.cache import SessionError

    other = ChatSession(*load(ckpt("qwen3_vl")))
    other.ask("hi", max_tokens=2)
    other.save(tmp_path / "dense.safetensors")
    with pytest.raises(SessionError, match="saved with another model"):
        ChatSession(*loaded(DENSE)).load(tmp_path / "dense.safetensors")


@pytest.mark.parametrize("arch", HYBRIDS)
def test_convert_writes_the_mlx_community_layout_and_it_loads_back(models, hybrid, arch, tmp_path):
    from mlx.utils import tree_flatten

    from convert.convert import convert

    model, _, cfg = models(arch)
    out = convert(hybrid(arch, "release", "release"), tmp_path / "f32", dtype="float32", progress=False)
    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if "mtp" in k or k.startswith("model.")]
    assert weights["language_model.model.layers.0.linear_attn.conv1d.weight"].shape == (160, 4, 1)
    assert weights["vision_tower.patch_embed.proj.weight"].shape[-1] == 3
    raw = mx.load(str(hybrid(arch) / "model.safetensors"))
    for name in ("norm.weight", "layers.1.self_attn.q_norm.weight", "layers.0.input_layernorm.weight"):
        assert mx.allclose(weights["language_model.model." + name], raw["model.language_model." + name] + 1)
    assert mx.array_equal(  # the gated norm has a plain weight: not shifted
        weights["language_model.model.layers.0.linear_attn.norm.weight"],
        raw["model.language_model.layers.0.linear_attn.norm.weight"],
    )
    back = load_model(out)
    mine = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(v, mine[k]) for k, v in tree_flatten(back.parameters()))

    ids, pv = image_prompt(cfg)
    for bits in (4, 8):
        q = convert(hybrid(arch), tmp_path / f"q{bits}", dtype="float32", quantize=True, q_bits=bits, q_group_size=32)
        quantized = load_model(q)
        assert "scales" in quantized.layers[0].linear_attn.in_proj_qkv
        if arch == MOE:  # the routers stay float (as mlx-vlm reads them back)
            mlp = quantized.layers[0].mlp
            assert "scales" not in mlp.gate and "scales" not in mlp.shared_expert_gate
            assert "scales" in mlp.switch_mlp.gate_proj
        packed = dict(tree_flatten(quantized.parameters()))
        held = {  # the float model with each quantized weight replaced by what its bits hold
            k: mx.dequantize(v, packed[k[:-6] + "scales"], packed[k[:-6] + "biases"], 32, bits)
            if k[:-6] + "scales" in packed
            else v
            for k, v in packed.items()
            if not k.endswith(("scales", "biases")) or k[:-6] + "weight" not in packed
        }
        back.load_weights(list(held.items()))
        a = np.array(back(mx.array([ids]), mx.array(pv), IMAGES))
        b = np.array(quantized(mx.array([ids]), mx.array(pv), IMAGES))
        assert rel_err(b, a) < TOL, f"{bits}-bit"


@pytest.mark.parametrize("where", ["post", "encoder"])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_compaction_after_the_merger_and_in_the_encoder_runs_on_hybrids(loaded, images, arch, where):
    """The linear layers just see a shorter sequence: the run keeps about a third of the visual tokens and
    prefills the compact prompt (the full prompt less the dropped tokens)."""
    from mlx_compact import generate
    from mlx_compact.compaction import Compaction

    model, processor = loaded(arch)
    full = generate(model, processor, "what is here?", images, max_tokens=4)
    small = generate(
        model, processor, "what is here?", images, max_tokens=4, compaction=Compaction("diversity", 0.34, where=where)
    )
    kept = [v["after"] for v in small.stats["visual_tokens"]]
    before = [v["before"] for v in small.stats["visual_tokens"]]
    assert sum(kept) < sum(before) and all(k >= 1 for k in kept)
    assert small.stats["proportional"] == (where == "post")  # the key bias lives in the first attention layer
    assert small.stats["prompt_tokens"] == full.stats["prompt_tokens"] - sum(before) + sum(kept)
    assert len(small.tokens) == len(full.tokens) == 4


@pytest.mark.parametrize("arch", HYBRIDS)
def test_the_cli_generates_chats_and_plans_on_hybrids(hybrid, arch, tmp_path, image_wide, capsys, monkeypatch):
    import io
    import sys

    from mlx_compact import cli

    image_wide.save(tmp_path / "img.png")
    common = ["--model", hybrid(arch), "--image", tmp_path / "img.png"]
    runs = [
        (["generate", *common, "--prompt", "hi", "--max-tokens", "3", "--max-kv-tokens", "128", "--kv-bits", "8"], ""),
        (["chat", *common, "--max-tokens", "3"], f"hi\n/save {tmp_path / 's.safetensors'}\nmore\n"),
        (["plan", *common, "--prompt", "hi", "--max-kv-tokens", "256"], ""),
    ]
    for argv, stdin in runs:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = cli.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 0, (argv[0], err)
    assert (tmp_path / "s.safetensors").exists()


def test_bfloat16_keeps_a_log_in_float32_and_stays_close(models, hybrid):
    model, _, cfg = models(DENSE)
    half = load_model(hybrid(DENSE), dtype="bfloat16")
    gdn = half.layers[0].linear_attn
    assert gdn.A_log.dtype == mx.float32 and gdn.in_proj_qkv.weight.dtype == mx.bfloat16
    ids, pv = image_prompt(cfg)
    cache = make_cache(half)
    logits = prefill(half, prepare_ids(half, ids, pv, IMAGES), cache, 16)
    assert cache[0].recurrent.dtype == mx.float32 and cache[0].conv.dtype == mx.bfloat16
    reference = prefill(model, prepare_ids(model, ids, pv, IMAGES), make_cache(model), 16)
    assert rel_err(logits.astype(mx.float32), reference) < 0.05


def test_a_session_whose_linear_state_does_not_fit_the_model_is_refused(loaded, tmp_path):
    from mlx_compact import ChatSession
    from mlx_compact.cache import SessionError, read_cache_file

    model, processor = loaded(DENSE)
    a = ChatSession(model, processor)
    a.ask("hi", max_tokens=2)
    a.save(tmp_path / "s.safetensors")
    info = read_cache_file(tmp_path / "s.safetensors")
    assert info["linear_layers"] == [0, 2] and info["linear_state"] == ((1, 3, 160), (1, 4, 16, 24))
    arrays, meta = mx.load(str(tmp_path / "s.safetensors"), return_metadata=True)
    for i in (0, 2):  # a state of other sizes (another model's), consistent across its layers
        arrays[f"{i}.recurrent"] = mx.zeros((1, 4, 24, 16))
    mx.save_safetensors(str(tmp_path / "other.safetensors"), arrays, meta)
    b = ChatSession(model, processor)
    with pytest.raises(SessionError, match=r"linear states of layers \[0, 2\].*saved with another model"):
        b.load(tmp_path / "other.safetensors")
    assert b.turns == 0


@pytest.mark.parametrize("arch", HYBRIDS)
def test_a_video_through_the_runtime_on_hybrids(loaded, video_frames, arch):
    """A video goes in as one block per temporal slice (after its timestamp), as for Qwen3-VL."""
    from mlx_compact import generate

    model, processor = loaded(arch)
    r = generate(model, processor, "what happens?", videos=[video_frames], max_tokens=3)
    assert len(r.stats["visual_tokens"]) == 2 and len(r.tokens) == 3  # 4 frames = 2 temporal patches


@pytest.mark.parametrize("max_kv_size", [None, 256])
def test_the_server_reuses_a_hybrid_prefix_exactly(loaded, tmp_path, max_kv_size):
    """Prefix reuse continues a stored linear state: the same arrays and tokens as feeding every segment again."""
    pytest.importorskip("uvicorn")
    from test_serve import EXAMPLE, Recording, _run, _user

    from mlx_compact.serve.engine import Engine

    (tmp_path / "example.png").write_bytes(EXAMPLE.read_bytes())
    model, proc = loaded(DENSE)
    reused, fresh = (Engine(model, proc, prefix_cache=Recording(s), max_kv_size=max_kv_size) for s in (1 << 30, 0))
    convo = [_user("describe it", "example.png")]
    a1, _ = _run(reused, proc, convo, tmp_path, None)
    convo += [{"role": "assistant", "content": a1}, _user("and then?")]
    (a, sa), (b, sb) = (_run(engine, proc, convo, tmp_path, None) for engine in (reused, fresh))
    assert sa["cached_tokens"] > 0 and sb["cached_tokens"] == 0 and a == b and len(a) >= 5
    x, y = reused.prefix.seen[-1], fresh.prefix.seen[-1]
    assert isinstance(x[0], LinearCache) and x.offset == y.offset
    for cx, cy in zip(x, y):
        for u, v in zip(cx.state, cy.state):
            u, v = (u if isinstance(u, tuple) else (u,)), (v if isinstance(v, tuple) else (v,))
            assert all(mx.array_equal(p, q).item() for p, q in zip(u, v))


def test_the_norm_shift_is_decided_once_per_checkpoint(models, hybrid):
    """Hugging Face names or a [C, 1, K] conv1d mark a raw checkpoint (norms + 1, as mlx-vlm decides);
    mlx-community's names with a [C, K, 1] conv1d are taken as they are, mtp.* tensors beside them or not."""
    from mlx.utils import tree_flatten

    model, _, _ = models(DENSE)
    ours = dict(tree_flatten(model.parameters()))  # mlx-community's layout: what convert writes
    norm, conv = "language_model.model.norm.weight", "language_model.model.layers.0.linear_attn.conv1d.weight"
    assert mx.array_equal(model.sanitize(dict(ours))[norm], ours[norm])
    unconverted = {**ours, conv: ours[conv].swapaxes(1, 2)}  # mlx names, conv1d still [C, 1, K]
    out = model.sanitize(unconverted)
    assert mx.array_equal(out[norm], ours[norm] + 1) and out[conv].shape == (160, 4, 1)
    with_mtp = {**ours, "mtp.norm.weight": mx.zeros((96,))}
    out = model.sanitize(with_mtp)
    assert "mtp.norm.weight" not in out and mx.array_equal(out[norm], ours[norm])


def test_the_conv_state_keeps_only_its_own_rows():
    from mlx_compact.models.language import causal_conv

    x, w = mx.random.normal((1, 512, 256)), mx.random.normal((256, 4, 1))  # [B, L, C], [C, K, 1]
    mx.eval(x, w)
    before = mx.get_active_memory()
    out, state = causal_conv(x, w, mx.zeros((1, 3, 256)))
    mx.eval(out, state)
    del out
    mx.clear_cache()
    # a view of the chunk's conv input [1, 515, 256] would keep 527 KB alive until the next chunk
    assert mx.get_active_memory() - before <= state.nbytes + 1024
