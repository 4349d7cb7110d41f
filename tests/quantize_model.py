"""numpy models of MLX 0.32's affine quantizers (``mx.quantize``), one per backend.

Both follow MLX's float32 arithmetic step by step, for the group sizes and bit widths
`mlx_compact.kernels.quantize_rows` supports (32/64/128, 4 or 8 bits: whole values per word):

- ``metal=True``: the Metal kernel ``affine_quantize`` (``mlx/backend/metal/kernels/quantized.h``,
  shipped in the wheel under ``mlx/include``): the maximum starts at 0 and the minimum at
  ``Limits<T>::max`` (+inf), so an all-negative group gets ``w_max == 0``; ``round`` (half away
  from zero); values clamped only from above.
- ``metal=False``: the CPU ``quantize`` (``mlx/backend/cpu/quantized.cpp``): the group's true
  minimum and maximum; ``std::rint`` (half to even); values clamped to ``[0, n_bins]``.

Both then share: ``scale = max((w_max - w_min) / n_bins, 1e-7)``, negated unless
``|w_min| > |w_max|``; the dominant edge ``edge`` (``w_min`` or ``w_max``) is snapped to the grid
with ``q0 = round(edge / scale)`` and, unless ``q0 == 0``, ``scale = edge / q0`` and
``bias = edge`` (else ``bias = 0``); ``q = round((w - bias) / scale)``; packed low bits first
into uint32; scale and bias stored in the input dtype. Non-finite inputs are not modelled.
"""

import mlx.core as mx
import numpy as np


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties away from zero (Metal's and C's ``round``), exactly."""
    a = np.abs(x)
    r = np.floor(a)
    r = r + (a - r >= 0.5)  # a - r is exact in binary floating point
    return np.copysign(r, x).astype(x.dtype)


def affine_quantize(x: mx.array, group_size: int, bits: int, metal: bool = True):
    """``(wq, scales, biases)`` as ``mx.quantize(x, group_size, bits)`` on Metal or on the CPU.

    Args:
        x: ``[..., D]`` float32, float16 or bfloat16, ``D % group_size == 0``.
        metal: model the Metal kernel (True) or the CPU quantizer (False).
    """
    lead, d = x.shape[:-1], x.shape[-1]
    f32 = np.float32
    w = np.array(x.astype(mx.float32)).reshape(-1, group_size)  # [G, group_size]
    n_bins, eps, zero = f32((1 << bits) - 1), f32(1e-7), f32(0)
    w_max, w_min = w.max(axis=1), w.min(axis=1)  # [G]
    if metal:
        w_max = np.maximum(w_max, zero)  # the Metal kernel starts the maximum at 0
    rnd = round_half_away if metal else np.rint

    side = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, eps)  # [G]
    scale = np.where(side, scale, -scale)
    edge = np.where(side, w_min, w_max)
    q0 = rnd(edge / scale)
    at_zero = q0 == 0
    scale = np.where(at_zero, scale, edge / np.where(at_zero, f32(1), q0))
    bias = np.where(at_zero, zero, edge)

    q = rnd((w - bias[:, None]) / scale[:, None])  # [G, group_size]
    q = np.minimum(q, n_bins) if metal else np.clip(q, zero, n_bins)
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(-1, per_word)  # [words, per_word]
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    wq = np.bitwise_or.reduce(q << shifts, axis=1)  # [words]

    assert w.dtype == scale.dtype == bias.dtype == np.float32
    groups = (*lead, d // group_size)
    return (
        mx.array(wq.reshape(*lead, d * bits // 32)),
        mx.array(scale.reshape(groups)).astype(x.dtype),
        mx.array(bias.reshape(groups)).astype(x.dtype),
    )
