"""Information proxies of the compaction operators on synthetic feature maps, plus argument checks."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact.compaction import (
    Compaction,
    VisualTokens,
    attention_received,
    compact,
    reduce_to_units,
)

D = 32
OBJECTS = [(1, 1), (4, 13), (8, 7), (11, 2), (14, 10)]  # (row, col) of single-token objects, off the floor lines


def tokens_from(f, grid, **kw):
    n = int(np.prod(grid))
    ti, hi, wi = np.unravel_index(np.arange(n), grid)
    pos = np.stack([ti, hi, wi]) + 5  # [3, N]
    return VisualTokens(mx.array(f.astype(np.float32)), grid, pos, **kw)


def scene(seed=0):
    """16x16 background (one direction + noise) with five distinct single-token objects."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(1, D)) + 0.05 * rng.normal(size=(256, D))  # [256, D]
    protos = rng.normal(size=(len(OBJECTS), D))
    for (r, c), p in zip(OBJECTS, protos):
        f[r * 16 + c] = p
    return f, protos


def covered(out, protos, thresh=0.9):
    f = np.array(out.features)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    p = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    return (p @ f.T).max(axis=1) > thresh  # [objects]


@pytest.mark.parametrize("method", ["diversity", "merge"])
def test_diversity_and_merge_cover_every_object_at_keep_quarter(method):
    f, protos = scene()
    out = compact(tokens_from(f, (1, 16, 16)), Compaction(method, keep=0.25))
    assert out.k == 64
    assert covered(out, protos).all()


def test_random_and_pool_miss_objects_at_keep_quarter():
    f, protos = scene()
    tokens = tokens_from(f, (1, 16, 16))
    hits = [covered(compact(tokens, Compaction("random", keep=0.25, seed=s)), protos).all() for s in range(10)]
    assert sum(hits) <= 2
    assert not covered(compact(tokens, Compaction("pool")), protos).any()  # averaged away with the background


def test_prompt_keeps_the_object_the_prompt_asks_about():
    f, protos = scene()
    tokens = tokens_from(f, (1, 16, 16), prompt_embeds=mx.array(protos[2:3].astype(np.float32)))
    c = Compaction("prompt", tokens=4, floor_stride=None, relevance=0.9)
    assert c.single_turn
    out = compact(tokens, c)
    r, col = OBJECTS[2]
    assert r * 16 + col in np.array(out.source).tolist()


def rows_kept(out, w):
    return np.array(out.source) // w


def test_floor_keeps_the_top_rows_when_saliency_is_all_at_the_bottom():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(144, D))
    att = np.zeros(144, np.float32)
    att[96:] = 1.0 + rng.random(48)  # only rows 8..11 receive attention
    tokens = tokens_from(f, (1, 12, 12), attention_received=mx.array(att.astype(np.float32)))

    no_floor = compact(tokens, Compaction("saliency", keep=0.25, floor_stride=None, contextual=0.0))
    assert rows_kept(no_floor, 12).min() >= 8  # top collapses without the floor

    with_floor = compact(tokens, Compaction("saliency", keep=0.25, contextual=0.0))
    rows = rows_kept(with_floor, 12)
    assert (rows < 6).sum() >= 6 and rows.min() <= 1  # every floor row of the top half survives
    assert {1, 4, 7} <= set(rows.tolist())  # the centred stride-3 floor rows 1, 4, 7 (and 10) survive


def reconstruction_error(tokens, out):
    f = np.array(tokens.features)
    rec = np.array(out.features)[np.array(out.groups)]  # every token replaced by its group's token
    return float(((f - rec) ** 2).sum(axis=1).mean())


def test_merge_reconstructs_better_than_pool_at_the_same_count():
    rng = np.random.default_rng(2)
    regions = rng.normal(size=(6, D))
    hi, wi = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    label = ((hi // 5) * 2 + (wi > 9)).reshape(-1) % 6  # blocky regions with edges off the 2x2 lattice
    f = regions[label] + 0.05 * rng.normal(size=(256, D))
    tokens = tokens_from(f, (1, 16, 16))
    pooled = compact(tokens, Compaction("pool"))
    merged = compact(tokens, Compaction("merge", tokens=pooled.k))
    assert merged.k == pooled.k
    assert reconstruction_error(tokens, merged) < 0.5 * reconstruction_error(tokens, pooled)


def test_merge_stays_inside_real_windows_and_keeps_original_positions():
    rng = np.random.default_rng(3)
    win = (np.arange(8)[:, None] // 2) * 4 + np.arange(8)[None, :] // 2  # [8, 8] 2x2 window id
    f = rng.normal(size=(16, D))[win.reshape(-1)]  # constant inside each 2x2 window
    tokens = tokens_from(f, (1, 8, 8))
    out = compact(tokens, Compaction("merge", keep=0.5, floor_stride=None))
    groups = np.array(out.groups)
    for j in range(out.k):
        assert len(set(win.reshape(-1)[groups == j].tolist())) == 1  # a group never crosses its window
    np.testing.assert_allclose(np.array(out.features), f[np.array(out.source)], atol=1e-5)
    assert np.array_equal(np.array(out.positions), tokens.positions[:, np.array(out.source)])


def test_pool_averages_two_by_two_windows_at_top_left_positions():
    f = np.arange(15 * D, dtype=np.float32).reshape(15, D)
    tokens = tokens_from(f, (1, 3, 5))
    out = compact(tokens, Compaction("pool"))
    assert np.array(out.source).tolist() == [0, 2, 4, 10, 12, 14]
    expect = [
        f[[0, 1, 5, 6]].mean(0),
        f[[2, 3, 7, 8]].mean(0),
        f[[4, 9]].mean(0),
        f[[10, 11]].mean(0),
        f[[12, 13]].mean(0),
        f[[14]].mean(0),
    ]
    np.testing.assert_allclose(np.array(out.features), np.stack(expect), rtol=1e-6)


def test_merge_dropped_averages_every_token_into_its_nearest_kept_token():
    f, _ = scene()
    tokens = tokens_from(f, (1, 16, 16))
    out = compact(tokens, Compaction("diversity", keep=0.25, merge_dropped=True))
    groups = np.array(out.groups)
    assert (groups >= 0).all() and float(np.array(out.weights).sum()) == 256
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    kept = np.array(out.source)
    assert np.array_equal(groups, (fn @ fn[kept].T).argmax(axis=1))


def direct_attention_received(q, k, scale, segments):
    q, k = np.array(q, np.float64), np.array(k, np.float64)
    out = np.zeros(q.shape[1])
    for s, e in zip(segments[:-1], segments[1:]):
        a = q[:, s:e] @ k[:, s:e].transpose(0, 2, 1) * scale  # [H, n, n]
        a = np.exp(a - a.max(-1, keepdims=True))
        out[s:e] = (a / a.sum(-1, keepdims=True)).sum(axis=(0, 1)) / q.shape[0]
    return out


@pytest.mark.parametrize("cu_seqlens", [None, [0, 20, 37]])
def test_attention_received_blockwise_equals_direct(cu_seqlens):
    rng = np.random.default_rng(4)
    q = mx.array(rng.normal(size=(3, 37, 8)).astype(np.float32))
    k = mx.array(rng.normal(size=(3, 37, 8)).astype(np.float32))
    got = np.array(attention_received(q, k, 8**-0.5, block=8, cu_seqlens=cu_seqlens))
    want = direct_attention_received(q, k, 8**-0.5, cu_seqlens or [0, 37])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isclose(got.sum(), 37, rtol=1e-5)


def test_reduce_to_units_sums_four_consecutive_rows():
    assert np.array(reduce_to_units(mx.arange(16))).tolist() == [6, 22, 38, 54]
    with pytest.raises(ValueError, match="multiple"):
        reduce_to_units(mx.arange(10))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep=0.0), "keep"),
        (dict(keep=1.5), "keep"),
        (dict(keep=-0.2), "keep"),
        (dict(keep="0.3"), "keep"),
        (dict(keep=True), "keep"),
        (dict(tokens=0), "tokens"),
        (dict(tokens=2.5), "tokens"),
        (dict(method="tome"), "method"),
        (dict(floor_stride=0), "floor_stride"),
        (dict(window=1), "window"),
        (dict(contextual=1.0), "contextual"),
        (dict(relevance=1.5), "relevance"),
    ],
)
def test_bad_compaction_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Compaction(**kwargs)


def test_budget_is_clamped_and_tokens_override_keep():
    assert Compaction(keep=0.33).budget(100) == 33
    assert Compaction(keep=0.01).budget(10) == 1
    assert Compaction(keep=0.5, tokens=7).budget(100) == 7
    assert Compaction(tokens=500).budget(100) == 100
    assert Compaction.none().is_identity and Compaction(keep=1.0).is_identity
    assert Compaction("prompt").single_turn and not Compaction("diversity").single_turn


def test_operators_that_need_a_signal_say_which():
    tokens = tokens_from(np.ones((16, D)), (1, 4, 4))
    with pytest.raises(ValueError, match="attention_received"):
        compact(tokens, Compaction("saliency"))
    with pytest.raises(ValueError, match="prompt_embeds"):
        compact(tokens, Compaction("prompt"))
    with pytest.raises(ValueError, match="positions"):
        VisualTokens(tokens.features, (1, 4, 4), np.zeros((3, 15)))
