"""Unified-memory accounting: what the device allows, what a run will take, and a plan before running.

All figures are bytes. Estimates are upper bounds of the live tensors at each stage's peak; the
benchmark `benchmarks/bench_memory.py` compares them with measured peaks.
"""

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten


def fmt_bytes(n: int) -> str:
    """Bytes in GiB or MiB, whichever reads better."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class MemoryPlanError(RuntimeError):
    """A run would not fit in the memory this device allows."""


def device_budget() -> dict:
    """Memory this device allows: ``{"total", "available", "source"}``.

    Metal: the recommended working set (what the GPU may wire). Linux/CPU: the OS's available RAM.
    """
    if mx.metal.is_available():
        info = mx.device_info()
        total = int(info.get("memory_size", 0))
        return {"total": total, "available": int(info.get("max_recommended_working_set_size", total)), "source": "metal"}
    total = available = 0
    if sys.platform == "linux":
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    else:
        total = available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"total": total, "available": available, "source": "os"}


def weights_bytes(model) -> int:
    """Bytes of every parameter of a loaded model (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_bytes(text_cfg, tokens: int, dtype_bytes: int = 2, bits: Optional[int] = None, group_size: int = 64) -> int:
    """Exact KV bytes for ``tokens`` tokens: 2 x layers x kv_heads x head_dim x bytes per element."""
    per = text_cfg.num_hidden_layers * text_cfg.num_key_value_heads * text_cfg.head_dim
    if bits is None:
        return 2 * per * tokens * dtype_bytes
    return 2 * tokens * (per * bits // 8 + per // group_size * 2 * dtype_bytes)


def vision_peak(vision_cfg, patches: int, dtype_bytes: int = 4, chunk: int = 2048, fused: bool = False) -> int:
    """Peak activation bytes of the vision tower for ``patches`` patches (one image, one slice)."""
    D, H = vision_cfg.hidden_size, vision_cfg.num_heads
    rows = vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size**2
    live = patches * (rows + 2 * D) * dtype_bytes  # input rows, residual, normed
    block = patches * max(3 * D, 2 * vision_cfg.intermediate_size) * dtype_bytes  # qkv or MLP hidden
    scores = 0 if fused else H * min(chunk, patches) * patches * 4 * 2  # f32 scores + softmax
    rope = patches * (D // H) * 4 * 2  # cos, sin
    return live + block + scores + rope


def prefill_peak(text_cfg, tokens: int, context: int, dtype_bytes: int = 4, fused: bool = False) -> int:
    """Peak activation bytes of one prefill chunk of ``tokens`` queries over ``context`` keys."""
    D, H = text_cfg.hidden_size, text_cfg.num_attention_heads
    live = tokens * 2 * D * dtype_bytes
    mlp = tokens * 3 * text_cfg.intermediate_size * dtype_bytes
    scores = 0 if fused else H * tokens * context * 4 * 2
    logits = text_cfg.vocab_size * 4
    return live + max(mlp, scores) + logits


@dataclass
class Plan:
    """A memory plan for one run. ``fits`` says whether it fits; ``advice`` what would."""

    weights: int
    kv: int
    vision: int
    prefill: int
    budget: int
    tokens: int = 0
    visual_tokens: List[int] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.weights + self.kv + max(self.vision, self.prefill)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def summary(self) -> str:
        rows = [
            ("weights", self.weights), ("KV cache", self.kv), ("vision peak", self.vision),
            ("prefill peak", self.prefill), ("total peak", self.peak), ("device budget", self.budget),
        ]
        lines = [f"{name:>14}: {fmt_bytes(v):>12}" for name, v in rows]
        lines.append(f"{'fits':>14}: {'yes' if self.fits else 'NO'}")
        return "\n".join(lines)


def plan(
    model,
    patches_per_image: Sequence[int],
    prompt_text_tokens: int,
    *,
    keep: float = 1.0,
    max_kv_tokens: Optional[int] = None,
    kv_bits: Optional[int] = None,
    max_tokens: int = 256,
    prefill_step: int = 512,
    budget: Optional[int] = None,
) -> Plan:
    """Plan a run before anything is allocated: weights + KV + the larger activation peak."""
    c = model.config
    merge = c.vision.spatial_merge_size**2
    dtype_bytes = 4 if not mx.metal.is_available() else 2
    fused = mx.metal.is_available()
    visual = [max(1, round(p // merge * keep)) for p in patches_per_image]
    tokens = prompt_text_tokens + sum(visual) + max_tokens
    if max_kv_tokens is not None:
        tokens = min(tokens, max_kv_tokens)
    vision = max((vision_peak(c.vision, p, dtype_bytes, fused=fused) for p in patches_per_image), default=0)
    prefill = prefill_peak(c.text, min(prefill_step, tokens), tokens, dtype_bytes, fused)
    return Plan(
        weights=weights_bytes(model),
        kv=kv_bytes(c.text, tokens, dtype_bytes, kv_bits),
        vision=vision,
        prefill=prefill,
        budget=budget if budget is not None else device_budget()["available"],
        tokens=tokens,
        visual_tokens=visual,
    )


@contextlib.contextmanager
def wired_limit():
    """On Metal, wire up to the recommended working set while running (as mlx-lm does); no-op elsewhere."""
    if not mx.metal.is_available():
        yield
        return
    old = mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
