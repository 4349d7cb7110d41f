"""The Qwen2 / Qwen3 language model with multimodal RoPE (M-RoPE), shared by every Qwen-VL model.

A model file may give its own MLP per layer (``mlp(cfg, layer) -> module``; Qwen3-VL-MoE: experts).
"""

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .config import TextConfig
from .vision import attend, causal_mask, rotate_half


def mrope_axes(head_dim: int, section, interleaved: bool) -> mx.array:
    """Which position row (0=t, 1=h, 2=w) drives each of the head_dim // 2 frequencies."""
    half = head_dim // 2
    if interleaved:  # Qwen3-VL: j % 3 == 1 -> h, j % 3 == 2 -> w (within their sections), else t
        axes = [0] * half
        for j in range(half):
            if j % 3 == 1 and j < 3 * section[1]:
                axes[j] = 1
            elif j % 3 == 2 and j < 3 * section[2]:
                axes[j] = 2
    else:  # Qwen2/2.5-VL: contiguous chunks
        axes = [0] * section[0] + [1] * section[1] + [2] * section[2]
        axes += [0] * (half - len(axes))
    return mx.array(axes[:half])


def quantized_attend(q, k, v, scale, mask, group_size: int, bits: int) -> mx.array:
    """Attention over a quantized cache, via quantized matmuls (no dequantized copy of K/V).

    q: [B, H, L, d]; k, v: (packed, scales, biases) tuples of [B, Hkv, S, *] as a quantized cache's
    ``update_and_fetch`` returns them; mask: None, "causal" or a bool / additive array broadcastable to
    [B, H, L, S] ([L, S], [B, 1, L, S] or per head [B, H, L, S]).
    """
    B, H, L, d = q.shape
    Hkv = k[0].shape[1]
    rep = H // Hkv
    q = (q * scale).reshape(B, Hkv, rep * L, d)  # query heads folded into rows: no broadcast of K/V
    s = mx.quantized_matmul(q, *k, transpose=True, group_size=group_size, bits=bits)  # [B, Hkv, rep*L, S]
    S = s.shape[-1]
    s = s.reshape(B, Hkv, rep, L, S)
    if isinstance(mask, str):
        mask = causal_mask(L, S)  # [L, S]
    if mask is not None and mask.ndim == 4:  # [B, H | 1, L, S] -> [B, Hkv | 1, rep | 1, L, S]
        mask = mask.reshape(mask.shape[0], min(mask.shape[1], Hkv), -1, *mask.shape[2:])
    if mask is not None:
        s = mx.where(mask, s, mx.finfo(s.dtype).min) if mask.dtype == mx.bool_ else s + mask
    p = mx.softmax(s, axis=-1, precise=True).reshape(B, Hkv, rep * L, S)
    out = mx.quantized_matmul(p, *v, transpose=False, group_size=group_size, bits=bits)  # [B, Hkv, rep*L, d]
    return out.reshape(B, H, L, -1)


def cache_attention(q, k, v, scale, mask, cache=None) -> mx.array:
    """Attention over what ``cache.update_and_fetch`` returned (or over plain k, v without a cache): tuples
    from a quantized cache go through `quantized_attend` with its group size and bits, arrays through `attend`.
    What every LLM layer runs."""
    if isinstance(k, tuple):
        return quantized_attend(q, k, v, scale, mask, cache.group_size, cache.bits)
    return attend(q, k, v, scale, mask)


def biased_mask(mask, key_bias: mx.array, L: int, dtype) -> mx.array:
    """An additive mask [B, 1, L | 1, S]: ``key_bias`` [B, S] on the keys ``mask`` (None, "causal" or a bool
    [L, S] / [B, 1, L, S] array, as a cache's ``make_mask`` gives) lets each query see, -inf elsewhere."""
    bias = key_bias.astype(dtype)[:, None, None, :]  # [B, 1, 1, S]
    if mask is None:
        return bias
    S = key_bias.shape[-1]
    if isinstance(mask, str):
        mask = causal_mask(L, S)  # [L, S]
    if mask.dtype != mx.bool_:
        return mask.astype(dtype) + bias
    return mx.where(mask, bias, mx.array(-mx.inf, dtype))  # [B, 1, L, S]


def last_row_mask(mask):
    """The mask (None, "causal" or an array [..., L | 1, S]) of the last of L queries only."""
    if mask is None or isinstance(mask, str):  # "causal" is bottom-right aligned: the last query sees every key
        return None
    return mask[..., -1:, :] if mask.ndim >= 2 and mask.shape[-2] > 1 else mask


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = hd = cfg.head_dim
        self.scale = hd**-0.5
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask=None, cache=None, last_only: bool = False) -> mx.array:
        """``last_only``: keys/values (and the cache) for every row, the query and output for the last row only."""
        B, L, _ = x.shape
        if last_only:
            cos_q, sin_q, mask = cos[..., -1:, :], sin[..., -1:, :], last_row_mask(mask)
        q = self.q_proj(x[:, -1:] if last_only else x).reshape(
            B, 1 if last_only else L, self.n_heads, -1
        )  # [B, Lq, H, hd]
        k = self.k_proj(x).reshape(B, L, self.n_kv, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)  # [B, Hkv, L, hd]
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(0, 2, 1, 3)
        k = k.transpose(0, 2, 1, 3)
        if last_only:
            q = (q.astype(mx.float32) * cos_q + rotate_half(q.astype(mx.float32)) * sin_q).astype(x.dtype)
        else:
            q = (q.astype(mx.float32) * cos + rotate_half(q.astype(mx.float32)) * sin).astype(x.dtype)
        k = (k.astype(mx.float32) * cos + rotate_half(k.astype(mx.float32)) * sin).astype(x.dtype)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = cache_attention(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, q.shape[2], -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def dense_mlp(cfg: TextConfig, layer: int) -> nn.Module:
    """The SwiGLU MLP of every layer of a dense model."""
    return MLP(cfg.hidden_size, cfg.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = mlp if mlp is not None else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask=None, cache=None, last_only: bool = False):
        """``last_only``: every row into the cache, the output [B, 1, D] for the last row only."""
        r = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, last_only)
        x = (x[:, -1:] if last_only else x) + r
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, mlp: Callable[[TextConfig, int], nn.Module] = dense_mlp):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, mlp(cfg, i)) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """Decoder over input embeddings with explicit [3, B, L] M-RoPE positions."""

    def __init__(self, cfg: TextConfig, mlp: Callable[[TextConfig, int], nn.Module] = dense_mlp):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg, mlp)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        half = cfg.head_dim // 2
        self._inv_freq = 1.0 / (cfg.rope_theta ** (mx.arange(0, half, dtype=mx.float32) * 2 / cfg.head_dim))
        self._axes = mrope_axes(cfg.head_dim, cfg.mrope_section, cfg.mrope_interleaved)

    def rope(self, positions: mx.array):
        """cos, sin [B, 1, L, head_dim] in float32 for [3, B, L] positions."""
        pos = positions.astype(mx.float32)  # [3, B, L]
        onehot = (self._axes[None] == mx.arange(3)[:, None]).astype(mx.float32)  # [3, hd/2]
        ang = (pos[..., None] * (onehot * self._inv_freq)[:, None, None]).sum(0)  # [B, L, hd/2]
        ang = mx.concatenate([ang, ang], axis=-1)[:, None]  # [B, 1, L, hd]
        return mx.cos(ang), mx.sin(ang)

    def __call__(
        self,
        inputs_embeds: mx.array,
        positions: mx.array,
        cache: list | None = None,
        deepstack: list[mx.array] | None = None,
        mask=None,
        last_only: bool = False,
        key_bias: mx.array | None = None,
    ) -> mx.array:
        """Logits [B, L, V] for embeddings [B, L, D] at positions [3, B, L] ([B, 1, V] if ``last_only``).

        ``deepstack`` (Qwen3-VL): dense [B, L, D] additions after layers 0, 1, ..., zero on text rows.
        ``key_bias`` [B, L]: added to the attention logits of these tokens' keys in every layer and kept with
        them in the first layer's cache, once for all layers (proportional attention: log of the tokens each
        stands for). The mask, biased or not, is made once for every layer.
        """
        h = inputs_embeds
        cos, sin = self.rope(positions)
        L = h.shape[1]
        layers = self.model.layers
        cache = cache or [None] * len(layers)
        if mask is None:
            c0 = cache[0]
            mask = (
                c0.make_mask(L, return_array=False, window_size=None)
                if c0 is not None and hasattr(c0, "make_mask")
                else ("causal" if L > 1 else None)
            )
        c0 = cache[0]
        if c0 is not None and hasattr(c0, "update_bias"):
            key_bias = c0.update_bias(key_bias, L)  # every held key's bias (None: none ever given)
        if key_bias is not None:
            mask = biased_mask(mask, key_bias, L, h.dtype)
        for i, (layer, c) in enumerate(zip(layers, cache)):
            # last_only: the last layer's attention output and MLP are needed for the last row only
            last = last_only and i == len(layers) - 1
            h = layer(h, cos, sin, mask, c, last)
            if deepstack is not None and i < len(deepstack):
                h = h + (deepstack[i][:, -1:] if last else deepstack[i])
        h = self.model.norm(h[:, -1:] if last_only else h)
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
