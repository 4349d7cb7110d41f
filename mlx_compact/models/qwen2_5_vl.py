"""Qwen2.5-VL: windowed ViT (RMSNorm, SwiGLU with biases), Qwen2 LLM with chunked M-RoPE.

Tokens are reordered by a window index so each window of 2x2 merge units is contiguous; blocks in
``fullatt_block_indexes`` attend over the whole image, the others within windows. The merger's
output is put back in raster order.
"""

import mlx.core as mx
import mlx.nn as nn

from .base import VLModel
from .vision import ACTIVATIONS, PatchEmbed, PatchMerger, VisionBlock, VisionTower, segment_bounds


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def window_index(grid_thw, merge: int, window: int):
    """Merge-unit order that makes windows contiguous, and the windows' cumulative patch bounds."""
    order, bounds, base = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        for ti in range(t):
            for wh in range(0, gh, window):
                for ww in range(0, gw, window):
                    units = [
                        base + ti * gh * gw + r * gw + c
                        for r in range(wh, min(wh + window, gh))
                        for c in range(ww, min(ww + window, gw))
                    ]
                    order += units
                    bounds.append(bounds[-1] + len(units) * merge * merge)
        base += t * gh * gw
    return mx.array(order), bounds


class Qwen25VisionTower(VisionTower):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg)
        mlp = lambda: VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)  # noqa: E731
        self.blocks = [VisionBlock(cfg, nn.RMSNorm, mlp()) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, nn.RMSNorm, cfg.spatial_merge_size)

    def prepare(self, x, cos, sin, grid_thw):
        merge = self.cfg.spatial_merge_size
        unit = merge * merge
        order, windows = window_index(grid_thw, merge, self.cfg.window_size // merge // self.cfg.patch_size)
        rows = (order[:, None] * unit + mx.arange(unit)[None]).reshape(-1)  # [N]
        ctx = {"bounds": segment_bounds(grid_thw), "windows": windows, "order": order}
        return x[rows], cos[rows], sin[rows], ctx

    def block_bounds(self, index, ctx):
        return ctx["bounds"] if index in self.cfg.fullatt_block_indexes else ctx["windows"]

    def finish(self, merged, ctx):
        return merged[mx.argsort(ctx["order"])]  # back to raster order

    def __call__(self, pixel_values, grid_thw, select=None, select_at: int = 0, received=None, received_at: int = 0):
        if select is not None:
            raise NotImplementedError(
                "Qwen2.5-VL's windowed ViT does not support in-encoder compaction; use post-merger compaction"
            )
        return super().__call__(pixel_values, grid_thw, received=received, received_at=received_at)


class Model(VLModel):
    tower_class = Qwen25VisionTower
