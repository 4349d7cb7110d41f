"""M-RoPE position ids (`get_rope_index`) for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE), in pure Python.

Semantics of transformers 4.57 (and vLLM): text counts up on all three rows (t, h, w); a visual
block with merged grid (t, h, w) starting at counter `cur` gives token (ti, hi, wi) the ids
(cur + t_index(ti), cur + hi, cur + wi), and the text after the block starts at max(block) + 1.
t_index is ti for Qwen2-VL, int(ti * second_per_grid_t * tokens_per_second) for Qwen2.5-VL; Qwen3-VL
writes each temporal patch of a video as its own block (timestamps in between are text).
"""

from collections.abc import Sequence
from typing import NamedTuple

from .config import MODEL_TYPES, QWEN3

PER_FRAME_VIDEO = QWEN3  # the Qwen3-VL family: one block per temporal patch, after its timestamp


class VisualSpan(NamedTuple):
    """One block of consecutive visual tokens in a sequence."""

    kind: str  # "image" or "video"
    item: int  # index of the image / video among its kind
    start: int  # index of the first visual token in the sequence
    length: int  # number of visual tokens = t * h * w of `grid`
    grid: tuple[int, int, int]  # merged (t, h, w) of this block
    t_index: tuple[int, ...]  # temporal position offset of each of the t slices


def visual_runs(input_ids: Sequence[int], image_token_id: int, video_token_id: int) -> list[tuple[int, int, str]]:
    """(start, length, "image" | "video") of every maximal run of image or video tokens, in prompt order.

    The one place visual blocks are found in a token sequence: `visual_spans` (which checks them against the
    grids) and the models' splice (which also takes compacted, shorter runs) both use it."""
    kinds = {image_token_id: "image", video_token_id: "video"}
    runs, start = [], None
    ids = list(input_ids)
    for i, t in enumerate(ids + [None]):
        if start is not None and t != ids[start]:
            runs.append((start, i - start, kinds[ids[start]]))
            start = None
        if start is None and t in kinds:
            start = i
    return runs


def visual_spans(
    input_ids: Sequence[int],
    image_grid_thw: Sequence[Sequence[int]],
    video_grid_thw: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    model_type: str,
    tokens_per_second: float = 2,
    second_per_grid_ts: Sequence[float] | None = None,
) -> list[VisualSpan]:
    """The visual blocks of one sequence, in order; grids are the processor's (unmerged) grid_thw.

    Raises ValueError when the visual tokens do not match the grids.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    m = spatial_merge_size
    queues = {
        "image": [(i, 1.0, tuple(g)) for i, g in enumerate(image_grid_thw)],
        "video": [],
    }
    for i, (t, h, w) in enumerate(video_grid_thw):
        step = 1.0
        if model_type == "qwen2_5_vl":
            spg = second_per_grid_ts[i] if second_per_grid_ts is not None else 1.0
            step = spg * tokens_per_second
        if model_type in PER_FRAME_VIDEO:  # one block per temporal patch
            queues["video"] += [(i, step, (1, h, w)) for _ in range(t)]
        else:
            queues["video"].append((i, step, (t, h, w)))
    spans = []
    for pos, n, kind in visual_runs(input_ids, image_token_id, video_token_id):
        if not queues[kind]:
            raise ValueError(f"more {kind} blocks in input_ids than {kind} grids")
        if pos == 0 or input_ids[pos - 1] != vision_start_token_id:
            raise ValueError(f"{kind} tokens at index {pos} do not follow the vision_start token")
        item, step, (t, h, w) = queues[kind].pop(0)
        grid = (int(t), int(h) // m, int(w) // m)
        length = grid[0] * grid[1] * grid[2]
        if n != length:
            raise ValueError(f"{kind} {item}: expected {length} consecutive {kind} tokens at index {pos}, got {n}")
        t_index = tuple(int(ti * step) for ti in range(grid[0]))
        spans.append(VisualSpan(kind, item, pos, length, grid, t_index))
    for kind, queue in queues.items():
        if queue:
            raise ValueError(f"{len(queue)} {kind} grid(s) have no {kind} tokens in input_ids")
    return spans


def get_rope_index(
    input_ids: Sequence[int],
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    video_grid_thw: Sequence[Sequence[int]] | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    model_type: str,
    tokens_per_second: float = 2,
    second_per_grid_ts: Sequence[float] | None = None,
) -> tuple[list[list[int]], int]:
    """M-RoPE positions of one sequence: (3 rows of len(input_ids) ints, rope_delta).

    `rope_delta = max(positions) + 1 - len(input_ids)`; a token generated at sequence offset `k`
    has position `k + rope_delta` on all three rows.
    """
    spans = visual_spans(
        input_ids,
        () if image_grid_thw is None else image_grid_thw,
        () if video_grid_thw is None else video_grid_thw,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size,
        model_type=model_type,
        tokens_per_second=tokens_per_second,
        second_per_grid_ts=second_per_grid_ts,
    )
    rows: list[list[int]] = [[], [], []]
    cur = 0  # next free position id
    pos = 0  # index in input_ids
    for span in spans + [VisualSpan("end", 0, len(input_ids), 0, (0, 0, 0), ())]:
        for _ in range(span.start - pos):  # text before the block
            for row in rows:
                row.append(cur)
            cur += 1
        t, h, w = span.grid
        for ti in range(t):
            for hi in range(h):
                for wi in range(w):
                    rows[0].append(cur + span.t_index[ti])
                    rows[1].append(cur + hi)
                    rows[2].append(cur + wi)
        if span.length:
            cur += max(span.t_index[-1], h - 1, w - 1) + 1
        pos = span.start + span.length
    return rows, cur - len(input_ids)  # cur = max(positions) + 1
