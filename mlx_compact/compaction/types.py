"""Contracts between the vision side, the compactor and the assembler."""

from dataclasses import dataclass, field
from numbers import Integral, Real

import mlx.core as mx
import numpy as np

METHOD_HELP = {  # every method, with the line the command line shows for it
    "none": "keep every visual token",
    "pool": "average 2x2 neighbours (keeps 1/4; ignores --keep)",
    "floor": "an evenly spaced grid; fastest, ignores content",
    "diversity": "a grid plus the most different tokens (default; all-rounder)",
    "saliency": "what the vision tower attends to most, plus merged context",
    "merge": "merge similar neighbours instead of dropping them",
    "prompt": "the tokens closest to the question (one-shot, not for chat)",
    "random": "a random subset (a baseline for comparisons)",
}
METHODS = tuple(METHOD_HELP)  # ("none", "pool", "floor", "diversity", "saliency", "merge", "prompt", "random")
ENCODER_METHODS = ("floor", "diversity", "saliency", "random")  # prompt-free unit selectors
WHERE = ("post", "encoder")
PROPORTIONAL_BY_DEFAULT = ("diversity", "merge", "pool")  # post-merger: measured to win on every family


@dataclass
class VisualTokens:
    """One image's (or video's) merged visual tokens, as the vision tower hands them over.

    features: [N, D] merged tokens in raster order per temporal slice (index = t*h*w + hi*w + wi).
    grid: (t, h, w) of the MERGED grid, so N = t*h*w.
    positions: [3, N] int (mx or numpy): this image's slice of the full-sequence M-RoPE ids.
    vit_features: optional [N, Dv] pre-merger features, averaged per merge unit.
    attention_received: optional [N] attention received at a full-attention ViT block, per merge unit
        (see `attention_received` and `reduce_to_units`).
    deepstack: optional list of [N, D] DeepStack features (Qwen3-VL), compacted with the same index map.
    prompt_embeds: optional [P, D] embeddings of the prompt's text tokens (for prompt-aware operators).
    """

    features: mx.array
    grid: tuple
    positions: object
    vit_features: mx.array | None = None
    attention_received: mx.array | None = None
    deepstack: list | None = None
    prompt_embeds: mx.array | None = None

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        if len(self.grid) != 3 or min(self.grid) < 1:
            raise ValueError(f"grid must be three positive ints (t, h, w), got {self.grid}")
        self.features = _mx(self.features)
        self.vit_features = _mx(self.vit_features)
        self.attention_received = _mx(self.attention_received)
        self.prompt_embeds = _mx(self.prompt_embeds)
        self.deepstack = None if self.deepstack is None else [_mx(d) for d in self.deepstack]
        if not isinstance(self.positions, mx.array):
            self.positions = np.asarray(self.positions)
        n = self.n
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(f"features must be [N={n}, D] for grid {self.grid}, got {tuple(self.features.shape)}")
        if tuple(self.positions.shape) != (3, n):
            raise ValueError(f"positions must be [3, {n}], got {tuple(self.positions.shape)}")
        if self.vit_features is not None and self.vit_features.shape[0] != n:
            raise ValueError(f"vit_features must have {n} rows, got {self.vit_features.shape[0]}")
        if self.attention_received is not None and tuple(self.attention_received.shape) != (n,):
            raise ValueError(f"attention_received must be [{n}], got {tuple(self.attention_received.shape)}")
        for i, d in enumerate(self.deepstack or []):
            if d.shape[0] != n:
                raise ValueError(f"deepstack[{i}] must have {n} rows, got {d.shape[0]}")
        if self.prompt_embeds is not None:
            p = self.prompt_embeds
            if p.ndim != 2 or p.shape[1] != self.features.shape[1]:
                raise ValueError(f"prompt_embeds must be [P, {self.features.shape[1]}], got {tuple(p.shape)}")

    @property
    def n(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass
class CompactVisual:
    """The compact visual sequence handed to the assembler.

    features: [K, D] contiguous.
    positions: [3, K] the kept tokens' full-sequence M-RoPE ids (a subset of the original columns, never renumbered).
    source: [K] int32 raster index of each kept token in the uncompacted sequence, strictly increasing.
    deepstack: list of [K, D], rows picked/merged with the same index map as `features`.
    grid: the original merged grid (t, h, w).
    weights: [K] float32 total weight merged into each output token (None when nothing was merged).
    groups: [N] int32 output slot each original token went into, -1 if dropped (None when nothing was merged).
    mass: [K] float32 number of original tokens each output token stands for (``Compaction.proportional``;
        None: every token stands for itself).
    """

    features: mx.array
    positions: object
    source: mx.array
    deepstack: list = field(default_factory=list)
    grid: tuple = (1, 1, 1)
    weights: mx.array | None = None
    groups: mx.array | None = None
    mass: mx.array | None = None

    @property
    def k(self) -> int:
        return int(self.features.shape[0])


def _mx(x):
    return x if x is None or isinstance(x, mx.array) else mx.array(x)


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class Compaction:
    """How to compact visual tokens. `Compaction()` is DivPrune-style diversity at keep 0.33 with a floor.

    method: one of "none", "pool", "floor", "diversity", "saliency", "merge", "prompt", "random".
    keep: share of tokens kept, in (0, 1]; 1.0 is the identity. `pool` ignores it (its window fixes 0.25).
    tokens: absolute budget per image; overrides `keep` when given.
    floor_stride: keep every floor_stride-th row and column first (uniform spatial floor, FEATHER-style),
        capped at the budget; None disables it. Ignored by `pool` and `random` (plain baselines).
    merge_dropped: average each dropped token into its nearest kept token (cosine similarity on features).
    window: `merge`: smallest side of the first (h, w) merge window on the merged grid (grown with the budget).
    contextual: `saliency`: share of the budget given to contextual (merged) tokens.
    relevance: `prompt`: weight of prompt relevance against coverage (MMR lambda), in [0, 1].
    prompt_weighted: `merge`: weight the averages by prompt relevance (LightKV); makes it single-turn.
    seed: `random`: seed of the baseline.
    where: "post" compacts the merged tokens after the vision tower (every tower); "encoder" selects whole
        2x2 merge units inside a full-attention tower (Qwen2-VL, Qwen3-VL), so the remaining ViT blocks, the
        merger and DeepStack run on the kept units only. Encoder mode takes floor, diversity, saliency, random.
    encoder_layer: "encoder": the ViT block before which units are selected (None: depth // 3). `saliency`
        measures the attention received at this block (post-merger default: the last full-attention block).
    proportional: size-aware attention (ToMe's proportional attention, in the LLM): each kept token carries
        the mass of the tokens it stands for (its merge group, or the dropped tokens nearest to it), and every
        attention layer adds log(mass) to the logits of its key, so a kept token weighs what its group did,
        at the compact KV size. Default (None): on for post-merger diversity, merge and pool, where the
        fidelity benchmark shows it wins on every family; off elsewhere (it hurts saliency and in-encoder).
    """

    method: str = "diversity"
    keep: float = 0.33
    tokens: int | None = None
    floor_stride: int | None = 3
    merge_dropped: bool = False
    window: int = 2
    contextual: float = 0.15
    relevance: float = 0.5
    prompt_weighted: bool = False
    seed: int = 0
    where: str = "post"
    encoder_layer: int | None = None
    proportional: bool | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Compaction.method must be one of {METHODS}, got {self.method!r}")
        if not _is_real(self.keep) or not 0.0 < self.keep <= 1.0:
            raise ValueError(f"Compaction.keep must be a number in (0, 1], got {self.keep!r}")
        if self.tokens is not None and (not _is_int(self.tokens) or self.tokens < 1):
            raise ValueError(f"Compaction.tokens must be None or an int >= 1, got {self.tokens!r}")
        if self.floor_stride is not None and (not _is_int(self.floor_stride) or self.floor_stride < 1):
            raise ValueError(f"Compaction.floor_stride must be None or an int >= 1, got {self.floor_stride!r}")
        if not _is_int(self.window) or self.window < 2:
            raise ValueError(f"Compaction.window must be an int >= 2, got {self.window!r}")
        if not _is_real(self.contextual) or not 0.0 <= self.contextual < 1.0:
            raise ValueError(f"Compaction.contextual must be a number in [0, 1), got {self.contextual!r}")
        if not _is_real(self.relevance) or not 0.0 <= self.relevance <= 1.0:
            raise ValueError(f"Compaction.relevance must be a number in [0, 1], got {self.relevance!r}")
        if not _is_int(self.seed):
            raise ValueError(f"Compaction.seed must be an int, got {self.seed!r}")
        if self.where not in WHERE:
            raise ValueError(f"Compaction.where must be one of {WHERE}, got {self.where!r}")
        if self.proportional is None:
            auto = self.method in PROPORTIONAL_BY_DEFAULT and self.where == "post"
            object.__setattr__(self, "proportional", auto)
        if not isinstance(self.proportional, bool):
            raise ValueError(f"Compaction.proportional must be None, True or False, got {self.proportional!r}")
        if self.encoder_layer is not None and (not _is_int(self.encoder_layer) or self.encoder_layer < 0):
            raise ValueError(f"Compaction.encoder_layer must be None or an int >= 0, got {self.encoder_layer!r}")
        if self.where == "encoder" and not self.is_identity:
            if self.method not in ENCODER_METHODS:
                raise ValueError(
                    f"Compaction(where='encoder') selects whole merge units on ViT hidden states: method must be "
                    f"one of {ENCODER_METHODS}, got {self.method!r} (use where='post' for it)"
                )
            if self.merge_dropped:
                raise ValueError("Compaction(where='encoder') keeps whole units: merge_dropped is post-merger only")

    @classmethod
    def none(cls) -> "Compaction":
        """The identity: every visual token is kept."""
        return cls(method="none", keep=1.0)

    @property
    def is_identity(self) -> bool:
        return self.method == "none" or (self.tokens is None and self.keep == 1.0)

    @property
    def single_turn(self) -> bool:
        """True when the result depends on the prompt: re-compact when the question changes."""
        return self.method == "prompt" or (self.method == "merge" and self.prompt_weighted)

    def budget(self, n: int) -> int:
        """Tokens kept out of n by a budgeted selector: `tokens` if given, else round(keep * n) (halves up);
        at least 1, at most n (0 of 0)."""
        if n <= 0:
            return 0
        k = self.tokens if self.tokens is not None else int(np.floor(self.keep * n + 0.5))
        return max(1, min(int(k), n))

    def kept(self, grid, per_frame: bool = False) -> int:
        """Visual tokens one visual block with merged grid (t, h, w) becomes: exactly what `compact` returns
        (post-merger) or the vision tower keeps (``where="encoder"``: each temporal slice its own budget), for
        every method, ``keep`` or ``tokens``. ``per_frame``: the block is a video whose temporal slices are
        compacted as blocks of their own (Qwen3-VL): t times the count of one (1, h, w) slice. The one count:
        the memory plan, the cache-size check and the tests use it."""
        t, h, w = (int(g) for g in grid)
        if per_frame and t > 1:
            return t * self.kept((1, h, w))
        if self.is_identity:
            return t * h * w
        if self.method == "pool":
            return t * ((h + 1) // 2) * ((w + 1) // 2)
        if self.where == "encoder":
            return t * self.budget(h * w)  # each temporal slice gets its own budget
        return self.budget(t * h * w)


def as_compaction(spec) -> Compaction | None:
    """A `Compaction` from a user-facing spec (for loaders and command lines).

    None -> None (no compaction); a Compaction -> itself; a dict -> Compaction(**spec); a string
    "method[:keep[:where]]", e.g. "diversity", "diversity:0.33", "saliency:0.25:encoder", "none".
    """
    if spec is None or isinstance(spec, Compaction):
        return spec
    if isinstance(spec, dict):
        return Compaction(**spec)
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) > 3:
            raise ValueError(f"a compaction spec is 'method[:keep[:where]]', got {spec!r}")
        kw = {"method": parts[0]}
        if len(parts) > 1:
            kw["keep"] = float(parts[1])
        if len(parts) > 2:
            kw["where"] = parts[2]
        return Compaction.none() if parts[0] == "none" else Compaction(**kw)
    raise TypeError(f"a compaction is None, a Compaction, a dict or a 'method[:keep[:where]]' string, got {type(spec)}")
