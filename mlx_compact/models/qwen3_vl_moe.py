"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL with sparse mixture-of-experts MLPs in the LLM.

Vision tower, mergers, DeepStack, M-RoPE and attention are Qwen3-VL's. An LLM layer has the MoE MLP where
the config says (not in ``mlp_only_layers`` and ``(layer + 1) % decoder_sparse_step == 0``; every layer in the
releases): the router's softmax in float32 over all experts, the top k renormalised to sum to 1 (always:
transformers never reads ``norm_topk_prob``), and SwiGLU experts run by mlx-lm's ``SwitchGLU`` (``gather_mm``,
or ``gather_qmm`` when quantized). There is no shared expert.

On the CPU backend a chunk of many tokens (prefill) runs each routed expert once over all of its rows
(`grouped_switch_glu`) instead: MLX's CPU ``gather_mm`` multiplies routed rows one at a time (a matrix-vector
product per row and projection, each re-reading that expert's [768, 2048] weights), which made a 512-token
chunk of Qwen3-VL-30B-A3B widths take ~7 s a layer on one core; grouped, the same rows are matrix products,
~1.3 s, with the same results (each row's reduction is the same, so the outputs are equal bit for bit here).
Decode (k rows a step) and Metal keep ``SwitchGLU``: Metal's sorted ``gather_mm`` already groups rows.

Parameters are named as mlx-vlm's (``mlp.gate``, ``mlp.switch_mlp.{gate,up,down}_proj``: [E, I, H] and
[E, H, I]); ``sanitize`` maps the fused Hugging Face experts onto them in either orientation:
transformers-5 saves ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I], the Qwen
release [E, H, 2I] and [E, I, H]; gate is the first half of the fused axis.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from .base import VLModel, WeightsError
from .language import dense_mlp
from .qwen3_vl import Qwen3VisionTower

GATE_UP, DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"
GROUPED_MIN_ROWS = 128  # routed rows (tokens x top k) from which grouping pays on the CPU (16 tokens at top 8)


def grouped_switch_glu(switch: SwitchGLU, x: mx.array, experts: mx.array) -> mx.array:
    """``switch(x, experts)`` ([..., k, D]) with one matrix product per routed expert and projection.

    The routed rows are sorted by expert on the host (this evaluates the routing: a synchronisation, which a
    prefill chunk can afford), and each expert's rows go through its gate, up and down projections at once:
    each projection is the expert's own ``SwitchLinear`` / ``QuantizedSwitchLinear`` called on a [1, n, D]
    block with the expert's index, so float, quantized and biased experts are all handled as ``SwitchGLU``
    handles them.
    """
    *lead, D = x.shape
    k = experts.shape[-1]
    flat = np.array(experts).reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=1)
    rows = x.reshape(-1, D)[mx.array(order // k)]  # [N * k, D], grouped by expert
    outs, start = [], 0
    for e in np.flatnonzero(counts):
        n, idx = int(counts[e]), mx.array([int(e)])
        r = rows[None, start : start + n]  # [1, n, D]
        h = switch.activation(switch.up_proj(r, idx), switch.gate_proj(r, idx))
        outs.append(switch.down_proj(h, idx)[0])
        start += n
    y = mx.concatenate(outs, axis=0)[mx.array(np.argsort(order))]  # back to (token, slot) order
    return y.reshape(*lead, k, D)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)  # [B, L, E]
        k = self.top_k
        experts = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])  # [B, L, k]
        weights = mx.take_along_axis(probs, experts, axis=-1)
        weights = (weights / weights.sum(-1, keepdims=True)).astype(x.dtype)  # [B, L, k]
        if experts.size >= GROUPED_MIN_ROWS and not self.training and mx.default_device() == mx.cpu:
            y = grouped_switch_glu(self.switch_mlp, x, experts)  # [B, L, k, D]
        else:
            y = self.switch_mlp(x, experts)  # [B, L, k, D]
        return (y * weights[..., None]).sum(-2)


def expert_orientation(weights: dict, hidden: int, inter: int):
    """Which layout the fused experts of ``weights`` are in: "transformers" ([E, 2I, H] / [E, H, I]),
    "release" ([E, H, 2I] / [E, I, H]), or None when there are none. One checkpoint has one layout, so
    a tensor whose shape fits both (gate_up when H == 2I, down when H == I) is decided by the others."""
    shapes = {
        GATE_UP: {"transformers": (2 * inter, hidden), "release": (hidden, 2 * inter)},
        DOWN: {"transformers": (hidden, inter), "release": (inter, hidden)},
    }
    left, first = None, None
    for key, v in weights.items():
        suffix = next((s for s in shapes if key.endswith(s)), None)
        if suffix is None:
            continue
        fits = {name for name, shape in shapes[suffix].items() if v.ndim == 3 and tuple(v.shape[1:]) == shape}
        if not fits:
            raise WeightsError(
                f"{key} has shape {tuple(v.shape)}; for hidden_size {hidden} and moe_intermediate_size {inter} "
                f"expected [experts, {', '.join(map(str, shapes[suffix]['transformers']))}] (a transformers save) "
                f"or [experts, {', '.join(map(str, shapes[suffix]['release']))}] (the Qwen release)"
            )
        if left is not None and not left & fits:
            raise WeightsError(f"{first} and {key} are in different expert layouts; re-save the checkpoint")
        left, first = (fits if left is None else left & fits), first or key
    if left is not None and len(left) > 1:
        raise WeightsError(
            f"the experts' layout cannot be told from their shapes (hidden_size {hidden} = 2 x "
            f"moe_intermediate_size {inter} and no down_proj to decide); re-save it with transformers 5"
        )
    return None if left is None else left.pop()


class Model(VLModel):
    tower_class = Qwen3VisionTower

    @staticmethod
    def text_mlp(cfg, layer: int) -> nn.Module:
        return SparseMoeBlock(cfg) if cfg.sparse(layer) else dense_mlp(cfg, layer)

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face names and fused experts (either orientation) -> ours; mlx-vlm's pass through."""
        t = self.config.text
        return split_fused_experts(super().sanitize(weights), t.hidden_size, t.moe_intermediate_size)


def split_fused_experts(weights: dict, hidden: int, inter: int) -> dict:
    """Fused Hugging Face experts (``mlp.experts.gate_up_proj`` / ``down_proj``, either orientation, see
    `expert_orientation`) -> mlx-vlm's ``mlp.switch_mlp.{gate,up,down}_proj.weight``; other tensors pass."""
    release = expert_orientation(weights, hidden, inter) == "release"
    for key in [k for k in weights if k.endswith((GATE_UP, DOWN))]:
        w = weights.pop(key)
        w = w.swapaxes(1, 2) if release else w  # -> [E, 2I, H] / [E, H, I]
        prefix = key[: -len("experts.gate_up_proj" if key.endswith(GATE_UP) else "experts.down_proj")]
        if key.endswith(GATE_UP):
            i = w.shape[1] // 2
            weights[prefix + "switch_mlp.gate_proj.weight"] = w[:, :i]
            weights[prefix + "switch_mlp.up_proj.weight"] = w[:, i:]
        else:
            weights[prefix + "switch_mlp.down_proj.weight"] = w
    return weights
