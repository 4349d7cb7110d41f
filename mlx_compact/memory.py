"""Unified-memory accounting: what the device allows, what a run will take, and a plan before running.

All figures are bytes. Estimates are upper bounds of the live tensors at each stage's peak; the
benchmark `benchmarks/bench_memory.py` compares them with measured peaks.
"""

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .compaction.types import Compaction, as_compaction
from .models.language import DELTA_STEP
from .models.rope_index import PER_FRAME_VIDEO


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
        return {
            "total": total,
            "available": int(info.get("max_recommended_working_set_size", total)),
            "source": "metal",
        }
    total = available = 0
    if sys.platform == "linux":
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        total, available = info.get("MemTotal", 0), info.get("MemAvailable", 0)
    else:
        total = available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"total": total, "available": available, "source": "os"}


def run_budget() -> int:
    """What a run may plan against, its loaded weights included (a plan counts them, and everything else the
    run holds). Metal: the recommended working set. Linux/CPU: the OS's available RAM plus the memory MLX
    already holds in this process (the loaded weights, a conversation's cache, MLX's buffer cache), which the
    OS no longer counts as available."""
    b = device_budget()
    if b["source"] == "metal":
        return b["available"]
    return b["available"] + mx.get_active_memory() + mx.get_cache_memory()


def weights_bytes(model) -> int:
    """Bytes of every parameter of a loaded model (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_group_size(head_dim: int) -> int:
    """The quantization group of a quantized KV cache: 64 values, or 32 when head_dim is not a multiple of 64.
    The one rule: `generate.make_cache` builds the caches with it and `plan` counts their bytes with it."""
    return 64 if head_dim % 64 == 0 else 32


def attention_layers(text_cfg) -> int:
    """LLM layers that hold keys and values: the ``full_attention`` ones of a hybrid model (``layer_types``),
    else every layer."""
    types = getattr(text_cfg, "layer_types", None)
    return sum(t == "full_attention" for t in types) if types else text_cfg.num_hidden_layers


def linear_layers(text_cfg) -> int:
    """A hybrid model's Gated DeltaNet (linear attention) layers, which hold a fixed state instead of KV."""
    return text_cfg.num_hidden_layers - attention_layers(text_cfg)


def linear_state_bytes(text_cfg, dtype_bytes: int = 2) -> int:
    """Exact bytes of a hybrid model's fixed linear state (batch 1), whatever the context length: per linear
    layer, the causal conv's last K-1 inputs [K-1, C] in the model's dtype (C = 2 Hk dk + Hv dv) and the delta
    rule's recurrent state [Hv, dv, dk] in float32. 0 for a model without linear layers."""
    n = linear_layers(text_cfg)
    if not n:
        return 0
    hk, hv = text_cfg.linear_num_key_heads, text_cfg.linear_num_value_heads
    dk, dv = text_cfg.linear_key_head_dim, text_cfg.linear_value_head_dim
    conv = (text_cfg.linear_conv_kernel_dim - 1) * (2 * hk * dk + hv * dv) * dtype_bytes
    return n * (conv + hv * dv * dk * 4)


def kv_bytes(
    text_cfg, tokens: int, dtype_bytes: int = 2, bits: int | None = None, group_size: int | None = None
) -> int:
    """Exact KV bytes for ``tokens`` tokens (batch 1), as the caches store them: keys and values, per attention
    layer (`attention_layers`: a hybrid's linear layers hold none), kv head and token, of ``head_dim`` elements of
    ``dtype_bytes`` each; quantized (``bits``), the packed ``bits``-bit values plus one scale and one bias
    (``dtype_bytes`` each) per group of ``group_size`` (default `kv_group_size`). The fixed linear state of a
    hybrid is `linear_state_bytes`. ``text_cfg``: anything with ``num_hidden_layers``, ``num_key_value_heads`` and
    ``head_dim`` (a TextConfig)."""
    rows = 2 * attention_layers(text_cfg) * text_cfg.num_key_value_heads * tokens  # keys and values
    hd = text_cfg.head_dim
    if bits is None:
        return rows * hd * dtype_bytes
    return rows * (hd * bits // 8 + 2 * (hd // (group_size or kv_group_size(hd))) * dtype_bytes)


def _attention_chunk() -> int:
    """Queries per attention call on the CPU backend (``models.vision.ATTENTION_CHUNK``, read at plan time)."""
    from .models import vision

    return int(vision.ATTENTION_CHUNK)


def _score_rows(n_queries: int, chunk: int) -> int:
    """Query rows whose [heads, rows, keys] score buffers can be live at once in a query-chunked attention.

    MLX's CPU backend allocates an op's output when the op is *queued*, and the eval loop queues ahead of
    the worker thread. Within a chunk the scores ``s`` and ``softmax(s)`` are both live (softmax cannot
    donate ``s``'s buffer while the matmul task that wrote it still holds it); while that chunk's
    ``p @ v`` runs, the next chunk's score matmul has already been queued and allocated. So: two buffers
    of the largest chunk plus the chunk after it (one chunk: just the two).
    """
    sizes = [min(chunk, n_queries - i) for i in range(0, n_queries, chunk)]
    if not sizes:
        return 0
    return max(2 * a + (sizes[k + 1] if k + 1 < len(sizes) else 0) for k, a in enumerate(sizes))


def vision_peak(vision_cfg, patches: int, dtype_bytes: int = 4, chunk: int | None = None, fused: bool = False) -> int:
    """Peak activation bytes of the vision tower for ``patches`` patches (one image, one slice).

    The peak is inside the largest attention block (a full-attention block when the tower has one,
    else a window of ``window_size`` pixels), or in a block's MLP when that is larger.
    """
    D, H, N = vision_cfg.hidden_size, vision_cfg.num_heads, patches
    hd = D // H
    b = dtype_bytes
    full = vision_cfg.window_size == 0 or len(vision_cfg.fullatt_block_indexes) > 0
    # keys per query: the whole image, or one window of (window_size / patch_size)^2 patches
    keys = N if full else min(N, (vision_cfg.window_size // vision_cfg.patch_size) ** 2)
    chunk = chunk or _attention_chunk()
    # held through every block: 2D-RoPE cos and sin [N, 1, hd] (float32), and DeepStack features
    # taken so far ([N/4, out] per tap, Qwen3-VL)
    held = 2 * N * hd * 4 + len(vision_cfg.deepstack_visual_indexes) * N // 4 * vision_cfg.out_hidden_size * b
    # attention: block input x (kept for the residual), the qkv output [N, 3D] (v is a view of it),
    # RoPE'd q and k, q * scale, the contiguous copies of k^T and v that the matmuls need, and the
    # per-chunk outputs [H, N, hd] = 10 x [N, D]
    attn_rows = 10 * N * D * b
    if fused:
        scores = 0  # fused SDPA (Metal) never materializes the score matrix
    elif full:
        scores = H * _score_rows(N, chunk) * keys * b  # s, softmax(s), next chunk's s
    else:  # windows are batched into one call: scores [windows, H, w, w] and their softmax
        scores = 2 * H * N * keys * b
    # MLP: block input x, normed input, and [N, I] hidden activations: gate, up, act(gate), product
    # (Qwen2.5-VL SwiGLU; a GELU MLP has fc1, act and its temporaries: the same count is an upper bound)
    mlp = 2 * N * D * b + 4 * N * vision_cfg.intermediate_size * b
    # merger: [N/4, 4D] normed rows, hidden and GELU of the same width, output [N/4, out]
    merger = N * D * b + 2 * N * D * b + N // 4 * vision_cfg.out_hidden_size * b
    return held + max(attn_rows + scores, mlp, merger)


def prefill_peak(
    text_cfg,
    tokens: int,
    context: int,
    dtype_bytes: int = 4,
    fused: bool = False,
    prompt_tokens: int = 0,
    deepstack: int = 0,
    moe_grouped: bool | None = None,
    gdn_kernel: bool | None = None,
) -> int:
    """Peak activation bytes of one prefill chunk of ``tokens`` queries over ``context`` keys.

    ``prompt_tokens`` / ``deepstack``: the whole prompt's embeddings [L, D] and DeepStack features
    (``deepstack`` of [L, D]) are held through the prefill. ``moe_grouped``: whether MoE experts may run
    grouped (the CPU backend; see `moe_mlp_peak`); default: whether this device is the CPU. ``gdn_kernel``: whether a
    hybrid's Gated DeltaNet layers run mlx-lm's Metal kernel (see `gdn_peak`).
    """
    D, H, Hkv, hd = text_cfg.hidden_size, text_cfg.num_attention_heads, text_cfg.num_key_value_heads, text_cfg.head_dim
    T, S, b = tokens, context, dtype_bytes
    held = (1 + deepstack) * prompt_tokens * D * b  # prompt embeddings (+ DeepStack rows)
    rope = 2 * T * hd * 4  # cos, sin [1, 1, T, hd] float32 for the chunk
    # attention: h (residual), normed h, q [T, H*hd] and its RoPE'd and scaled copies, k/v and RoPE'd k,
    # the attention output before o_proj
    attn_rows = 2 * T * D * b + 4 * T * H * hd * b + 3 * T * Hkv * hd * b
    scores = 0 if fused else H * _score_rows(T, _attention_chunk()) * S * b
    mixer = attn_rows + scores if attention_layers(text_cfg) else 0
    if linear_layers(text_cfg):
        mixer = max(mixer, gdn_peak(text_cfg, T, b, gdn_kernel))
    # MLP: h, normed h, then [T, I]: gate, up, silu(gate), product
    mlp = 2 * T * D * b + 4 * T * text_cfg.intermediate_size * b
    if text_cfg.num_experts:  # MoE layers (and dense ones unless every layer is sparse)
        dense = text_cfg.sparse_layers < text_cfg.num_hidden_layers
        moe = moe_mlp_peak(
            text_cfg, T, b, grouped=None if moe_grouped is None else moe_grouped and _moe_groups(text_cfg, T)
        )
        shared = getattr(text_cfg, "shared_expert_intermediate_size", 0)
        if shared:  # Qwen3.5-MoE's shared expert, beside the routed output: [T, I_s] x 4 and two [T, D]
            moe += 2 * T * D * b + 4 * T * shared * b
        mlp = max(mlp if dense else 0, moe)
    logits = text_cfg.vocab_size * 4  # the last row only (generate computes lm_head on it alone)
    return held + rope + max(mixer, mlp) + logits


def _conv_channels(text_cfg) -> int:
    """C of a Gated DeltaNet layer: the [q | k | v] channels its causal conv runs over."""
    return 2 * text_cfg.linear_num_key_heads * text_cfg.linear_key_head_dim + (
        text_cfg.linear_num_value_heads * text_cfg.linear_value_head_dim
    )


def gdn_peak(text_cfg, tokens: int, dtype_bytes: int = 4, kernel: bool | None = None) -> int:
    """Peak activation bytes of one Gated DeltaNet (linear attention) layer on a chunk of ``tokens`` rows.

    Held through the layer: its input (the residual) and the normed input [T, D]. Then the largest of:
    - the causal conv: its input with the K-1 cached rows [T + K - 1, C], the running sum of the K taps and
      each tap's product [T, C], the projection [T, C] until the concatenation is done;
    - the delta rule (mlx-lm's ``gated_delta_update``): the conv's SiLU [T, C] (v is a view of it), the
      L2-normed q and k [T, Hk, dk] and their copies repeated onto the Hv value heads, a, b, the decay and beta
      [T, Hv] (float32), the per-token outputs and their stack [T, Hv, dv], and float32 states [Hv, dv, dk]:
      with its Metal kernel (``kernel``; default: Metal is available and dk is a multiple of 32) the one in and
      the one out; on its sequential ops path (the CPU) one per queued row, since MLX's CPU backend allocates
      each step's output when the step is queued, before the steps ahead of it free theirs (one layer at
      Qwen3.6 widths measured 1.04 T + 10 of them for T = 64 .. 512): the layer queues
      `models.language.DELTA_STEP` rows at a time, counted as S + S / 16 + 16 for S = min(T, DELTA_STEP);
    - the output: the delta rule's output and z [T, Hv dv], the gated RMSNorm in float32 (normed, gate,
      its SiLU, product) and the projection [T, D].
    """
    T, D, b = tokens, text_cfg.hidden_size, dtype_bytes
    hk, hv = text_cfg.linear_num_key_heads, text_cfg.linear_num_value_heads
    dk, dv, K = text_cfg.linear_key_head_dim, text_cfg.linear_value_head_dim, text_cfg.linear_conv_kernel_dim
    if kernel is None:
        kernel = mx.metal.is_available() and dk % 32 == 0
    C = _conv_channels(text_cfg)
    S = min(T, DELTA_STEP)
    states = 2 if kernel else S + S // 16 + 16
    conv = (T + K - 1) * C * b + 3 * T * C * b
    delta = T * C * b + 2 * T * (hk + hv) * dk * b + 4 * T * hv * 4 + 2 * T * hv * dv * b + states * hv * dv * dk * 4
    out = 2 * T * hv * dv * b + 4 * T * hv * dv * 4 + T * D * b
    return 2 * T * D * b + max(conv, delta, out)


def _moe_groups(text_cfg, tokens: int) -> bool:
    """Whether a chunk of ``tokens`` runs its experts grouped on the CPU (``models.qwen3_vl_moe``)."""
    from .models import qwen3_vl_moe

    return tokens * text_cfg.num_experts_per_tok >= qwen3_vl_moe.GROUPED_MIN_ROWS


def moe_mlp_peak(text_cfg, tokens: int, dtype_bytes: int = 4, grouped: bool | None = None) -> int:
    """Peak activation bytes of a sparse-MoE MLP (Qwen3-VL-MoE) on ``tokens`` tokens, an upper bound.

    Both paths: h and its norm [T, D]; the router's logits [T, E] and, in float32, their softmax, its negation
    and the argpartition indices. Per routed row (T * k of them, top-k):
    - ``SwitchGLU`` (Metal, and decode): the sorted input copy, the experts' output, its unsorted copy and the
      weighted product [., D], and gate, up and SwiGLU [., I_moe] for every row at once;
    - grouped (the CPU backend's long chunks, `models.qwen3_vl_moe.grouped_switch_glu`): the sorted input
      copy, the experts' outputs, their concatenation and its unsorted copy [., D] (MLX's CPU backend allocates
      an op's output when it is queued, before the sorted copy is freed; measured: 3.7 of them), and gate, up
      and SwiGLU [n, I_moe] of one expert and the next one's (an expert has at most T rows): 3 x
      [min(2T, Tk), I_moe].
    ``grouped`` None: whether this device is the CPU and the chunk is long enough. Every expert's weights are
    resident whichever are routed to: they are in `weights_bytes`.
    """
    T, D, b = tokens, text_cfg.hidden_size, dtype_bytes
    E, k, inter = text_cfg.num_experts, text_cfg.num_experts_per_tok, text_cfg.moe_intermediate_size
    if grouped is None:
        grouped = not mx.metal.is_available() and _moe_groups(text_cfg, T)
    if grouped:
        return 2 * T * D * b + T * E * (b + 12) + 4 * T * k * D * b + 3 * min(2 * T, T * k) * inter * b
    return 2 * T * D * b + T * E * (b + 12) + T * k * (4 * D + 3 * inter) * b


@dataclass
class Plan:
    """A memory plan for one run. ``fits`` says whether it fits; ``advice`` what would."""

    weights: int
    kv: int
    vision: int
    prefill: int
    budget: int
    tokens: int = 0
    visual_tokens: list[int] = field(default_factory=list)
    decode: int = 0  # the largest image decode (pixels and conversion copies), before the vision tower
    state: int = 0  # of ``kv``: a hybrid model's fixed linear state (conv + recurrent, every linear layer)
    notes: list[str] = field(default_factory=list)  # what the figures assume (e.g. MoE: every expert resident)
    ranks: list[tuple] = field(default_factory=list)  # a pipeline's other ranks: (rank, peak, budget) each

    @property
    def peak(self) -> int:
        # images are decoded one at a time, then the vision tower runs, then the KV cache is allocated
        # (generate makes the cache after prepare), so the KV counts only with the prefill
        return self.weights + max(self.decode, self.vision, self.kv + self.prefill)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget and all(peak <= budget for _, peak, budget in self.ranks)

    @property
    def short_rank(self) -> tuple | None:
        """The first other rank of a pipeline that would not fit: (rank, peak, budget), or None."""
        return next((r for r in self.ranks if r[1] > r[2]), None)

    def summary(self) -> str:
        rows = [
            ("weights", self.weights),
            ("KV cache", self.kv),
            *([("linear state", self.state)] if self.state else []),
            ("image decode", self.decode),
            ("vision peak", self.vision),
            ("prefill peak", self.prefill),
            ("total peak", self.peak),
            ("device budget", self.budget),
        ]
        lines = [f"{name:>14}: {fmt_bytes(v):>12}" for name, v in rows]
        for r, peak, budget in self.ranks:
            lines.append(f"{f'rank {r} peak':>14}: {fmt_bytes(peak):>12} of {fmt_bytes(budget)}")
        lines.append(f"{'fits':>14}: {'yes' if self.fits else 'NO'}")
        lines += [f"{'note':>14}: {note}" for note in self.notes]
        return "\n".join(lines)


def planned_compaction(compaction=None, keep: float = 1.0) -> Compaction:
    """The compaction a plan counts: ``compaction`` (a Compaction or spec), else ``keep`` < 1 as shorthand for
    ``Compaction(keep=keep)``, else none."""
    c = as_compaction(compaction)
    if c is not None and keep != 1.0:
        raise ValueError("give the plan a compaction or a keep, not both")
    return c if c is not None else Compaction(keep=keep) if keep < 1.0 else Compaction.none()


def _grid(block, merge: int) -> tuple:
    """A visual block's merged grid (t, h, w); a patch count (shape unknown) is planned as one row of tokens."""
    if isinstance(block, (int, np.integer)):
        return (1, 1, int(block) // merge)
    return tuple(int(g) for g in block)


def plan(
    model,
    blocks: Sequence,
    prompt_text_tokens: int,
    *,
    compaction=None,
    keep: float = 1.0,
    max_kv_tokens: int | None = None,
    kv_bits: int | None = None,
    max_tokens: int = 256,
    prefill_step: int = 512,
    budget: int | None = None,
    decode_bytes: int = 0,
    key_bias: bool = False,
    fused: bool | None = None,
) -> Plan:
    """Plan a run before anything is allocated: weights + the larger of the vision peak and KV + prefill.

    ``blocks``: one entry per visual block (an image; a video or, Qwen3-VL, one temporal slice of it): its merged
    grid (t, h, w) as `generate.image_grids` gives it, or its patch count (shape unknown: planned as one row of
    tokens, which makes pool's count an upper bound). ``compaction`` (a Compaction or spec; or ``keep`` < 1 for
    ``Compaction(keep=keep)``): each block's visual tokens are `Compaction.kept` of its grid (per temporal slice for
    a Qwen3-VL video), exactly what the run keeps (``tokens`` budgets, pool, in-encoder per-slice budgets included).

    Activations are counted in the model's dtype (float32 on the CPU backend). The KV is what the
    cache will *allocate*: a growing cache rounds up to its 256-token steps, a fixed-size cache
    (``max_kv_tokens``) allocates all its slots on the first write. ``decode_bytes``: the peak of decoding
    the largest image file (`mlx_compact.images.ImageFile.decode_bytes`). A hybrid model (Qwen3.5) holds KV in its
    attention layers only, and ``kv`` adds the fixed state of its linear layers (``state``, also apart): what
    every layer's cache allocates, as the run's ``kv_bytes_allocated`` reports it. ``key_bias``: the cache keeps a
    float32 key bias per slot (proportional attention). ``fused``: whether attention is fused SDPA (default:
    whether Metal is available; True plans for a Mac from elsewhere). A MoE model's weights count every
    expert, all resident (a note in the plan says so).
    """
    c = model.config
    text = _owned(model)
    merge = c.vision.spatial_merge_size**2
    dtype_bytes = _dtype_bytes(model)
    fused = mx.metal.is_available() if fused is None else fused
    grids = [_grid(b, merge) for b in blocks]
    comp = planned_compaction(compaction, keep)
    per_frame = c.model_type in PER_FRAME_VIDEO  # a Qwen3-VL video is compacted one temporal slice at a time
    visual = [comp.kept(g, per_frame) for g in grids]
    patches = [t * h * w * merge for t, h, w in grids]
    prompt = prompt_text_tokens + sum(visual)
    tokens = prompt + max_tokens
    if max_kv_tokens is not None:
        tokens = min(tokens, max_kv_tokens)
        kv = kv_bytes(text, max_kv_tokens, dtype_bytes, kv_bits)
        kv += 4 * max_kv_tokens if key_bias else 0  # a float32 bias per slot, kept once for all layers
        step = min(prefill_step, max_kv_tokens // 4 or 1, 512)  # FixedKVCache's max_chunk caps the chunk
        growth = 0
    else:
        kv = kv_bytes(text, -(-tokens // 256) * 256, dtype_bytes, kv_bits)  # KVCache grows in 256 steps
        kv += 4 * -(-tokens // 256) * 256 if key_bias else 0
        step = prefill_step
        # growing one layer's cache concatenates the old buffers with the new step: the old ones are
        # live until the concatenation is done
        growth = kv // max(attention_layers(text), 1)
    state = linear_state_bytes(text, dtype_bytes)  # a hybrid's linear layers: fixed, whatever the length
    vision = max((vision_peak(c.vision, p, dtype_bytes, fused=fused) for p in patches), default=0)
    ds = len(c.vision.deepstack_visual_indexes)
    # quantized KV attention is matmuls over the packed cache: its scores are materialized even on Metal
    prefill = growth + prefill_peak(
        c.text,
        min(step, prompt),
        min(prompt, tokens),
        dtype_bytes,
        fused and kv_bits is None,
        prompt_tokens=prompt,
        deepstack=ds,
        moe_grouped=not fused,
        gdn_kernel=fused and getattr(c.text, "linear_key_head_dim", 0) % 32 == 0,
    )
    ranks = []
    pipe = _pipeline(model)
    if pipe is not None:  # each other rank plans its own layers against its own memory
        slots = max_kv_tokens if max_kv_tokens is not None else -(-tokens // 256) * 256
        ranks = pipe.plan_ranks(
            slots,
            min(step, prompt),
            min(prompt, tokens),
            kv_bits or 0,
            int(key_bias),
            int(fused),
            int(max_kv_tokens is None),
            (budget or 0) // 1024,
        )
    return Plan(
        weights=weights_bytes(model),
        kv=kv + state,
        state=state,
        vision=vision,
        prefill=prefill,
        budget=budget if budget is not None else run_budget(),
        tokens=tokens,
        visual_tokens=visual,
        decode=decode_bytes,
        notes=_notes(c.text, dtype_bytes),
        ranks=ranks,
    )


def _pipeline(model):
    from .pipeline import pipeline_of

    return pipeline_of(model)


def _owned(model):
    """The text config counted for the layers this process runs (a pipeline rank: its share; a hybrid's
    ``layer_types`` those of its layers)."""
    from dataclasses import replace

    text = model.config.text
    types = tuple("linear_attention" if "linear_attn" in layer else "full_attention" for layer in model.layers)
    return replace(text, num_hidden_layers=len(model.layers), layer_types=types if text.layer_types else ())


def stage_plan(
    model, slots: int, chunk: int, context: int, kv_bits: int, key_bias: int, fused: int, growing: int, budget_kib: int
) -> tuple[int, int]:
    """(peak, budget) of a pipeline rank other than 0 for a run: its weights, the KV of its layers (``slots`` per
    layer) and one prefill chunk of ``chunk`` queries over ``context`` keys through its layers (it holds no
    prompt embeddings and no vision tower). ``budget_kib`` 0: what this device allows."""
    text, b = _owned(model), _dtype_bytes(model)
    kv = kv_bytes(text, slots, b, kv_bits or None) + (4 * slots if key_bias else 0)
    growth = kv // max(attention_layers(text), 1) if growing else 0
    kv += linear_state_bytes(text, b)
    prefill = growth + prefill_peak(
        model.config.text, chunk, context, b, bool(fused) and not kv_bits, moe_grouped=not fused
    )
    budget = budget_kib * 1024 if budget_kib else run_budget()
    return weights_bytes(model) + kv + prefill, budget


def _notes(text_cfg, dtype_bytes: int = 2) -> list[str]:
    notes = []
    if linear_layers(text_cfg):
        notes.append(
            f"KV in the {attention_layers(text_cfg)} attention layers only; the KV cache includes the fixed state of "
            f"the {linear_layers(text_cfg)} linear layers ({fmt_bytes(linear_state_bytes(text_cfg, dtype_bytes))}, "
            "the same at any length)"
        )
    if text_cfg.num_experts:
        notes.append(
            f"all {text_cfg.num_experts} experts resident in each of the {text_cfg.sparse_layers} MoE layers "
            f"({text_cfg.num_experts_per_tok} active per token): the weights count every expert"
        )
    return notes


def _dtype_bytes(model) -> int:
    """Bytes per element of the activations: the dtype of the LLM's final norm (float32 on CPU)."""
    lm = model.language_model.model
    for module in (lm.norm, lm.embed_tokens, *model.layers[:1]):  # a pipeline rank has only some of them
        for _, v in tree_flatten(module.parameters()):
            if mx.issubdtype(v.dtype, mx.floating):
                return v.dtype.size
    return 2 if mx.metal.is_available() else 4


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
