"""Qwen2-VL: full-attention ViT (LayerNorm, quick-GELU MLP), Qwen2 LLM with chunked M-RoPE."""

import mlx.nn as nn

from .base import VLModel
from .vision import ACTIVATIONS, PatchEmbed, PatchMerger, VisionBlock, VisionTower


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VisionTower(VisionTower):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.patch_embed = PatchEmbed(cfg)
        mlp = lambda: VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)  # noqa: E731
        self.blocks = [VisionBlock(cfg, nn.LayerNorm, mlp()) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, nn.LayerNorm, cfg.spatial_merge_size)


class Model(VLModel):
    tower_class = Qwen2VisionTower
