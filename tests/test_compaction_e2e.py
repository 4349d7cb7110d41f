"""End-to-end compact visual tokens on tiny random models of the three archs.

References: keep=1.0 equals the uncompacted run; a compact run equals the uncompacted run with the dropped
tokens masked out as keys (merge operators: with the kept rows' features replaced by the merged ones);
in-encoder compaction equals the tower run at full length with later blocks' keys restricted to kept units.
"""

import mlx.core as mx
import numpy as np
import pytest
from tiny_checkpoints import ARCHS

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact.cache import KVCache
from mlx_compact.compaction import Compaction, assemble, tower_hooks
from mlx_compact.generate import _sampler, generate, generate_step, make_cache, prefill, prepare
from mlx_compact.loader import load
from mlx_compact.memory import kv_bytes
from mlx_compact.models.vision import attend, patch_coords, rope_angles, segment_bounds

PROMPT = "what is in both pictures?"
SELECTORS = {  # compact == masked full, features untouched
    "floor": Compaction("floor", keep=0.5),
    "diversity": Compaction("diversity", keep=0.5, proportional=False),
    "random": Compaction("random", keep=0.4),
    "prompt": Compaction("prompt", keep=0.5),
    "saliency": Compaction("saliency", keep=0.5, contextual=0.0),
}
MERGERS = {  # compact == masked full with the kept rows' features replaced by the merged ones
    "pool": Compaction("pool", proportional=False),
    "merge": Compaction("merge", keep=0.5, proportional=False),
    "saliency+context": Compaction("saliency", keep=0.5, contextual=0.3),
    "diversity+merge_dropped": Compaction("diversity", keep=0.34, merge_dropped=True, proportional=False),
}
ENCODER = {
    m: Compaction(m, keep=0.5, where="encoder", encoder_layer=1) for m in ("floor", "diversity", "saliency", "random")
}


def _load(path):
    return load(str(path))


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint, images):
    """Per arch: model, processor and the uncompacted prompt."""
    cache = {}

    def get(arch):
        if arch not in cache:
            model, proc = _load(tiny_checkpoint(arch))
            cache[arch] = (model, proc, prepare(model, proc, PROMPT, images))
        return cache[arch]

    return get


def run(model, embeds, positions, deepstack, steps, tokens=None, mask=None, keep_keys=None):
    """Prefill then `steps` cached decode steps; returns (prefill logits [L, V], decode logits [steps, V], tokens).

    Decode step n sits at position max(positions) + 1 + n (generate_step's rule); with `tokens` they are fed
    instead of the greedy ones.
    mask / keep_keys ([L] bool): the masked-full reference (dropped keys stay masked while decoding).
    """
    start = int(positions.max().item()) + 1
    cache = [KVCache() for _ in model.layers]
    logits = model.language_model(embeds, positions, cache=cache, deepstack=deepstack, mask=mask)[0]  # [L, V]
    out, fed, tok = [], [], mx.argmax(logits[-1])
    embed = model.language_model.model.embed_tokens
    for n in range(steps):
        tok = mx.array(tokens[n]) if tokens is not None else tok
        fed.append(int(tok.item()))
        m = None if keep_keys is None else mx.array(np.r_[keep_keys, np.ones(n + 1, bool)])[None]  # [1, S]
        pos = mx.full((3, 1, 1), start + n, dtype=mx.int32)
        step = model.language_model(embed(tok.reshape(1, 1)), pos, cache=cache, mask=m)[0, -1]  # [V]
        out.append(step)
        tok = mx.argmax(step)
    return logits, (mx.stack(out) if out else None), fed


def masked_full(model, full, comp, merged: bool):
    """The uncompacted inputs with dropped keys masked; merged: kept rows carry the compact features."""
    L = full.embeds.shape[1]
    keep = np.zeros(L, bool)
    keep[comp.kept] = True
    embeds, ds = full.embeds, full.deepstack
    rows = mx.array(comp.kept.astype(np.int32))
    if merged:
        embeds = embeds.at[:, rows].add(comp.embeds - embeds[:, rows])  # [1, L, D]
        ds = None if ds is None else [d.at[:, rows].add(c - d[:, rows]) for d, c in zip(ds, comp.deepstack)]
    else:
        np.testing.assert_array_equal(np.array(embeds[:, rows]), np.array(comp.embeds))
    causal = np.tril(np.ones((L, L), bool)) & keep[None]
    return embeds, ds, mx.array(causal), keep


def check_masked_full(model, full, comp, merged=False, steps=6):
    full_pos = np.array(full.positions)[:, 0]  # [3, L]
    np.testing.assert_array_equal(np.array(comp.positions)[:, 0], full_pos[:, comp.kept])  # gathered, not renumbered
    assert np.array(comp.positions).max() == full_pos.max()  # so decode step n sits at max + 1 + n in both
    c_logits, c_dec, toks = run(model, comp.embeds, comp.positions, comp.deepstack, steps)
    embeds, ds, mask, keep = masked_full(model, full, comp, merged)
    f_logits, f_dec, _ = run(model, embeds, full.positions, ds, steps, toks, mask, keep)
    scale = float(mx.abs(f_logits).max())
    np.testing.assert_allclose(np.array(c_logits), np.array(f_logits[mx.array(comp.kept)]), atol=1e-4 * scale)
    np.testing.assert_allclose(np.array(c_dec), np.array(f_dec), atol=1e-4 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_one_reproduces_uncompacted_prefill_and_32_decode_steps(arch, loaded, images):
    model, proc, full = loaded(arch)
    same = prepare(model, proc, PROMPT, images, compaction=Compaction("diversity", keep=1.0))
    assert same.input_ids == full.input_ids and np.array_equal(np.array(same.positions), np.array(full.positions))
    a_logits, a_dec, a_tok = run(model, full.embeds, full.positions, full.deepstack, 32)
    b_logits, b_dec, b_tok = run(model, same.embeds, same.positions, same.deepstack, 32)
    assert a_tok == b_tok
    np.testing.assert_allclose(np.array(a_logits), np.array(b_logits), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(a_dec), np.array(b_dec), rtol=1e-6, atol=1e-6)
    gen = generate_step(model, same, make_cache(model), _sampler(0.0))
    assert [next(gen)[0] for _ in range(32)] == b_tok  # the product's decode loop agrees with the reference


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(SELECTORS) + list(MERGERS))
def test_compact_equals_masked_full_multi_image(arch, name, loaded, images):
    model, proc, full = loaded(arch)
    c = SELECTORS.get(name) or MERGERS[name]
    comp = prepare(model, proc, PROMPT, images, compaction=c)
    before = [v["before"] for v in full.visual_tokens]
    assert [v["before"] for v in comp.visual_tokens] == before and len(before) == 2
    assert all(v["after"] < v["before"] for v in comp.visual_tokens)
    assert len(comp.input_ids) == len(full.input_ids) - sum(v["before"] - v["after"] for v in comp.visual_tokens)
    if full.deepstack is not None:
        assert all(d.shape == comp.embeds.shape for d in comp.deepstack)
    check_masked_full(model, full, comp, merged=name in MERGERS)


def _video(model, proc, frames, c):
    text = proc.build_prompt("what happens?", n_videos=1)
    inputs = proc(text=text, videos=[frames])
    ids = [int(i) for i in inputs["input_ids"][0]]
    grid = [tuple(int(v) for v in g) for g in inputs["video_grid_thw"]]
    out = model.encode(mx.array(inputs["pixel_values_videos"]), grid, **tower_hooks(model, c))
    per_frame = model.model_type == "qwen3_vl"
    blocks, ds = model.split_visual(out, grid, per_frame=per_frame)
    m = model.config.vision.spatial_merge_size
    grids = (
        [(1, h // m, w // m) for t, h, w in grid for _ in range(t)]
        if per_frame
        else [(t, h // m, w // m) for t, h, w in grid]
    )
    positions, _ = model.positions(ids, [], grid, inputs["second_per_grid_ts"])
    return assemble(
        model,
        ids,
        blocks,
        positions,
        grids,
        c,
        deepstack=ds if ds[0] else None,
        kept=None if out.units is None else _frame_units(out.units, grids, per_frame),
    )


def _frame_units(units, grids, per_frame):
    """Kept units per block (per temporal slice for Qwen3-VL), local to the block."""
    if not per_frame:
        return units
    kept, u = [], np.array(units[0])
    for s, (_, h, w) in enumerate(grids):
        kept.append(u[(u >= s * h * w) & (u < (s + 1) * h * w)] - s * h * w)
    return kept


@pytest.mark.parametrize("arch", ARCHS)
def test_video_compact_equals_masked_full(arch, tiny_checkpoint, video_frames):
    model, proc = _load(tiny_checkpoint(arch))
    full = _video(model, proc, video_frames, None)
    comp = _video(model, proc, video_frames, Compaction("diversity", keep=0.5))
    n_blocks = len(comp.visual)
    assert n_blocks == (2 if arch == "qwen3_vl" else 1)  # Qwen3-VL: one block (own budget) per temporal slice
    assert all(0 < v["after"] < v["before"] for v in comp.visual_tokens)
    check_masked_full(model, full, comp)
    if arch != "qwen2_5_vl":  # in-encoder on a video: per-slice units, positions gathered the same way
        enc = _video(model, proc, video_frames, ENCODER["diversity"])
        assert all(0 < v["after"] < v["before"] for v in enc.visual_tokens)
        np.testing.assert_array_equal(np.array(enc.positions)[:, 0], np.array(full.positions)[:, 0][:, enc.kept])


@pytest.mark.parametrize("arch", ARCHS)
def test_causality_later_compact_token_leaves_earlier_outputs(arch, loaded, images):
    model, proc, _ = loaded(arch)
    comp = prepare(model, proc, PROMPT, images, compaction=Compaction("diversity", keep=0.5))
    ids = np.array(comp.input_ids)
    vis = np.flatnonzero(ids == model.config.image_token_id)
    j = int(vis[len(vis) // 2])  # a compact visual token in the middle
    base = run(model, comp.embeds, comp.positions, comp.deepstack, 0)[0]
    changed = comp.embeds.at[:, j].add(1.0)
    other = run(model, changed, comp.positions, comp.deepstack, 0)[0]
    np.testing.assert_array_equal(np.array(base[:j]), np.array(other[:j]))
    assert not np.allclose(np.array(base[j:]), np.array(other[j:]))


def masked_tower(tower, pv, grid, units, select_at):
    """Tower at full length; blocks from `select_at` on let keys come only from kept units (same image/slice).
    Returns merged features and DeepStack features at the kept units."""
    cfg = tower.cfg
    u = cfg.spatial_merge_size**2
    x = tower.embed(pv, grid)  # [N, D]
    ang = rope_angles(patch_coords(grid, cfg.spatial_merge_size), tower.head_dim, cfg.rope_theta)
    ang = mx.concatenate([ang, ang], axis=-1)[:, None, :]  # [N, 1, hd]
    cos, sin = mx.cos(ang), mx.sin(ang)
    bounds = segment_bounds(grid)
    seg = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))  # [N]
    starts = np.cumsum([0] + [t * h * w // u for t, h, w in grid])[:-1]
    kept = np.concatenate([np.array(k) + s for k, s in zip(units, starts)])  # [K] units in the batch
    kept_rows = np.zeros(len(seg), bool)
    kept_rows[(kept[:, None] * u + np.arange(u)).reshape(-1)] = True
    same = seg[:, None] == seg[None]
    ds = []
    for i, blk in enumerate(tower.blocks):
        m = mx.array(same if i < select_at else same & kept_rows[None])  # [N, N]
        q, k, v = blk.attn.qkv_rope(blk.norm1(x), cos, sin)  # [N, H, d]
        a = attend(*(t.transpose(1, 0, 2)[None] for t in (q, k, v)), blk.attn.scale, mask=m)  # [1, H, N, d]
        x = x + blk.attn.proj(a[0].transpose(1, 0, 2).reshape(x.shape))
        x = x + blk.mlp(blk.norm2(x))
        if i in getattr(cfg, "deepstack_visual_indexes", ()):
            ds.append(tower.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
    idx = mx.array(kept.astype(np.int32))
    return tower.merger(x)[idx], [d[idx] for d in ds]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("name", list(ENCODER))
def test_in_encoder_equals_masked_tower(arch, name, loaded, images):
    model, proc, full = loaded(arch)
    c = ENCODER[name]
    inputs = proc(text=proc.build_prompt(PROMPT, n_images=2), images=images)
    pv, grid = mx.array(inputs["pixel_values"]), [tuple(int(v) for v in g) for g in inputs["grid_thw"]]
    out = model.encode(pv, grid, **tower_hooks(model, c))
    before = [t * h * w // 4 for t, h, w in grid]
    assert [len(k) for k in out.units] == [c.budget(n) for n in before]
    ref, ref_ds = masked_tower(model.vision_tower, pv, grid, out.units, c.encoder_layer)
    tol = 1e-4 * float(mx.abs(ref).max())
    np.testing.assert_allclose(np.array(out.features), np.array(ref), atol=tol)
    assert len(out.deepstack) == len(ref_ds) == len(model.config.vision.deepstack_visual_indexes)
    for d, r in zip(out.deepstack, ref_ds):  # collected before and after the selection block
        assert d.shape == out.features.shape
        np.testing.assert_allclose(np.array(d), np.array(r), atol=1e-4 * float(mx.abs(r).max()))
    comp = prepare(model, proc, PROMPT, images, compaction=c)
    assert comp.visual_tokens == [{"before": b, "after": c.budget(b)} for b in before]
    np.testing.assert_array_equal(np.array(comp.positions)[:, 0], np.array(full.positions)[:, 0][:, comp.kept])


def test_qwen2_5_vl_in_encoder_is_a_clear_error(loaded, images):
    model, proc, _ = loaded("qwen2_5_vl")
    with pytest.raises(ValueError, match="post-merger"):
        prepare(model, proc, PROMPT, images, compaction=ENCODER["diversity"])


@pytest.mark.parametrize("where", ["post", "encoder"])
def test_generate_stats_report_compaction_and_smaller_kv(where, tiny_checkpoint, images):
    model, proc = _load(tiny_checkpoint("qwen3_vl"))
    base = generate(model, proc, PROMPT, images, max_tokens=4)
    c = Compaction("diversity", keep=0.34, where=where, encoder_layer=1 if where == "encoder" else None)
    small = generate(model, proc, PROMPT, images, max_tokens=4, compaction=c)
    s, b = small.stats, base.stats
    assert [v["before"] for v in s["visual_tokens"]] == [v["before"] for v in b["visual_tokens"]]
    assert all(v["after"] == c.budget(v["before"]) for v in s["visual_tokens"])
    dropped = sum(v["before"] - v["after"] for v in s["visual_tokens"])
    assert s["prompt_tokens"] == b["prompt_tokens"] - dropped
    bias = 4 * 256 if s["proportional"] else 0  # proportional: one float32 per slot, in 256-slot steps
    assert s["kv_bytes_allocated"] <= b["kv_bytes_allocated"] + bias  # KVCache grows by 256-token steps
    assert set(s["ttft_s"]) == {"preprocess", "vision", "compaction", "prefill"}
    comp = prepare(model, proc, PROMPT, images, compaction=c)
    cache = make_cache(model)
    prefill(model, comp, cache)
    assert all(layer.offset == len(comp.input_ids) for layer in cache)  # the cache holds L_compact rows only
    used = sum(layer.keys[:, :, : layer.offset].nbytes + layer.values[:, :, : layer.offset].nbytes for layer in cache)
    assert used == kv_bytes(model.config.text, len(comp.input_ids), dtype_bytes=4)  # float32 K and V
