"""Training-free compaction operators on the merged visual grid.

Selectors return the kept raster indices (np.int64, unique, in selection order). Operators that also merge
(`pool`, `saliency`, `merge`) return a `Selection`: kept indices plus, for every original token, the slot of
`keep` it is averaged into (-1: dropped). A kept token's position is always its own original (t, h, w).
`start` is the floor: indices every selector keeps first and then fills up to the budget.
"""

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .types import VisualTokens


class Selection(NamedTuple):
    keep: np.ndarray  # [K] raster indices of the kept (representative) tokens
    assign: np.ndarray | None = None  # [N] slot in `keep` each token is averaged into, -1 = dropped
    weight: np.ndarray | None = None  # [N] weight of each token in its slot's average (None = 1)


def _idx(start) -> np.ndarray:
    return np.zeros(0, np.int64) if start is None else np.asarray(start, np.int64).reshape(-1)


def _unit(x) -> mx.array:
    x = mx.array(x).astype(mx.float32)  # [N, D]
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _evenly(idx: np.ndarray, k: int) -> np.ndarray:
    """At most k evenly spaced entries of idx (first and last included)."""
    if len(idx) <= k:
        return idx
    if k <= 0:
        return idx[:0]
    return idx[np.floor(np.linspace(0, len(idx) - 1, k) + 0.5).astype(np.int64)]


def _floor_grid(grid, stride: int) -> np.ndarray:
    t, h, w = grid
    rows = np.arange((h - 1) % stride // 2, h, stride)  # centred: symmetric margins
    cols = np.arange((w - 1) % stride // 2, w, stride)
    tt, rr, cc = np.meshgrid(np.arange(t), rows, cols, indexing="ij")
    return (tt * h * w + rr * w + cc).reshape(-1)


def floor(grid, stride: int, k: int) -> np.ndarray:
    """Uniform spatial floor (FEATHER-style): every `stride`-th row and column of each temporal slice.

    Capped at k: the stride grows until the floor fits, then evenly spaced floor tokens are kept.
    Returns sorted raster indices.
    """
    idx = _floor_grid(grid, stride)
    while len(idx) > k and stride < max(grid[1], grid[2]):
        stride += 1
        idx = _floor_grid(grid, stride)
    return _evenly(idx, k)


def uniform(tokens: VisualTokens, k: int, start=None) -> np.ndarray:
    """The floor alone: `start`, then evenly spaced (in raster order) remaining tokens up to k."""
    start = _idx(start)
    rest = np.setdiff1d(np.arange(tokens.n), start)
    return np.concatenate([start, _evenly(rest, k - len(start))])


SKETCH_DIM = 64  # greedy selectors compare features in a fixed random projection of this many dimensions


def _sketch(fn: mx.array, dim: int = SKETCH_DIM) -> np.ndarray:
    """Unit rows [N, D] -> numpy float32 unit rows [N, min(D, dim)]: a fixed (seeded) Gaussian projection
    when D > dim (Johnson-Lindenstrauss: cosines kept to about 1/sqrt(dim)), so each greedy step is a small
    matrix-vector product. Deterministic."""
    if fn.shape[1] > dim:
        proj = np.random.default_rng(0).standard_normal((fn.shape[1], dim)).astype(np.float32)  # [D, dim]
        fn = fn @ mx.array(proj)  # [N, dim]
    f = np.array(fn.astype(mx.float32))  # [N, d]
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)


def _greedy(f: np.ndarray, k: int, start: np.ndarray, score=None, lam: float = 0.0) -> np.ndarray:
    """Greedy max-min selection on cosine distance of unit rows f [N, d], from `start`; with `score` [N], MMR:
    lam*score + (1-lam)*dist/2. numpy float32, one small matrix-vector product per step; ties -> lowest index."""
    n = f.shape[0]
    mind = np.full(n, 2.0, np.float32)  # [N] distance to the nearest kept row (2.0: nothing kept yet)
    for s in range(0, len(start), 512):
        np.minimum(mind, (1.0 - f @ f[start[s : s + 512]].T).min(axis=1), out=mind)
    mind[start] = -np.inf
    score = None if score is None else np.asarray(score, np.float32)
    picks = np.empty(max(k - len(start), 0), np.int64)
    buf = np.empty(n, np.float32)
    for i in range(len(picks)):
        j = int(np.argmax(mind if score is None else lam * score + (1.0 - lam) * 0.5 * mind))
        picks[i] = j
        np.dot(f, f[j], out=buf)
        np.minimum(mind, 1.0 - buf, out=mind)
        mind[j] = -np.inf
    return np.concatenate([start, picks])


def diversity(tokens: VisualTokens, k: int, start=None) -> np.ndarray:
    """DivPrune-style max-min diversity: greedily add the token farthest (cosine) from everything kept.

    Starts from `start` (the floor); without one, from the token least similar to the mean feature.
    Features wider than SKETCH_DIM are compared in a fixed random projection (fast, deterministic).
    Deterministic (ties go to the lowest index).
    """
    f = _sketch(_unit(tokens.features))  # [N, d]
    start = _idx(start)
    if not len(start) and k > 0:
        mean = f.mean(axis=0)  # [d]
        start = np.array([int(np.argmin(f @ mean))])
    return _greedy(f, k, start)


def prompt_relevance(tokens: VisualTokens) -> mx.array:
    """[N] max cosine similarity of each visual token to the prompt's token embeddings."""
    if tokens.prompt_embeds is None:
        raise ValueError("this operator needs tokens.prompt_embeds ([P, D] embeddings of the prompt's text tokens)")
    return mx.max(_unit(tokens.features) @ _unit(tokens.prompt_embeds).T, axis=1)  # [N]


def prompt(tokens: VisualTokens, k: int, start=None, relevance: float = 0.5) -> np.ndarray:
    """Prompt-aware coverage (MMR-like): greedily maximize relevance*rel + (1-relevance)*coverage.

    rel is the max cosine similarity to the prompt embeddings (min-max scaled to [0, 1]); coverage is the cosine
    distance to the nearest kept token. Single-turn: re-compact when the question changes.
    """
    rel = np.array(prompt_relevance(tokens))  # [N]
    rel = (rel - rel.min()) / (rel.max() - rel.min() + 1e-6)  # [N] in [0, 1]
    return _greedy(_sketch(_unit(tokens.features)), k, _idx(start), score=rel, lam=relevance)


def random(tokens: VisualTokens, k: int, seed: int = 0) -> np.ndarray:
    """Seeded uniform random baseline (no floor)."""
    return np.random.default_rng(seed).choice(tokens.n, size=k, replace=False).astype(np.int64)


def pool(tokens: VisualTokens) -> Selection:
    """2x2 average pooling over the merged grid of each temporal slice (odd edges: partial windows).

    Keeps t*ceil(h/2)*ceil(w/2) tokens; each sits at its window's top-left token (position and source).
    """
    t, h, w = tokens.grid
    ti, hi, wi = np.unravel_index(np.arange(tokens.n), tokens.grid)
    ww = (w + 1) // 2
    window = ti * ((h + 1) // 2) * ww + (hi // 2) * ww + wi // 2  # [N] window id, raster over windows
    _, top_left = np.unique(window, return_index=True)  # first raster token of a window is its top-left
    return Selection(top_left.astype(np.int64), window.astype(np.int64))


def saliency(tokens: VisualTokens, k: int, start=None, contextual: float = 0.15) -> Selection:
    """VisionZip-style: dominant tokens by attention received, plus a few contextual tokens.

    After `start`, the most-attended tokens fill the budget except round(contextual*k) slots; the rest are
    grouped around evenly spaced targets by cosine similarity and averaged, each group placed at its
    most-attended member. Needs `tokens.attention_received`.
    """
    if tokens.attention_received is None:
        raise ValueError(
            "saliency needs tokens.attention_received: compute it with attention_received(q, k, scale) at a "
            "full-attention ViT block and reduce_to_units(...), or use method='diversity'"
        )
    n, start = tokens.n, _idx(start)
    att = np.array(tokens.attention_received.astype(mx.float32))  # [N]
    kc = min(int(round(contextual * k)), k - len(start))
    kd = k - len(start) - kc
    taken = np.zeros(n, bool)
    taken[start] = True
    order = np.argsort(-att, kind="stable")
    order = order[~taken[order]]  # free tokens, most attended first
    keep = np.concatenate([start, order[:kd]])
    rest = order[kd:]
    if kc == 0 or not len(rest):
        return Selection(keep)
    fn = _unit(tokens.features)  # [N, D]
    targets = _evenly(np.sort(rest), kc)  # [kc]
    group = np.array(mx.argmax(fn[mx.array(rest)] @ fn[mx.array(targets)].T, axis=1))  # [R]
    where = np.empty(n, np.int64)
    where[rest] = np.arange(len(rest))
    group[where[targets]] = np.arange(kc)  # each target owns its group, so no group is empty
    _, first = np.unique(group, return_index=True)  # rest is attention-sorted: first member = most attended
    assign = np.full(n, -1, np.int64)
    assign[keep] = np.arange(len(keep))
    assign[rest] = len(keep) + group
    return Selection(np.concatenate([keep, rest[first]]), assign)


def _match(fn: np.ndarray, win: np.ndarray, fixed: np.ndarray):
    """Bipartite matching inside windows: A = every other free unit, B = the others and the fixed ones.

    Returns (a, b, sim): each A unit that has a B in its window, its most similar B, and their cosine.
    """
    m = len(win)
    order = np.argsort(win, kind="stable")  # units grouped by window, raster order inside
    sw = win[order]
    new = np.r_[True, sw[1:] != sw[:-1]]
    wid = np.cumsum(new) - 1  # [M] window number of each sorted unit
    starts = np.flatnonzero(new)
    slot = np.arange(m) - starts[wid]  # [M] place inside the window
    free = ~fixed[order]
    before = np.cumsum(free) - free  # free units before this one (all windows)
    is_a = free & ((before - before[starts][wid]) % 2 == 0)
    pad = np.full((wid[-1] + 1, slot.max() + 1), -1)  # [W, S] unit index per window slot
    pad[wid, slot] = order
    a_mask = np.zeros(pad.shape, bool)
    a_mask[wid, slot] = is_a
    b_mask = (pad >= 0) & ~a_mask
    x = fn[np.maximum(pad, 0)]  # [W, S, D]
    sim = np.matmul(x, x.transpose(0, 2, 1))  # [W, S, S]
    sim = np.where(a_mask[:, :, None] & b_mask[:, None, :], sim, -np.inf)
    best = sim.argmax(-1)  # [W, S]
    score = sim.max(-1)  # [W, S]
    ok = a_mask & (score > -np.inf)
    wi, si = np.nonzero(ok)
    return pad[wi, si], pad[wi, best[wi, si]], score[wi, si]


def merge(tokens: VisualTokens, k: int, start=None, window: int = 2, weights=None) -> Selection:
    """ToMe/LightKV-style bipartite soft matching inside real (h, w) windows of the merged grid.

    Each round, inside every window of the grid, free units alternate A/B (floor units are always B); each A
    is matched to its most similar B and the most similar half of the pairs (never more than needed) are
    merged by weighted average (`weights` [N], default 1, e.g. prompt relevance). The first window side is
    `window`, doubled until a window keeps at least 2 tokens on average (else merge would equal pooling); a
    level that can merge no more doubles the window (then one window per temporal slice, then everything).
    A merged unit keeps its B representative's original (t, h, w) position. Returns exactly k units.
    """
    n, (_, h, w) = tokens.n, tokens.grid
    f = np.array(tokens.features.astype(mx.float32))  # [N, D]
    mass = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32).reshape(n)
    fixed = np.zeros(n, bool)
    fixed[_idx(start)] = True
    ti, hi, wi = np.unravel_index(np.arange(n), tokens.grid)
    rep = np.arange(n)  # [M] representative raster index of each unit (stays sorted)
    sums = f * mass[:, None]  # [M, D] weighted feature sums
    msum = mass.copy()  # [M]
    owner = np.arange(n)  # [N] unit of each original token
    ws, level = window, 0  # level 0: (h, w) windows, 1: a slice, 2: everything
    while ws * ws * k < 2 * n and ws < max(h, w):
        ws *= 2
    while len(rep) > k:
        r = rep
        if level == 0:
            nw = -(-w // ws)
            win = ti[r] * (h * w) + (hi[r] // ws) * nw + wi[r] // ws
        else:
            win = ti[r] if level == 1 else np.zeros(len(r), np.int64)
        cur = sums / msum[:, None]
        cur = cur / np.maximum(np.linalg.norm(cur, axis=1, keepdims=True), 1e-6)  # [M, D]
        a, b, sim = _match(cur, win, fixed[r])
        if not len(a):
            if level == 2:
                raise RuntimeError("merge cannot reach the budget (more fixed units than the budget)")
            if level == 0 and ws < max(h, w):
                ws *= 2
            else:
                level += 1
            continue
        top = np.argsort(-sim, kind="stable")[: min(len(r) - k, max(1, len(a) // 2))]
        a, b = a[top], b[top]
        np.add.at(sums, b, sums[a])
        np.add.at(msum, b, msum[a])
        alive = np.ones(len(r), bool)
        alive[a] = False
        into = np.arange(len(r))
        into[a] = b
        owner = (np.cumsum(alive) - 1)[into][owner]
        rep, sums, msum = rep[alive], sums[alive], msum[alive]
    return Selection(rep, owner, mass if weights is not None else None)


def nearest_kept(tokens: VisualTokens, sel: Selection, block: int = 2048) -> Selection:
    """Average every dropped token into its most similar kept token (cosine on features)."""
    keep = sel.keep
    assign = sel.assign
    if assign is None:
        assign = np.full(tokens.n, -1, np.int64)
        assign[keep] = np.arange(len(keep))
    dropped = np.flatnonzero(assign < 0)
    if not len(dropped):
        return sel
    assign = assign.copy()
    fn = _unit(tokens.features)  # [N, D]
    kept = fn[mx.array(keep)]  # [K, D]
    for s in range(0, len(dropped), block):
        rows = dropped[s : s + block]
        assign[rows] = np.array(mx.argmax(fn[mx.array(rows)] @ kept.T, axis=1))  # [b]
    return Selection(keep, assign, sel.weight)
