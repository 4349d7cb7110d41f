"""Invariants of every compaction operator on random grids (odd, non-square, video, multi-image)."""

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact.compaction import (
    ENCODER_METHODS,
    METHODS,
    Compaction,
    VisualTokens,
    compact,
    compact_many,
    unit_selector,
)

D = 8
SETTINGS = settings(max_examples=40, deadline=None)


def mrope_positions(grid, cur=7):
    """Full-sequence M-RoPE ids of an image block at text counter `cur`: (cur + t, cur + hi, cur + wi)."""
    ti, hi, wi = np.unravel_index(np.arange(int(np.prod(grid))), grid)
    return np.stack([cur + ti, cur + hi, cur + wi]).astype(np.int64)  # [3, N]


def make_tokens(grid, kind="normal", seed=0, mx_positions=False):
    rng = np.random.default_rng(seed)
    n = int(np.prod(grid))
    if kind == "normal":
        f = rng.normal(size=(n, D))
    elif kind == "constant":  # every token identical: ties everywhere
        f = np.ones((n, D))
    else:  # a few distinct values, many exact duplicates
        f = rng.normal(size=(3, D))[rng.integers(0, 3, n)]
    f = mx.array(f.astype(np.float32))
    pos = mrope_positions(grid)
    return VisualTokens(
        features=f,
        grid=grid,
        positions=mx.array(pos) if mx_positions else pos,
        attention_received=mx.array(rng.random(n).astype(np.float32)),
        deepstack=[f * 2.0 + 1.0, -f],
        prompt_embeds=mx.array(rng.normal(size=(4, D)).astype(np.float32)),
    )


grids = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),  # tiny, odd, non-square, video
    st.tuples(st.just(1), st.integers(20, 40), st.integers(20, 40)),  # large
)
compactions = st.builds(
    Compaction,
    method=st.sampled_from(METHODS),
    keep=st.floats(0.01, 1.0),
    floor_stride=st.sampled_from([None, 1, 2, 3, 5]),
    merge_dropped=st.booleans(),
    window=st.sampled_from([2, 4]),
    prompt_weighted=st.booleans(),
)


def check_invariants(tokens, c, out):
    n = tokens.n
    src = np.array(out.source)
    assert out.source.dtype == mx.int32
    assert out.k == len(src) == c.kept(tokens.grid)  # what compact returned is what the planners count
    assert out.features.shape == (out.k, D)
    assert np.all(np.diff(src) > 0) and src[0] >= 0 and src[-1] < n  # sorted unique sources
    pos = np.array(tokens.positions)
    assert np.array_equal(np.array(out.positions), pos[:, src])  # gathered columns, never renumbered
    assert type(out.positions) is type(tokens.positions)
    assert len(out.deepstack) == 2 and all(d.shape == (out.k, D) for d in out.deepstack)
    f = np.array(out.features)
    # DeepStack rows follow the same index map (affine maps commute with the weighted averages).
    np.testing.assert_allclose(np.array(out.deepstack[0]), 2.0 * f + 1.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(out.deepstack[1]), -f, rtol=1e-5, atol=1e-5)
    if out.groups is None:  # pure selection: rows are exactly the source rows
        assert np.array_equal(f, np.array(tokens.features)[src])
    else:
        groups = np.array(out.groups)
        assert groups.shape == (n,) and groups.max() < out.k
        assert np.array_equal(groups[src], np.arange(out.k))  # each representative is in its own group
        if not c.prompt_weighted:  # unit weights: the merged mass is the number of tokens merged
            assert np.isclose(float(np.array(out.weights).sum()), float((groups >= 0).sum()), rtol=1e-4)


@SETTINGS
@given(grid=grids, c=compactions, kind=st.sampled_from(["normal", "constant", "few"]), mxpos=st.booleans())
def test_every_operator_keeps_exactly_k_sorted_sources_and_original_positions(grid, c, kind, mxpos):
    tokens = make_tokens(grid, kind, mx_positions=mxpos)
    check_invariants(tokens, c, compact(tokens, c))


@settings(max_examples=30, deadline=None)
@given(grid=st.tuples(st.integers(2, 4), st.integers(1, 9), st.integers(1, 9)), c=compactions)
def test_a_video_compacted_a_slice_at_a_time_keeps_what_kept_counts(grid, c):
    """Qwen3-VL: each temporal slice of a video is a block of its own, with its own budget."""
    t, h, w = grid
    slices = [make_tokens((1, h, w), seed=s) for s in range(t)]
    assert sum(out.k for out in compact_many(slices, c)) == c.kept(grid, per_frame=True)


@SETTINGS
@given(
    grid=grids,
    method=st.sampled_from(ENCODER_METHODS),
    keep=st.floats(0.01, 1.0),
    tokens=st.one_of(st.none(), st.integers(1, 60)),
    floor_stride=st.sampled_from([None, 1, 3]),
    proportional=st.booleans(),
    seed=st.integers(0, 3),
)
def test_in_encoder_selection_keeps_what_kept_counts(grid, method, keep, tokens, floor_stride, proportional, seed):
    """The vision tower's unit selector (each temporal slice its own budget) keeps `Compaction.kept` units."""
    c = Compaction(
        method, keep=keep, tokens=tokens, floor_stride=floor_stride, where="encoder", proportional=proportional
    )
    rng = np.random.default_rng(seed)
    n = int(np.prod(grid))
    units = mx.array(rng.normal(size=(n, 4, D)).astype(np.float32))  # [U, 4, D] hidden states of the merge units
    attention = mx.array(rng.random(n).astype(np.float32))  # [U]
    picked = unit_selector(c)(units, grid, attention)
    kept = picked[0] if proportional else picked
    assert len(kept) == len(np.unique(kept)) == c.kept(grid)
    if proportional:
        assert len(picked[1]) == len(kept)


@SETTINGS
@given(grid=grids, c=compactions, seed=st.integers(0, 3))
def test_same_input_gives_same_output(grid, c, seed):
    a = compact(make_tokens(grid, seed=seed), c)
    b = compact(make_tokens(grid, seed=seed), c)
    assert np.array_equal(np.array(a.source), np.array(b.source))
    assert np.array_equal(np.array(a.features), np.array(b.features))
    assert np.array_equal(np.array(a.positions), np.array(b.positions))


@settings(max_examples=30, deadline=None)
@given(grid=grids, method=st.sampled_from(METHODS), mxpos=st.booleans())
def test_keep_one_is_the_identity(grid, method, mxpos):
    tokens = make_tokens(grid, mx_positions=mxpos)
    for c in (Compaction(method, keep=1.0), Compaction.none()):
        out = compact(tokens, c)
        assert np.array_equal(np.array(out.features), np.array(tokens.features))
        assert np.array_equal(np.array(out.positions), np.array(tokens.positions))
        assert np.array_equal(np.array(out.source), np.arange(tokens.n))
        for d, d0 in zip(out.deepstack, tokens.deepstack):
            assert np.array_equal(np.array(d), np.array(d0))


@settings(max_examples=30, deadline=None)
@given(grid=grids, method=st.sampled_from(METHODS))
def test_budget_of_n_tokens_keeps_everything(grid, method):
    tokens = make_tokens(grid)
    out = compact(tokens, Compaction(method, tokens=tokens.n))
    if method != "pool":
        assert np.array_equal(np.array(out.source), np.arange(tokens.n))
        np.testing.assert_allclose(np.array(out.features), np.array(tokens.features), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(grids=st.lists(grids, min_size=2, max_size=4), c=compactions)
def test_several_images_each_get_their_own_budget(grids, c):
    items = [make_tokens(g, seed=i) for i, g in enumerate(grids)]
    outs = compact_many(items, c)
    assert len(outs) == len(items)
    for tokens, out in zip(items, outs):
        check_invariants(tokens, c, out)
