"""Hooks handed to the vision tower: in-encoder unit selection and the attention-received probe.

The tower knows nothing of compaction; `tower_hooks(model, c)` turns a `Compaction` into the keyword arguments
of `model.encode` (`select`/`select_at`, `received`/`received_at`).
"""

from dataclasses import replace

import numpy as np

from .attention import attention_received
from .compose import group_mass, plan
from .types import Compaction, VisualTokens

PROBE_QUERIES = 1024  # queries per image/slice used to estimate the attention received (evenly spaced)


def _received(q, k, scale, bounds):
    """Attention received per patch [N] in a ViT block (blockwise, sampled queries, no [N, N] matrix)."""
    return attention_received(q, k, scale, cu_seqlens=bounds, queries=PROBE_QUERIES)


def unit_selector(c: Compaction):
    """A tower `select` callable: (hidden [U, 4, D], grid (t, h, w), attention [U] or None) -> kept unit indices,
    or with ``c.proportional`` (kept unit indices, their mass [K]).

    Selects whole merge units per temporal slice (each slice gets its own budget) on the unit hidden states
    averaged over their patches, with `plan` (floor, diversity, saliency without contextual merging, random).
    A kept unit's mass counts itself and the dropped units nearest to it (`group_mass`).
    """
    proportional = c.proportional
    c = replace(c, contextual=0.0, where="post")  # whole units only: nothing is merged inside the tower

    def select(units, grid, attention=None):
        t, h, w = grid
        feats = units.mean(axis=1)  # [U, D]
        per = h * w
        kept, mass = [], []
        for s in range(t):
            rows = slice(s * per, (s + 1) * per)
            tokens = VisualTokens(
                features=feats[rows],
                grid=(1, h, w),
                positions=np.zeros((3, per), np.int64),
                attention_received=None if attention is None else attention[rows],
            )
            sel = plan(tokens, c)
            kept.append(sel.keep + s * per)
            if proportional:
                mass.append(group_mass(tokens, sel))
        if proportional:
            return np.concatenate(kept), np.concatenate(mass)  # [K] sorted, [K]
        return np.concatenate(kept)  # [K] sorted

    return select


def _layer(model, c: Compaction) -> int:
    v = model.config.vision
    if c.encoder_layer is not None:
        layer = c.encoder_layer
    elif c.where == "encoder":
        layer = v.depth // 3
    else:  # the attention probe of post-merger saliency: the last full-attention block
        layer = v.fullatt_block_indexes[-1] if v.fullatt_block_indexes else v.depth - 1
    if not 0 <= layer < v.depth:
        raise ValueError(f"Compaction.encoder_layer must be in [0, {v.depth}) for this tower, got {layer}")
    return layer


def tower_hooks(model, c) -> dict:
    """Keyword arguments for `model.encode` that compaction `c` needs (empty when it needs none)."""
    if c is None or c.is_identity:
        return {}
    hooks = {}
    if c.where == "encoder":
        if model.config.model_type == "qwen2_5_vl":
            raise ValueError(
                "in-encoder compaction needs a full-attention vision tower (Qwen2-VL, Qwen3-VL); Qwen2.5-VL's "
                "windowed ViT is served post-merger: use --where post (Compaction(where='post'))"
            )
        hooks.update(select=unit_selector(c), select_at=_layer(model, c))
    if c.method == "saliency":
        hooks.update(received=_received, received_at=_layer(model, c))
    return hooks
