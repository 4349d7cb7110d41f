"""The assembler: compact visual blocks, shortened ids, gathered M-RoPE positions, one splice.

Position rule: positions come from the UNCOMPACTED prompt; the compact sequence takes the columns of the rows it
keeps (text never shifts). The text after the last visual block is never dropped, so the compact positions keep
the uncompacted maximum, and decode step n sits at max + 1 + n (`generate_step`) exactly as in the uncompacted
run. DeepStack rows are compacted with the features' index map.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .compose import compact
from .types import Compaction, CompactVisual, VisualTokens


@dataclass
class Assembled:
    """A compact prompt ready for the LLM: it and its KV cache only ever see L_compact rows."""

    input_ids: list[int]  # [Lc] each run of visual tokens shortened to its block's K
    embeds: mx.array  # [1, Lc, D]
    positions: mx.array  # [3, 1, Lc] full-sequence M-RoPE ids of the kept rows
    deepstack: list[mx.array] | None  # each [1, Lc, D] (Qwen3-VL), else None
    kept: np.ndarray  # [Lc] row of the uncompacted sequence each compact row comes from (merged: its representative)
    visual: list[CompactVisual]  # one per visual block, in prompt order
    visual_tokens: list[dict]  # one {"before": N, "after": K} per visual block
    mass: np.ndarray | None = None  # [Lc] float32 tokens each row stands for (proportional), None: all 1


def assemble(
    model,
    input_ids: Sequence[int],
    blocks: Sequence[mx.array],
    positions,
    grids: Sequence[tuple],
    compaction: Compaction | None = None,
    *,
    deepstack: Sequence[list[mx.array]] | None = None,
    attention: Sequence[mx.array] | None = None,
    kept: Sequence | None = None,
    unit_mass: Sequence | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> Assembled:
    """Compact every visual block of a prompt and build the LLM's input.

    model: a Qwen-VL model (its `config` token ids, `splice` and text embeddings are used).
    input_ids: the UNCOMPACTED prompt [L]; `positions`: its full-sequence M-RoPE ids [3, L] (`model.positions`).
    blocks: one [N_i, D] merged block per run of visual tokens, in prompt order (an image, a Qwen2/2.5-VL
        video, or one temporal slice of a Qwen3-VL video); `grids`: each block's merged grid (t, h, w).
    compaction: applied to each block with its own budget; None or identity keeps everything.
    deepstack: per block, a list of [N_i, D] DeepStack features (compacted with the same index map).
    attention: per block, optional [N_i] attention received (for `saliency`).
    kept: per block, the kept raster indices when the vision tower already compacted (in-encoder); the blocks
        then hold only those rows and are not compacted again. ``unit_mass``: per block, their mass.
    prompt_ids: text token ids the `prompt` operator aims at (default: the text after the last visual block).
    """
    cfg = model.config
    ids = [int(i) for i in input_ids]
    P = np.asarray(positions, dtype=np.int64).reshape(3, -1)  # [3, L]
    if P.shape[1] != len(ids):
        raise ValueError(f"positions must be [3, {len(ids)}] for the uncompacted prompt, got {P.shape}")
    runs = [(start, n) for start, n, _ in model.visual_runs(ids)]
    if not len(runs) == len(blocks) == len(grids):
        raise ValueError(
            f"the prompt has {len(runs)} visual blocks but {len(blocks)} blocks / {len(grids)} grids were given"
        )
    prompt_embeds = None
    if compaction is not None and compaction.single_turn:
        if prompt_ids is None:
            specials = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id}
            tail = ids[runs[-1][0] + runs[-1][1] :] if runs else ids
            prompt_ids = [t for t in tail if t not in specials] or tail
        prompt_embeds = model.language_model.model.embed_tokens(mx.array(list(prompt_ids)))  # [P, D]
    c = compaction or Compaction.none()
    new_ids, rows, visual, counts, masses, prev = [], [], [], [], [], 0
    for j, ((start, n), feats, grid) in enumerate(zip(runs, blocks, grids)):
        grid = tuple(int(g) for g in grid)
        if int(np.prod(grid)) != n:
            raise ValueError(
                f"visual block {j}: the prompt has {n} tokens but its grid {grid} holds {int(np.prod(grid))}"
            )
        ds = list(deepstack[j]) if deepstack is not None else []
        if kept is not None:  # compacted inside the vision tower
            src = np.asarray(kept[j], np.int64).reshape(-1)
            if feats.shape[0] != len(src):
                raise ValueError(f"visual block {j}: {feats.shape[0]} features for {len(src)} kept units")
            mass = None if unit_mass is None else unit_mass[j]
            cv = CompactVisual(feats, P[:, start + src], mx.array(src.astype(np.int32)), ds, grid, mass=mass)
        else:
            tokens = VisualTokens(
                features=feats,
                grid=grid,
                positions=P[:, start : start + n],
                attention_received=None if attention is None else attention[j],
                deepstack=ds,
                prompt_embeds=prompt_embeds,
            )
            cv = compact(tokens, c)
        src = np.array(cv.source).astype(np.int64)  # [K]
        new_ids += ids[prev:start] + [ids[start]] * cv.k
        rows.append(np.arange(prev, start))
        rows.append(start + src)
        masses += [
            np.ones(start - prev, np.float32),
            np.ones(cv.k, np.float32) if cv.mass is None else np.array(cv.mass, np.float32),
        ]
        visual.append(cv)
        counts.append({"before": n, "after": cv.k})
        prev = start + n
    new_ids += ids[prev:]
    rows.append(np.arange(prev, len(ids)))
    rows = np.concatenate(rows).astype(np.int64)  # [Lc]
    has_ds = any(cv.deepstack for cv in visual)
    embeds, ds_dense = model.splice(
        new_ids, [cv.features for cv in visual], [cv.deepstack for cv in visual] if has_ds else None
    )
    pos = P[:, rows]  # [3, Lc] text keeps its full-sequence positions
    mass = None
    if any(cv.mass is not None for cv in visual):
        mass = np.concatenate(masses + [np.ones(len(ids) - prev, np.float32)])  # [Lc]
    return Assembled(new_ids, embeds, mx.array(pos)[:, None, :], ds_dense, rows, visual, counts, mass)
