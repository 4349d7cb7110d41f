"""Qwen3-VL: full-attention ViT with a learned position table and DeepStack, Qwen3 LLM.

The 2D position table (side x side) is bilinearly resampled (align_corners) to each image's patch
grid and added after the patch embed. DeepStack mergers turn chosen ViT blocks' outputs into
extra features that the LLM adds to the visual rows after its first layers.
"""

import mlx.core as mx
import mlx.nn as nn

from .base import VLModel
from .vision import ACTIVATIONS, PatchEmbed, VisionBlock, VisionTower


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class PatchMerger(nn.Module):
    def __init__(self, cfg, postshuffle: bool):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.hidden if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.hidden, self.hidden)
        self.linear_fc2 = nn.Linear(self.hidden, cfg.out_hidden_size)

    def __call__(self, x):
        x = self.norm(x.reshape(-1, self.hidden)) if self.postshuffle else self.norm(x).reshape(-1, self.hidden)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


def _taps(n: int, side: int):
    """Bilinear taps [n, 2] and weights [n, 2] into a table axis of ``side`` (align_corners)."""
    src = mx.arange(n, dtype=mx.float32) * (side - 1) / max(n - 1, 1)
    lo = mx.floor(src)
    taps = lo[:, None] + mx.array([0.0, 1.0])  # [n, 2]
    weights = mx.maximum(1 - mx.abs(src[:, None] - taps), 0)
    return mx.clip(taps, 0, side - 1).astype(mx.int32), weights


class Qwen3VisionTower(VisionTower):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg, bias=True)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        mlp = lambda: VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)  # noqa: E731
        self.blocks = [VisionBlock(cfg, nn.LayerNorm, mlp()) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = [PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes]

    def position_table(self, t: int, h: int, w: int) -> mx.array:
        """The learned table resampled to an (h, w) patch grid, block-major, tiled t times: [t*h*w, D]."""
        m, side = self.cfg.spatial_merge_size, self.side
        ht, hwt = _taps(h, side)
        wt, wwt = _taps(w, side)
        idx = ht[:, None, :, None] * side + wt[None, :, None, :]  # [h, w, 2, 2]
        wgt = hwt[:, None, :, None] * wwt[None, :, None, :]  # [h, w, 2, 2]
        emb = (self.pos_embed.weight[idx] * wgt[..., None].astype(self.pos_embed.weight.dtype)).sum((2, 3))  # [h, w, D]
        emb = emb.reshape(h // m, m, w // m, m, -1).transpose(0, 2, 1, 3, 4).reshape(h * w, -1)
        return mx.tile(emb, (t, 1))

    def embed(self, pixel_values, grid_thw):
        x = self.patch_embed(pixel_values)  # [N, D]
        return x + mx.concatenate([self.position_table(*g) for g in grid_thw]).astype(x.dtype)

    def after_block(self, index, x, out):
        if index in self.cfg.deepstack_visual_indexes:
            k = self.cfg.deepstack_visual_indexes.index(index)
            out.deepstack.append(self.deepstack_merger_list[k](x))


class Model(VLModel):
    tower_class = Qwen3VisionTower
