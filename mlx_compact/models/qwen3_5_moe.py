"""Qwen3.5-MoE (Qwen3.5-35B-A3B .. 397B-A17B, Qwen3.6-35B-A3B): Qwen3.5 with every MLP a mixture of experts
plus a shared expert.

The routed experts are Qwen3-VL-MoE's block (float32 softmax over all experts, top k, always renormalised;
mlx-lm's ``SwitchGLU``); the shared expert is a SwiGLU of ``shared_expert_intermediate_size`` scaled per token
by ``sigmoid(shared_expert_gate(x))``. Expert layouts: the release's fused ``mlp.experts.gate_up_proj``
[E, 2I, H] / ``down_proj`` [E, H, I], transformers-5's per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
and mlx-community's ``mlp.switch_mlp.*``.
"""

import re

import mlx.core as mx
import mlx.nn as nn

from .base import WeightsError
from .language import MLP
from .qwen3_5 import Model as Qwen35Model
from .qwen3_vl_moe import SparseMoeBlock, split_fused_experts

PER_EXPERT = re.compile(r"(.*\.mlp\.)experts\.(\d+)\.(gate|up|down)_proj\.weight")


class SharedExpertMoeBlock(SparseMoeBlock):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def stack_experts(weights: dict, experts: int) -> dict:
    """Per-expert ``mlp.experts.{e}.{proj}.weight`` -> ``mlp.switch_mlp.{proj}.weight`` [E, out, in]."""
    groups = {}
    for key in list(weights):
        m = PER_EXPERT.fullmatch(key)
        if m:
            groups.setdefault((m[1], m[3]), {})[int(m[2])] = weights.pop(key)
    for (prefix, proj), parts in groups.items():
        if sorted(parts) != list(range(experts)):
            missing = sorted(set(range(experts)) - set(parts)) or sorted(parts)[-1:]
            raise WeightsError(
                f"{prefix}experts.*.{proj}_proj.weight: expert {missing[0]} of {experts} is missing or extra; "
                "download the checkpoint again"
            )
        weights[f"{prefix}switch_mlp.{proj}_proj.weight"] = mx.stack([parts[e] for e in range(experts)])
    return weights


class Model(Qwen35Model):
    @staticmethod
    def text_mlp(cfg, layer: int) -> nn.Module:
        return SharedExpertMoeBlock(cfg)

    def sanitize(self, weights: dict) -> dict:
        t = self.config.text
        weights = split_fused_experts(super().sanitize(weights), t.hidden_size, t.moe_intermediate_size)
        return stack_experts(weights, t.num_experts)
