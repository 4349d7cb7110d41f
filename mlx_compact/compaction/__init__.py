"""Visual-token compaction: fewer visual tokens, each keeping its true M-RoPE position."""

from .assembler import Assembled, assemble
from .attention import attention_received, reduce_to_units
from .compose import compact, compact_many, plan
from .encoder import tower_hooks, unit_selector
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
from .types import ENCODER_METHODS, METHODS, Compaction, CompactVisual, VisualTokens, as_compaction

__all__ = [
    "ENCODER_METHODS",
    "METHODS",
    "Assembled",
    "CompactVisual",
    "Compaction",
    "Selection",
    "VisualTokens",
    "as_compaction",
    "assemble",
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
    "tower_hooks",
    "uniform",
    "unit_selector",
]
