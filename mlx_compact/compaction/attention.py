"""Attention received per visual token, computed blockwise at a full-attention ViT block."""

from collections.abc import Sequence

import mlx.core as mx
import numpy as np


def attention_received(
    q: mx.array,
    k: mx.array,
    scale: float,
    block: int = 1024,
    cu_seqlens: Sequence[int] | None = None,
    queries: int | None = None,
) -> mx.array:
    """Column sums of softmax(q k^T * scale), averaged over heads: how much attention each key receives.

    q, k: [H, N, d] (after RoPE, as the block uses them). Computed by blocks of `block` queries, so the
    [N, N] score matrix is never materialized. cu_seqlens: optional segment boundaries [0, n1, ..., N]
    (Qwen ViTs attend within each image/frame); keys only receive attention from their own segment.
    queries: optional cap on the queries used per segment (evenly spaced; the sums are rescaled), an unbiased
    estimate at a fraction of the cost. Returns [N] float32; each segment's entries sum to its length.
    Note Qwen2.5-VL's ViT holds tokens in window order: undo its window permutation before compaction.
    """
    n = q.shape[1]
    bounds = [0, n] if cu_seqlens is None else [int(b) for b in cu_seqlens]
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        keys = k[:, s:e].astype(mx.float32).transpose(0, 2, 1)  # [H, d, n_seg]
        qs = q[:, s:e]  # [H, n_seg, d]
        if queries is not None and queries < e - s:
            qs = qs[:, mx.array(np.linspace(0, e - s - 1, queries).round().astype(np.int32))]  # [H, queries, d]
        acc = mx.zeros((e - s,), dtype=mx.float32)
        for b in range(0, qs.shape[1], block):
            scores = (qs[:, b : b + block].astype(mx.float32) @ keys) * scale  # [H, b, n_seg]
            acc = acc + mx.softmax(scores, axis=-1).sum(axis=(0, 1))  # [n_seg]
            mx.eval(acc)  # free this block's scores before the next
        out.append(acc * ((e - s) / max(qs.shape[1], 1) / q.shape[0]))
    return mx.concatenate(out) if out else mx.zeros((0,), dtype=mx.float32)


def reduce_to_units(x: mx.array, merge: int = 2) -> mx.array:
    """Sum per-patch values [merge*merge*N'] into per-merge-unit values [N'].

    Qwen ViT rows come block-major: each merge x merge unit is merge*merge consecutive rows.
    """
    u = merge * merge
    if x.shape[0] % u:
        raise ValueError(f"reduce_to_units: length {x.shape[0]} is not a multiple of merge*merge = {u}")
    return x.reshape(-1, u).sum(axis=-1)  # [N']
