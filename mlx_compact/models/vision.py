"""Blocks shared by the three Qwen-VL vision towers."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x),
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_tanh": nn.gelu_approx,
    "silu": nn.silu,
}

# Queries per attention call on the CPU backend, where attention is not fused and the
# score block [heads, chunk, keys] is materialized. Set lower to bound memory on huge images.
ATTENTION_CHUNK = 2048


@dataclass
class VisionOutput:
    """What a vision tower hands on: merged tokens in raster order per image/slice."""

    features: mx.array  # [M, D_llm]
    deepstack: list[mx.array] = field(default_factory=list)  # each [M, D_llm]
    units: list[mx.array] | None = None  # kept merge-unit indices per image (in-encoder compaction)
    unit_mass: list[mx.array] | None = None  # [k] per image: tokens each kept unit stands for (when select gives it)
    attention: mx.array | None = None  # [U] attention received per merge unit (when asked), raster order


def fused_attention_available() -> bool:
    return mx.metal.is_available()


def causal_mask(L: int, S: int) -> mx.array:
    """Bool [L, S] (True = attend): L queries that are the last L of S keys each see every key up to their own
    (bottom-right aligned, what ``"causal"`` means to MLX's fused attention). The one causal mask of the package."""
    return mx.arange(S)[None] <= (mx.arange(L)[:, None] + (S - L))  # [L, S]


def attend(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """Attention over [B, H, L, d] queries and [B, Hkv, S, d] keys/values (fused SDPA).

    On the CPU backend the score matrix is materialized, so long query runs go in chunks of
    ``ATTENTION_CHUNK``, each evaluated before the next: one score block is alive at a time.
    """
    L, S = q.shape[2], k.shape[2]
    if fused_attention_available() or L <= ATTENTION_CHUNK:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if isinstance(mask, str):
        mask = causal_mask(L, S)  # [L, S]
    outs = []
    for i in range(0, L, ATTENTION_CHUNK):
        m = None if mask is None or mask.shape[-2] == 1 else mask[..., i : i + ATTENTION_CHUNK, :]
        out = mx.fast.scaled_dot_product_attention(q[:, :, i : i + ATTENTION_CHUNK], k, v, scale=scale, mask=m)
        mx.eval(out)
        outs.append(out)
    return mx.concatenate(outs, axis=2)  # [B, H, L, d]


def segment_attention(q, k, v, bounds: Sequence[int], scale: float) -> mx.array:
    """Attention of [N, H, d] rows within the segments given by cumulative bounds.

    Segments of equal length are batched into one call; no [N, N] matrix is formed.
    """
    N, H, d = q.shape
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    starts = [a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(set(lengths)) == 1:  # one size: a reshape, no gather
        n, G = lengths[0], len(lengths)
        qkv = [x.reshape(G, n, H, d).transpose(0, 2, 1, 3) for x in (q, k, v)]  # [G, H, n, d]
        return attend(*qkv, scale).transpose(0, 2, 1, 3).reshape(N, H, d)
    groups = {}
    for a, n in zip(starts, lengths):
        groups.setdefault(n, []).append(a)
    outs, order = [], []
    for n, group_starts in groups.items():
        idx = (mx.array(group_starts)[:, None] + mx.arange(n)[None]).reshape(-1)  # [G*n]
        qkv = [x[idx].reshape(len(group_starts), n, H, d).transpose(0, 2, 1, 3) for x in (q, k, v)]
        outs.append(attend(*qkv, scale).transpose(0, 2, 1, 3).reshape(-1, H, d))
        order.append(idx)
    inverse = mx.argsort(mx.concatenate(order))
    return mx.concatenate(outs)[inverse]


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def patch_coords(grid_thw, merge: int) -> mx.array:
    """(h, w) of every patch, block-major over merge x merge units: [N, 2]."""
    coords = []
    for t, h, w in grid_thw:
        hh = mx.broadcast_to(mx.arange(h)[:, None], (h, w))
        ww = mx.broadcast_to(mx.arange(w)[None, :], (h, w))
        hw = mx.stack([hh, ww], axis=-1).reshape(h // merge, merge, w // merge, merge, 2)
        hw = hw.transpose(0, 2, 1, 3, 4).reshape(-1, 2)  # [h*w, 2]
        coords.append(mx.tile(hw, (t, 1)))
    return mx.concatenate(coords)


def rope_angles(coords: mx.array, head_dim: int, theta: float) -> mx.array:
    """2D RoPE angles for [N, 2] patch coordinates: [N, head_dim // 2] (h half, w half)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (mx.arange(0, 2 * quarter, 2, dtype=mx.float32) / (2 * quarter)))
    ang = coords.astype(mx.float32)[:, :, None] * inv_freq  # [N, 2, head_dim/4]
    return ang.reshape(ang.shape[0], -1)


def segment_bounds(grid_thw) -> list[int]:
    """Cumulative patch bounds of every temporal slice of every image."""
    bounds = [0]
    for t, h, w in grid_thw:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride, applied as one matmul on [N, C*T*P*P] rows."""

    def __init__(self, cfg, bias: bool = False):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        w = self.proj.weight  # [O, T, P, P, C]
        w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)  # [O, C*T*P*P]
        out = x.astype(w.dtype) @ w.T  # [N, O]
        return out + self.proj.bias if "bias" in self.proj else out


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def qkv_rope(self, x: mx.array, cos: mx.array, sin: mx.array):
        """Queries, keys (2D RoPE applied) and values, each [N, H, d]."""
        N, D = x.shape
        q, k, v = self.qkv(x).reshape(N, 3, self.num_heads, -1).transpose(1, 0, 2, 3)  # [N, H, d] each
        q = (q.astype(mx.float32) * cos + rotate_half(q.astype(mx.float32)) * sin).astype(x.dtype)
        k = (k.astype(mx.float32) * cos + rotate_half(k.astype(mx.float32)) * sin).astype(x.dtype)
        return q, k, v

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, bounds) -> mx.array:
        q, k, v = self.qkv_rope(x, cos, sin)
        return self.proj(segment_attention(q, k, v, bounds, self.scale).reshape(x.shape))


class VisionBlock(nn.Module):
    def __init__(self, cfg, norm: Callable, mlp: nn.Module):
        super().__init__()
        self.norm1 = norm(cfg.hidden_size, eps=1e-6)
        self.norm2 = norm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = mlp

    def __call__(self, x, cos, sin, bounds):
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """Patch embed, 2D RoPE, blocks, merger. Subclasses add window attention or DeepStack.

    Optional hooks (the runtime supplies them; the tower knows nothing of how they decide):
    ``received(q [H, N, d], k [H, N, d], scale, bounds) -> [N]`` with ``received_at`` (a block index): the
    attention each patch receives in that block, reported per merge unit in ``VisionOutput.attention``.
    ``select(hidden [U, 4, D], units_grid (t, h, w), attention [U] or None) -> kept unit indices`` (or
    ``(indices, mass)``, reported in ``VisionOutput.unit_mass``) with
    ``select_at`` (a block index): before that block, only the kept 2x2 merge units go on (blocks, merger,
    DeepStack); DeepStack features collected earlier are gathered with the same unit map.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_heads

    def embed(self, pixel_values, grid_thw) -> mx.array:
        return self.patch_embed(pixel_values)  # [N, D]

    def block_bounds(self, index: int, ctx: dict):
        return ctx["bounds"]

    def after_block(self, index: int, x: mx.array, out: VisionOutput):
        pass

    def __call__(self, pixel_values, grid_thw, select=None, select_at: int = 0, received=None, received_at: int = 0):
        grid_thw = [tuple(int(v) for v in g) for g in grid_thw]
        x = self.embed(pixel_values, grid_thw)  # [N, D]
        ang = rope_angles(patch_coords(grid_thw, self.cfg.spatial_merge_size), self.head_dim, self.cfg.rope_theta)
        ang = mx.concatenate([ang, ang], axis=-1)[:, None, :]  # [N, 1, head_dim]
        cos, sin = mx.cos(ang), mx.sin(ang)
        x, cos, sin, ctx = self.prepare(x, cos, sin, grid_thw)
        out = VisionOutput(features=None)
        for i, blk in enumerate(self.blocks):
            if received is not None and i == received_at:
                q, k, _ = blk.attn.qkv_rope(blk.norm1(x), cos, sin)  # [N, H, d]
                att = received(q.transpose(1, 0, 2), k.transpose(1, 0, 2), blk.attn.scale, self.block_bounds(i, ctx))
                out.attention = self.finish(att.reshape(-1, self.cfg.spatial_merge_size**2).sum(-1), ctx)  # [U]
            if select is not None and i == select_at:
                x, cos, sin, ctx["bounds"], out.units, units, out.unit_mass = self.keep_units(
                    x, cos, sin, grid_thw, select, out.attention
                )
                out.deepstack = [d[units] for d in out.deepstack]  # [K, D]: the same unit map
            x = blk(x, cos, sin, self.block_bounds(i, ctx))
            self.after_block(i, x, out)
        out.features = self.finish(self.merger(x), ctx)
        return out

    def prepare(self, x, cos, sin, grid_thw):
        """Reorder rows if the tower needs it; ``ctx`` carries what later steps need."""
        return x, cos, sin, {"bounds": segment_bounds(grid_thw)}

    def finish(self, merged, ctx):
        return merged

    def keep_units(self, x, cos, sin, grid_thw, select, attention=None):
        """Keep the 2x2 merge units that ``select`` picks, per image/slice."""
        m = self.cfg.spatial_merge_size
        unit = m * m
        D = x.shape[-1]
        kept, masses, bounds, offset = [], [], [0], 0
        for t, h, w in grid_thw:
            n = t * h * w // unit
            units = x[offset * unit : (offset + n) * unit].reshape(n, unit, D)  # [n, 4, D]
            att = None if attention is None else attention[offset : offset + n]  # [n]
            picked = select(units, (t, h // m, w // m), att)
            if isinstance(picked, tuple):  # (indices, mass)
                picked, weight = picked
                masses.append(mx.array(weight, dtype=mx.float32))  # [k]
            idx = mx.array(picked, dtype=mx.int32)  # [k] sorted
            kept.append(idx)
            per_slice = [int(((idx >= s * n // t) & (idx < (s + 1) * n // t)).sum()) for s in range(t)]
            for c in per_slice:
                bounds.append(bounds[-1] + c * unit)
            offset += n
        starts = [0]
        for t, h, w in grid_thw[:-1]:
            starts.append(starts[-1] + t * h * w // unit)
        units = mx.concatenate([k + s for k, s in zip(kept, starts)])  # [K] unit indices in the batch
        rows = (units[:, None] * unit + mx.arange(unit)[None]).reshape(-1)  # [K*4]
        return x[rows], cos[rows], sin[rows], bounds, kept, units, masses or None


class PatchMerger(nn.Module):
    """Qwen2/2.5-VL merger: norm per patch, 2x2 patches concatenated, MLP."""

    def __init__(self, dim: int, context_dim: int, norm: Callable, merge: int = 2):
        super().__init__()
        self.hidden = context_dim * merge**2
        self.ln_q = norm(context_dim, eps=1e-6)
        self.mlp = [nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.hidden)  # [N/4, 4*C]
        for layer in self.mlp:
            x = layer(x)
        return x
