"""Small custom kernels for compaction and KV quantization, each with a pure-MLX twin.

Functions:
    gather_rows(x, index)                        -> x[index] along axis 0 (x may be a list)
    merge_rows(x, offsets, members, weights)     -> weighted average of CSR groups of rows
    quantize_rows(x, group_size=64, bits=4)      -> (wq, scales, biases) exactly as mx.quantize
    backend()                                    -> "metal" or "mlx"

Each produces a new, small result in one pass through `mx.fast.metal_kernel` on Metal, and
through the equivalent MLX ops elsewhere (`mx.take`, segment sums with `mx.segmented_mm`,
`mx.quantize`). The environment variable ``MLX_COMPACT_KERNELS`` picks the implementation:
``auto`` (default: Metal kernels when Metal is available and the default device is the GPU),
``metal`` (required; a RuntimeError names the switch where Metal is absent) or ``mlx``.
Kernels never update a buffer in place (MLX allocates every kernel output fresh): KV ring
writes stay MLX slice assignments.

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
  min/max/clamp/abs/fabs/rint/round/floor/ceil/trunc/sqrt/rsqrt/exp/log/fma/precise::divide and
  ``as_type``; types limited to float, float16_t/half, bfloat16_t, (u)int8..64, uint3;
- compute in float32 and convert to the output type with ``static_cast<T>``.
"""

from .rows import ENV, backend, gather_rows, merge_rows, quantize_rows

__all__ = ["ENV", "backend", "gather_rows", "merge_rows", "quantize_rows"]
