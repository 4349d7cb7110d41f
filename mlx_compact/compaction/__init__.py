"""Visual-token compaction: fewer visual tokens, each keeping its true M-RoPE position."""

from .attention import attention_received, reduce_to_units
from .compose import compact, compact_many, plan
from .ops import (
    Selection,
    diversity,
    floor,
    merge,
    nearest_kept,
    pool,
    prompt,
    prompt_relevance,
    random,
    saliency,
    uniform,
)
from .types import METHODS, CompactVisual, Compaction, VisualTokens

__all__ = [
    "METHODS",
    "CompactVisual",
    "Compaction",
    "Selection",
    "VisualTokens",
    "attention_received",
    "compact",
    "compact_many",
    "diversity",
    "floor",
    "merge",
    "nearest_kept",
    "plan",
    "pool",
    "prompt",
    "prompt_relevance",
    "random",
    "reduce_to_units",
    "saliency",
    "uniform",
]
