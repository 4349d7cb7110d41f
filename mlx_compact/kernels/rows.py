"""Row kernels (gather, weighted merge, affine quantize) and their pure-MLX twins.

The quantize kernel follows MLX 0.32's Metal quantizer; see `mlx_compact.kernels` for the exact
semantics of each path and their sources.
"""

import os

import mlx.core as mx

ENV = "MLX_COMPACT_KERNELS"
_MODES = ("auto", "metal", "mlx")
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_GATHER_SOURCE = """
    uint e = thread_position_in_grid.x;
    uint D = x_shape[1];
    uint k = e / D;
    uint d = e % D;
    out[e] = x[size_t(index[k]) * D + d];
"""

_MERGE_SOURCE = """
    uint e = thread_position_in_grid.x;
    uint D = x_shape[1];
    uint k = e / D;
    uint d = e % D;
    float acc = 0.0f;
    float wsum = 0.0f;
    for (int j = offsets[k]; j < offsets[k + 1]; ++j) {
        float w = weights[j];
        acc += w * static_cast<float>(x[size_t(members[j]) * D + d]);
        wsum += w;
    }
    out[e] = static_cast<T>(wsum != 0.0f ? acc / wsum : 0.0f);
"""

# MLX 0.32's Metal `affine_quantize` (metal/kernels/quantized.h), step for step, in float32, one
# packed word per thread (MLX: a SIMD group per group, min/max by simd_min/simd_max; min and max
# are exact, so recomputing them per word gives the same values).
_QUANTIZE_HEADER = """
struct AffineParams {
    float scale;
    float bias;
};

template <typename P>
AffineParams affine_params(P w, size_t start, int group_size, int bits) {
    float n_bins = float((1 << bits) - 1);
    float w_min = INFINITY;  // MLX: Limits<T>::max, +inf for float types
    float w_max = 0.0f;      // MLX starts the maximum at 0, not at -inf
    for (int j = 0; j < group_size; ++j) {
        float v = static_cast<float>(w[start + j]);
        w_min = metal::min(w_min, v);
        w_max = metal::max(w_max, v);
    }
    float scale = metal::max((w_max - w_min) / n_bins, 1e-7f);
    bool side = metal::fabs(w_min) > metal::fabs(w_max);
    scale = side ? scale : -scale;
    float edge = side ? w_min : w_max;
    float q0 = metal::round(edge / scale);  // half away from zero
    bool at_zero = q0 == 0.0f;
    AffineParams p;
    p.scale = at_zero ? scale : edge / q0;
    p.bias = at_zero ? 0.0f : edge;
    return p;
}
"""

# As MLX, values are clamped from above only: (w - bias) / scale is >= -0 for finite input.
_QUANTIZE_SOURCE = """
    uint e = thread_position_in_grid.x;
    int per_word = 32 / bits;
    size_t start = size_t(e) * per_word;
    size_t g = start / group_size;
    AffineParams p = affine_params(x, g * group_size, group_size, bits);
    float n_bins = float((1 << bits) - 1);
    uint word = 0;
    for (int i = 0; i < per_word; ++i) {
        float v = static_cast<float>(x[start + i]);
        float q = metal::min(metal::round((v - p.bias) / p.scale), n_bins);
        word |= uint(q) << (i * bits);
    }
    wq[e] = word;
    if (start % group_size == 0) {
        scales[g] = static_cast<T>(p.scale);
        biases[g] = static_cast<T>(p.bias);
    }
"""

_gather_kernel = mx.fast.metal_kernel(
    name="mlx_compact_gather_rows",
    input_names=["x", "index"],
    output_names=["out"],
    source=_GATHER_SOURCE,
)

_merge_kernel = mx.fast.metal_kernel(
    name="mlx_compact_merge_rows",
    input_names=["x", "offsets", "members", "weights"],
    output_names=["out"],
    source=_MERGE_SOURCE,
)

_quantize_kernel = mx.fast.metal_kernel(
    name="mlx_compact_quantize_rows",
    input_names=["x", "group_size", "bits"],
    output_names=["wq", "scales", "biases"],
    source=_QUANTIZE_SOURCE,
    header=_QUANTIZE_HEADER,
    compile_options={"math_mode": "safe"},  # IEEE division, as MLX's own kernels (-fno-fast-math)
)


def backend() -> str:
    """Return ``"metal"`` or ``"mlx"``: which implementation the functions here use.

    Chosen by the ``MLX_COMPACT_KERNELS`` environment variable: ``auto`` (default) uses the
    Metal kernels when Metal is available and the default device is the GPU, ``metal``
    requires them, ``mlx`` always uses the pure-MLX twins.
    """
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(_MODES)}")
    if mode == "mlx":
        return "mlx"
    metal = mx.metal.is_available() and mx.default_device() == mx.gpu
    if metal:
        return "metal"
    if mode == "metal":
        raise RuntimeError(
            f"{ENV}=metal, but Metal is not available here (or the default device is not "
            f"the GPU); set {ENV}=auto or {ENV}=mlx to use the pure-MLX implementation"
        )
    return "mlx"


def _check_float(x: mx.array, name: str):
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def _call(kernel, **kwargs):
    return kernel(**kwargs)


def _launch(kernel, inputs, template, size, shapes, dtypes, verbose):
    return _call(
        kernel,
        inputs=inputs,
        template=template,
        grid=(size, 1, 1),
        threadgroup=(min(256, size), 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        verbose=verbose,
    )


# ---------------------------------------------------------------- gather_rows


def _gather_mlx(x: mx.array, index: mx.array) -> mx.array:
    return mx.take(x, index, axis=0)


def _gather_metal(x: mx.array, index: mx.array, verbose: bool = False) -> mx.array:
    n, k = x.shape[0], index.shape[0]
    x2 = x.reshape(n, -1)
    d = x2.shape[1]
    if k * d == 0:
        return mx.zeros((k, *x.shape[1:]), dtype=x.dtype)
    (out,) = _launch(_gather_kernel, [x2, index], [("T", x.dtype)], k * d, [(k, d)], [x.dtype], verbose)
    return out.reshape(k, *x.shape[1:])


def gather_rows(x, index: mx.array):
    """Rows ``x[index]`` along axis 0, as a new contiguous array.

    Args:
        x: an array ``[N, ...]`` (float32, float16 or bfloat16), or a list/tuple of such arrays
           sharing the first axis (e.g. merged features and every DeepStack feature map).
        index: int32 ``[K]`` with values in ``[0, N)`` (the kept rows, in output order).

    Returns:
        ``[K, ...]`` (a list of them when ``x`` is a list/tuple).
    """
    if isinstance(x, (list, tuple)):
        return [gather_rows(a, index) for a in x]
    _check_float(x, "x")
    index = index.astype(mx.int32)
    if index.ndim != 1:
        raise ValueError(f"index must be 1-D, got shape {index.shape}")
    if backend() == "metal":
        return _gather_metal(x, index)
    return _gather_mlx(x, index)


# ----------------------------------------------------------------- merge_rows


def _merge_mlx(x, offsets, members, weights):
    k, m = offsets.shape[0] - 1, members.shape[0]
    if k == 0 or m == 0:
        return mx.zeros((k, x.shape[1]), dtype=x.dtype)
    segments = mx.stack([offsets[:-1], offsets[1:]], axis=1)
    w = weights.astype(mx.float32)[None, :]
    rows = mx.take(x, members, axis=0).astype(mx.float32)
    num = mx.segmented_mm(w, rows, segments)[:, 0, :]
    den = mx.segmented_mm(w, mx.ones((m, 1), mx.float32), segments)[:, 0, :]
    nonzero = den != 0
    out = mx.where(nonzero, num / mx.where(nonzero, den, 1.0), 0.0)
    return out.astype(x.dtype)


def _merge_metal(x, offsets, members, weights, verbose: bool = False):
    k, d = offsets.shape[0] - 1, x.shape[1]
    if k * d == 0:
        return mx.zeros((k, d), dtype=x.dtype)
    (out,) = _launch(
        _merge_kernel,
        [x, offsets, members, weights],
        [("T", x.dtype)],
        k * d,
        [(k, d)],
        [x.dtype],
        verbose,
    )
    return out


def merge_rows(x: mx.array, offsets: mx.array, members: mx.array, weights: mx.array) -> mx.array:
    """Weighted average of groups of rows (CSR encoding), as a new ``[K, D]`` array.

    Output row ``k`` is ``sum_j w[j] * x[members[j]] / sum_j w[j]`` over
    ``j in range(offsets[k], offsets[k + 1])``, accumulated in float32; a group that is empty
    or whose weights sum to 0 gives a row of zeros.

    Args:
        x: ``[N, D]`` float32, float16 or bfloat16.
        offsets: int32 ``[K + 1]``, non-decreasing, ``offsets[0] == 0``, ``offsets[K] == M``.
        members: int32 ``[M]``, source rows in ``[0, N)``, grouped by output row.
        weights: float32 ``[M]``, one weight per member.
    """
    _check_float(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    offsets = offsets.astype(mx.int32)
    members = members.astype(mx.int32)
    weights = weights.astype(mx.float32)
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError("offsets must be 1-D with K + 1 >= 1 entries")
    if members.shape != weights.shape or members.ndim != 1:
        raise ValueError("members and weights must be 1-D of the same length")
    if backend() == "metal":
        return _merge_metal(x, offsets, members, weights)
    return _merge_mlx(x, offsets, members, weights)


# -------------------------------------------------------------- quantize_rows


def _check_quantize(x, group_size, bits):
    _check_float(x, "x")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    if x.ndim < 2 or x.shape[-1] % group_size:
        raise ValueError(f"x must be [..., D] with D a multiple of {group_size}, got {x.shape}")


def _quantize_mlx(x, group_size, bits):
    return mx.quantize(x, group_size=group_size, bits=bits)


def _quantize_metal(x, group_size, bits, verbose: bool = False):
    lead, d = x.shape[:-1], x.shape[-1]
    shapes = [(*lead, d * bits // 32), (*lead, d // group_size), (*lead, d // group_size)]
    dtypes = [mx.uint32, x.dtype, x.dtype]
    words = x.size * bits // 32
    if words == 0:
        return tuple(mx.zeros(s, dtype=t) for s, t in zip(shapes, dtypes))
    return tuple(_launch(_quantize_kernel, [x, group_size, bits], [("T", x.dtype)], words, shapes, dtypes, verbose))


def quantize_rows(x: mx.array, group_size: int = 64, bits: int = 4):
    """Affine-quantize ``x [..., D]`` exactly like ``mx.quantize(x, group_size, bits)`` here.

    Meant for a new chunk of K/V rows ``[B, H, L, D]`` before it is written to a quantized
    cache. ``bits`` is 4 or 8, ``group_size`` 32, 64 or 128, ``D % group_size == 0``.

    Returns:
        ``(wq, scales, biases)``: uint32 ``[..., D * bits / 32]`` and ``[..., D / group_size]``
        in ``x.dtype``, the layout of ``mx.quantize``.

    ``mx.quantize`` differs between MLX's backends (see `mlx_compact.kernels`): the Metal kernel
    repeats MLX's Metal quantizer (maximum from 0, round half away from zero), the pure-MLX path
    is ``mx.quantize`` on the default device (on the CPU backend: true min/max, round half to
    even). The kernel matches a numpy model of MLX's Metal quantizer bit for bit when its
    source runs as C++; on Apple hardware that relies on IEEE division in ``math_mode="safe"``
    and has not been run. NaN and infinite inputs are unspecified.
    """
    _check_quantize(x, group_size, bits)
    if backend() == "metal":
        return _quantize_metal(x, group_size, bits)
    return _quantize_mlx(x, group_size, bits)
