"""Compose operators into one call: floor, selector, optional merge of the dropped, sort, gather once."""

import mlx.core as mx
import numpy as np

from ..kernels import gather_rows, merge_rows
from . import ops
from .types import Compaction, CompactVisual, VisualTokens


def plan(tokens: VisualTokens, c: Compaction) -> ops.Selection:
    """The index map of `compact`: kept raster indices sorted ascending, and (when merging) the slot each
    original token is averaged into. Useful for in-encoder compaction, where only indices are needed."""
    n = tokens.n
    if c.is_identity:
        return ops.Selection(np.arange(n, dtype=np.int64))
    if c.method == "pool":
        sel = ops.pool(tokens)
    else:
        k = c.budget(n)
        start = None
        if c.floor_stride is not None and c.method != "random":
            start = ops.floor(tokens.grid, c.floor_stride, k)
        if c.method == "floor":
            sel = ops.Selection(ops.uniform(tokens, k, start))
        elif c.method == "diversity":
            sel = ops.Selection(ops.diversity(tokens, k, start))
        elif c.method == "prompt":
            sel = ops.Selection(ops.prompt(tokens, k, start, c.relevance))
        elif c.method == "random":
            sel = ops.Selection(ops.random(tokens, k, c.seed))
        elif c.method == "saliency":
            sel = ops.saliency(tokens, k, start, c.contextual)
        else:  # merge
            weights = None
            if c.prompt_weighted:
                rel = np.array(ops.prompt_relevance(tokens))  # [N] in [-1, 1]
                weights = np.exp((rel - rel.max()) / 0.1)  # sharper preference for prompt-relevant tokens
            sel = ops.merge(tokens, k, start, c.window, weights)
    if c.merge_dropped:
        sel = ops.nearest_kept(tokens, sel)
    return _sorted(sel)


def _sorted(sel: ops.Selection) -> ops.Selection:
    order = np.argsort(sel.keep, kind="stable")
    if sel.assign is None:
        return ops.Selection(sel.keep[order])
    slot = np.empty(len(order), np.int64)
    slot[order] = np.arange(len(order))
    assign = np.where(sel.assign >= 0, slot[np.maximum(sel.assign, 0)], -1)
    return ops.Selection(sel.keep[order], assign, sel.weight)


def _take_cols(positions, keep: np.ndarray):
    if isinstance(positions, mx.array):
        return mx.take(positions, mx.array(keep.astype(np.int32)), axis=1)  # [3, K]
    return np.asarray(positions)[:, keep]  # [3, K]


def _groups_csr(assign: np.ndarray, weight, k: int):
    """Slot -> member rows as CSR (offsets [K+1], members [M], weights [M]); -1 rows are left out."""
    rows = np.flatnonzero(assign >= 0)
    rows = rows[np.argsort(assign[rows], kind="stable")]  # grouped by slot, raster order inside
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign[rows], minlength=k))])
    w = np.ones(len(rows), np.float32) if weight is None else weight[rows].astype(np.float32)
    return mx.array(offsets.astype(np.int32)), mx.array(rows.astype(np.int32)), mx.array(w)


def compact(tokens: VisualTokens, c: Compaction) -> CompactVisual:
    """Compact one image's visual tokens.

    Floor indices first, then the selector fills the budget, then (merge_dropped) dropped tokens are averaged
    into their nearest kept token, then kept tokens are sorted by raster index and features, positions and
    DeepStack rows are gathered with that one index map. Positions are the kept tokens' original full-sequence
    M-RoPE ids (never renumbered). `Compaction.none()` or keep=1.0 returns the input unchanged.
    """
    deepstack = list(tokens.deepstack or [])
    if c.is_identity:
        src = mx.arange(tokens.n, dtype=mx.int32)
        return CompactVisual(tokens.features, tokens.positions, src, deepstack, tokens.grid)
    sel = plan(tokens, c)
    keep, k = sel.keep, len(sel.keep)
    stands_for = group_mass(tokens, sel) if c.proportional else None  # [K]
    if sel.assign is None:
        idx = mx.array(keep.astype(np.int32))
        gather = lambda x: gather_rows(x, idx)  # noqa: E731  [K, D]
        weights = groups = None
    else:
        csr = _groups_csr(sel.assign, sel.weight, k)
        gather = lambda x: merge_rows(x, *csr)  # noqa: E731  [K, D] weighted mean of each group
        mass = np.ones(tokens.n, np.float32) if sel.weight is None else sel.weight.astype(np.float32)
        m = sel.assign >= 0
        weights = mx.array(np.bincount(sel.assign[m], mass[m], minlength=k).astype(np.float32))  # [K]
        groups = mx.array(sel.assign.astype(np.int32))  # [N]
    return CompactVisual(
        features=gather(tokens.features),
        positions=_take_cols(tokens.positions, keep),
        source=mx.array(keep.astype(np.int32)),
        deepstack=[gather(d) for d in deepstack],
        grid=tokens.grid,
        weights=weights,
        groups=groups,
        mass=None if stands_for is None else mx.array(stands_for),
    )


def group_mass(tokens: VisualTokens, sel: ops.Selection) -> np.ndarray:
    """[K] float32: how many original tokens each kept token stands for: its merge group, and the dropped
    tokens nearest to it by cosine similarity on features (`nearest_kept`). The masses sum to N."""
    assign = ops.nearest_kept(tokens, sel).assign
    if assign is None:  # nothing was dropped
        return np.ones(len(sel.keep), np.float32)
    return np.maximum(np.bincount(assign, minlength=len(sel.keep)), 1).astype(np.float32)  # a slot is never empty


def compact_many(items, c: Compaction) -> list:
    """Compact several images of one prompt; each gets its own budget from `c`."""
    return [compact(t, c) for t in items]
