"""Small custom kernels for compaction and KV quantization, each with a pure-MLX twin.

Functions:
    gather_rows(x, index)                        -> x[index] along axis 0 (x may be a list)
    merge_rows(x, offsets, members, weights)     -> weighted average of CSR groups of rows
    quantize_rows(x, group_size=64, bits=4)      -> (wq, scales, biases) exactly as mx.quantize
                                                    on the device it runs on
    backend()                                    -> "metal" or "mlx"

Each produces a new, small result in one pass through `mx.fast.metal_kernel` on Metal, and
through the equivalent MLX ops elsewhere (`mx.take`, segment sums with `mx.segmented_mm`,
`mx.quantize`). The environment variable ``MLX_COMPACT_KERNELS`` picks the implementation:
``auto`` (default: Metal kernels when Metal is available and the default device is the GPU),
``metal`` (required; a RuntimeError names the switch where Metal is absent) or ``mlx``.
Kernels never update a buffer in place (MLX allocates every kernel output fresh): KV ring
writes stay MLX slice assignments.

Quantization semantics (MLX 0.32.4). ``mx.quantize`` is not the same function on every device,
so ``quantize_rows`` reproduces the one of the device it runs on:

- Metal kernel: MLX's Metal ``affine_quantize`` (``mlx/backend/metal/kernels/quantized.h``,
  shipped in the wheel under ``mlx/include``), step for step in float32. Per group: the maximum
  starts at 0 and the minimum at ``Limits<T>::max`` (+inf for float types), so
  ``w_max = max(0, max(w))`` and ``w_min = min(w)``; ``scale = max((w_max - w_min) / n_bins, 1e-7)``
  with ``n_bins = 2**bits - 1``, negated unless ``|w_min| > |w_max|``; the dominant edge
  (``w_min`` if ``|w_min| > |w_max|``, else ``w_max``) is snapped to the grid:
  ``q0 = round(edge / scale)`` and, unless ``q0 == 0``, ``scale = edge / q0`` and ``bias = edge``
  (else ``bias = 0``, scale kept); ``q = min(round((w - bias) / scale), n_bins)``; ``round`` is
  half away from zero; eight 4-bit or four 8-bit values per uint32, low bits first; scale and
  bias cast to the input dtype. Constant groups (``w_max == w_min``) hit the 1e-7 floor:
  ``c > 0`` gets ``scale = c / round(c / -1e-7)`` (about -1e-7), ``bias = c``, codes 0; ``c == 0``
  gets ``scale = -1e-7``, ``bias = 0``; ``c < 0`` is all-negative (``w_max = 0``), so
  ``scale = c / round(c / (-c / n_bins))`` (about ``-c / n_bins``), ``bias = c``, codes 0. The
  kernel is compiled with ``math_mode="safe"`` (IEEE division), as MLX compiles its own kernels
  with ``-fno-fast-math``.
- Pure-MLX twin: ``mx.quantize`` itself, hence that of the default device. On the CPU backend
  that is MLX's CPU ``quantize`` (``mlx/backend/cpu/quantized.cpp``, not in the wheel; read in
  MLX's source): the same formulas but with the group's true maximum (from -inf) and
  ``std::rint`` (half to even), values clamped to ``[0, n_bins]``. With
  ``MLX_COMPACT_KERNELS=mlx`` on a Mac's GPU it is MLX's Metal kernel above.

The two differ on all-negative groups (``w_max`` 0 against the true maximum) and wherever a
quotient is exactly half-way (more often the fewer mantissa bits: about 10% of random bfloat16
groups at ``group_size=64``). ``tests/quantize_model.py`` holds a numpy model of both; the tests
check the kernel's source, run as C++, against the Metal model bit for bit and the dispatched
function against ``mx.quantize`` on the current device. NaN and infinite inputs are unspecified.

Supported kernel subset. The kernels here are written so that the exact Metal source MLX
generates can be compiled as C++ against a stand-in header and checked with sanitizers on any
machine (the test suite does this). A kernel in this package must:

- use one thread per output element (or per packed output word) over a 1-D grid, reading
  only ``thread_position_in_grid``, with every output element written by exactly one thread
  and no output read back;
- use no threadgroup memory, barriers, SIMD-group or quad functions, or atomics;
- give no helper function a ``device`` or ``constant`` qualified parameter: inputs with fewer
  than 8 elements arrive as ``constant`` pointers and scalars as ``constant T&``, so helpers
  take pointers as a template parameter (``template <typename P> f(P x, ...)``);
- call Metal library functions qualified (``metal::rint``, ``metal::max``, ...), limited to
  min/max/clamp/abs/fabs/rint/round/floor/ceil/trunc/sqrt/rsqrt/exp/log/fma/precise::divide,
  ``as_type`` and the constant ``INFINITY``; types limited to float, float16_t/half, bfloat16_t,
  (u)int8..64, uint3;
- compute in float32 and convert to the output type with ``static_cast<T>``.
"""

from .rows import ENV, backend, gather_rows, merge_rows, quantize_rows

__all__ = ["ENV", "backend", "gather_rows", "merge_rows", "quantize_rows"]
