"""The Qwen2 / Qwen3 / Qwen3.5 language model with multimodal RoPE (M-RoPE), shared by every Qwen-VL model.

A model file may give its own MLP per layer (``mlp(cfg, layer) -> module``; Qwen3-VL-MoE: experts).

Qwen3.5 (``cfg.layer_types``) is a hybrid: a layer's token mixer is either the attention below, gated
(``q_proj`` gives per head ``[q | gate]``, the output is scaled by ``sigmoid(gate)``) with RoPE on the first
``cfg.rotary_dim`` dimensions of each head, or a Gated DeltaNet (linear attention with a fixed-size state;
mlx-lm's ``gated_delta_update``). Its zero-centred RMSNorms (``(1 + w) * x_hat``) are plain ``nn.RMSNorm``
here, holding ``1 + w``: the loader adds the 1 to a Hugging Face checkpoint (mlx-community's has it already).
"""

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk

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


def attention_cache(caches):
    """The cache of the first attention layer in a per-layer list (one that holds keys and values; a hybrid
    model's linear layers hold a fixed state instead), or None. What the mask, the key bias, the prefill and
    the runtime read the token count and the fixed-size settings from."""
    return next((c for c in caches or () if c is not None and hasattr(c, "update_and_fetch")), None)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """RoPE in float32 on the first ``cos.shape[-1]`` dimensions of [B, H, L, hd] (all of them, or Qwen3.5's
    partial rotary); the rest pass through."""
    r, xf = cos.shape[-1], x.astype(mx.float32)
    rot = xf[..., :r] if r < x.shape[-1] else xf
    out = rot * cos + rotate_half(rot) * sin
    if r < x.shape[-1]:
        out = mx.concatenate([out, xf[..., r:]], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = hd = cfg.head_dim
        self.scale = hd**-0.5
        self.gated = cfg.attn_output_gate
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * hd * (2 if self.gated else 1), bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=cfg.attention_bias and self.gated)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask=None, cache=None, last_only: bool = False) -> mx.array:
        """``last_only``: keys/values (and the cache) for every row, the query and output for the last row only."""
        B, L, _ = x.shape
        if last_only:
            cos_q, sin_q, mask = cos[..., -1:, :], sin[..., -1:, :], last_row_mask(mask)
        else:
            cos_q, sin_q = cos, sin
        Lq = 1 if last_only else L
        q = self.q_proj(x[:, -1:] if last_only else x).reshape(B, Lq, self.n_heads, -1)  # [B, Lq, H, hd | 2 hd]
        if self.gated:  # per head [q_h | gate_h]
            q, gate = mx.split(q, 2, axis=-1)  # [B, Lq, H, hd] each
        k = self.k_proj(x).reshape(B, L, self.n_kv, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv, -1).transpose(0, 2, 1, 3)  # [B, Hkv, L, hd]
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(0, 2, 1, 3), cos_q, sin_q)  # [B, H, Lq, hd]
        k = apply_rope(k.transpose(0, 2, 1, 3), cos, sin)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = cache_attention(q, k, v, self.scale, mask, cache).transpose(0, 2, 1, 3).reshape(B, Lq, -1)
        if self.gated:
            out = out * mx.sigmoid(gate.reshape(B, Lq, -1))
        return self.o_proj(out)


def causal_conv(x: mx.array, weight: mx.array, state: mx.array) -> tuple[mx.array, mx.array]:
    """Depthwise causal convolution of x [B, L, C] that follows ``state`` [B, K-1, C] (the K-1 inputs before
    it; zeros at the start), weight [C, K, 1] (MLX's Conv1d layout): the output [B, L, C] and the next state."""
    K, L = weight.shape[1], x.shape[1]
    xx = mx.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+L, C]
    w = weight[:, :, 0].T  # [K, C]
    out = xx[:, :L] * w[0]
    for j in range(1, K):
        out = out + xx[:, j : j + L] * w[j]
    return out, mx.contiguous(xx[:, L:])  # [B, L, C], [B, K-1, C]: a copy, so the state holds not all of xx


class GatedRMSNorm(nn.Module):
    """RMSNorm with a plain weight, then a SiLU gate in float32 (Gated DeltaNet's output norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        y = mx.fast.rms_norm(x, self.weight, self.eps)
        return (y.astype(mx.float32) * nn.silu(gate.astype(mx.float32))).astype(x.dtype)


# rows of the delta rule queued at a time on its sequential ops path (the CPU): MLX holds a float32 state per
# queued row (3 MiB each at Qwen3.5-27B widths), so a 512-row chunk held 1.6 GiB; 16 rows at a time hold ~30
# states and run no slower (one 27B-width layer, 330 rows: 86 MiB and 0.77 s against 1036 MiB and 1.33 s)
DELTA_STEP = 16


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear attention: a causal depthwise conv over [q | k | v], then the gated delta rule
    (mlx-lm's ``gated_delta_update``: its Metal kernel on a Mac, its ops path on the CPU, `DELTA_STEP` rows at
    a time) with Hk key heads
    repeat-interleaved onto Hv value heads, and a SiLU-gated RMSNorm of the output.

    ``cache``: a linear state (``conv`` [B, K-1, C] in the model's dtype, ``recurrent`` [B, Hv, dv, dk] float32,
    and ``update(conv, recurrent, n)``), or None: a fresh state, dropped after the call.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.kernel = K = cfg.linear_conv_kernel_dim
        D, C = cfg.hidden_size, 2 * self.hk * self.dk + self.hv * self.dv
        self.conv_dim = C
        self.in_proj_qkv = nn.Linear(D, C, bias=False)
        self.in_proj_z = nn.Linear(D, self.hv * self.dv, bias=False)
        self.in_proj_b = nn.Linear(D, self.hv, bias=False)
        self.in_proj_a = nn.Linear(D, self.hv, bias=False)
        self.conv1d = nn.Conv1d(C, C, K, groups=C, bias=False)  # weight [C, K, 1]
        self.dt_bias = mx.ones((self.hv,))
        self.A_log = mx.zeros((self.hv,))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.hv * self.dv, D, bias=False)

    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """Output [B, L, D] for x [B, L, D] ([B, 1, D] when ``last_only``: every row still goes into the state)."""
        B, L, _ = x.shape
        conv_state = None if cache is None else cache.conv
        if conv_state is None:
            conv_state = mx.zeros((B, self.kernel - 1, self.conv_dim), x.dtype)
        qkv, conv_state = causal_conv(self.in_proj_qkv(x), self.conv1d.weight, conv_state)  # [B, L, C]
        q, k, v = mx.split(nn.silu(qkv), [self.hk * self.dk, 2 * self.hk * self.dk], axis=-1)
        q, k = normalize_qk(
            q.reshape(B, L, self.hk, self.dk), k.reshape(B, L, self.hk, self.dk), inv_scale=self.dk**-0.5, eps=1e-6
        )
        v = v.reshape(B, L, self.hv, self.dv)
        recurrent = None if cache is None else cache.recurrent
        a, b = self.in_proj_a(x), self.in_proj_b(x)  # [B, L, Hv]
        kernel = not self.training and mx.metal.is_available() and mx.default_device() == mx.gpu and self.dk % 32 == 0
        step = L if kernel else DELTA_STEP
        outs = []
        for i in range(0, L, step):
            j = min(i + step, L)
            out, recurrent = gated_delta_update(
                q[:, i:j],
                k[:, i:j],
                v[:, i:j],
                a[:, i:j],
                b[:, i:j],
                self.A_log,
                self.dt_bias,
                recurrent,
                use_kernel=kernel,
            )  # [B, j - i, Hv, dv], [B, Hv, dv, dk]
            if j < L:
                mx.eval(out, recurrent)
            outs.append(out)
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)  # [B, L, Hv, dv]
        if cache is not None:
            cache.update(conv_state, recurrent, L)
        if last_only:
            x, out, L = x[:, -1:], out[:, -1:], 1
        z = self.in_proj_z(x).reshape(B, L, self.hv, self.dv)
        return self.out_proj(self.norm(out, z).reshape(B, L, -1))


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
    """Token mixer (``self_attn``, or ``linear_attn`` when ``linear``) and MLP, each after an RMSNorm."""

    def __init__(self, cfg: TextConfig, mlp: nn.Module | None = None, linear: bool = False):
        super().__init__()
        if linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = mlp if mlp is not None else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x, cos, sin, mask=None, cache=None, last_only: bool = False):
        """``last_only``: every row into the cache, the output [B, 1, D] for the last row only."""
        h = self.input_layernorm(x)
        if "linear_attn" in self:
            r = self.linear_attn(h, cache, last_only)
        else:
            r = self.self_attn(h, cos, sin, mask, cache, last_only)
        x = (x[:, -1:] if last_only else x) + r
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, mlp: Callable[[TextConfig, int], nn.Module] = dense_mlp):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, mlp(cfg, i), cfg.is_linear(i)) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """Decoder over input embeddings with explicit [3, B, L] M-RoPE positions."""

    def __init__(self, cfg: TextConfig, mlp: Callable[[TextConfig, int], nn.Module] = dense_mlp):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg, mlp)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        rot = cfg.rotary_dim  # head_dim, or Qwen3.5's partial share of it
        self._inv_freq = 1.0 / (cfg.rope_theta ** (mx.arange(0, rot // 2, dtype=mx.float32) * 2 / rot))
        self._axes = mrope_axes(rot, cfg.mrope_section, cfg.mrope_interleaved)
        self.layer_range = (0, cfg.num_hidden_layers)  # [first, stop) of the layers this process runs

    def rope(self, positions: mx.array):
        """cos, sin [B, 1, L, rotary_dim] in float32 for [3, B, L] positions."""
        pos = positions.astype(mx.float32)  # [3, B, L]
        onehot = (self._axes[None] == mx.arange(3)[:, None]).astype(mx.float32)  # [3, hd/2]
        ang = (pos[..., None] * (onehot * self._inv_freq)[:, None, None]).sum(0)  # [B, L, rot/2]
        ang = mx.concatenate([ang, ang], axis=-1)[:, None]  # [B, 1, L, rot]
        return mx.cos(ang), mx.sin(ang)

    pipeline = None  # set on every rank of a pipeline (mlx_compact.pipeline): carries the hidden states on

    @property
    def owned_layers(self) -> list:
        """The layers this process runs: all of them, or its rank's share in a pipeline (``layer_range``)."""
        first, stop = self.layer_range
        return self.model.layers[first:stop]

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
        stands for). The mask, biased or not, is made once for every layer. In a pipeline (rank 0), the
        hidden states go on through the other ranks, whose last one returns the logits.
        """
        h = self.stage(inputs_embeds, positions, cache, deepstack, mask, last_only, key_bias)
        if self.pipeline is not None:
            return self.pipeline.forward(self, h, positions, cache, deepstack, last_only, key_bias)
        return self.head(h, last_only)

    def stage(self, h, positions, cache=None, deepstack=None, mask=None, last_only=False, key_bias=None) -> mx.array:
        """Hidden states [B, L, D] ([B, 1, D] if ``last_only`` and this stage ends with the model's last layer)
        after this process's layers (`owned_layers`), over their caches (the first ``len(owned_layers)`` of
        ``cache``). ``deepstack``: indexed by the model's layer number (None where a layer has none)."""
        cos, sin = self.rope(positions)
        L = h.shape[1]
        first, _ = self.layer_range
        layers = self.owned_layers
        cache = cache[: len(layers)] if cache else [None] * len(layers)
        c0 = attention_cache(cache)
        if mask is None:
            mask = (
                c0.make_mask(L, return_array=False, window_size=None)
                if c0 is not None and hasattr(c0, "make_mask")
                else ("causal" if L > 1 else None)
            )
        if c0 is not None and hasattr(c0, "update_bias"):
            key_bias = c0.update_bias(key_bias, L)  # every held key's bias (None: none ever given)
        if key_bias is not None:
            mask = biased_mask(mask, key_bias, L, h.dtype)
        n = len(self.model.layers)
        for j, (layer, c) in enumerate(zip(layers, cache)):
            i = first + j
            # last_only: the last layer's attention output and MLP are needed for the last row only
            last = last_only and i == n - 1
            h = layer(h, cos, sin, mask, c, last)
            if deepstack is not None and i < len(deepstack) and deepstack[i] is not None:
                h = h + (deepstack[i][:, -1:] if last else deepstack[i])
        return h

    def head(self, h: mx.array, last_only: bool = False) -> mx.array:
        """Logits [B, L | 1, V]: the final norm and the LM head (tied: the embeddings) on hidden states."""
        h = self.model.norm(h[:, -1:] if last_only else h)
        if self.cfg.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)
