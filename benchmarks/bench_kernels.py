"""Benchmark the pure-MLX twins of mlx_compact.kernels against the naive ops they replace,
and check that KV ring writes by slice assignment stay in place.

Runs on whatever default device MLX has (the CPU backend on Linux); no Metal kernel is timed.

    python benchmarks/bench_kernels.py [--quick]

Prints a table and writes benchmarks/results/bench_kernels.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_compact  # noqa: F401  (before mlx.core: loads OpenBLAS on Linux)
from mlx_compact import _blas
from mlx_compact.kernels import rows

MiB = 2**20


def timeit(fn, repeat):
    for _ in range(3):
        mx.eval(fn())
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_gather(n, d, k, repeat):
    x = mx.random.normal((n, d))
    index = mx.array(np.sort(np.random.default_rng(0).choice(n, k, replace=False)).astype(np.int32))
    mask = mx.zeros((n,), mx.bool_).at[index].add(True)
    mx.eval(x, index, mask)
    shape = f"[{n}, {d}] keep {k}"
    return [
        ("gather_rows twin: take(axis=0)", shape, timeit(lambda: rows._gather_mlx(x, index), repeat)),
        (
            "naive: gather + scatter to full length",
            shape,
            timeit(lambda: mx.zeros_like(x).at[index].add(mx.take(x, index, axis=0)), repeat),
        ),
        ("naive: where(mask) full length", shape, timeit(lambda: mx.where(mask[:, None], x, 0.0), repeat)),
    ]


def bench_merge(n, d, k, repeat):
    rng = np.random.default_rng(1)
    members = rng.permutation(n).astype(np.int32)
    cuts = np.sort(rng.choice(np.arange(1, n), k - 1, replace=False))
    offsets = np.concatenate([[0], cuts, [n]]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, n).astype(np.float32)
    x = mx.random.normal((n, d))
    o, m, w = mx.array(offsets), mx.array(members), mx.array(weights)
    mx.eval(x, o, m, w)

    def naive():
        parts = []
        for a, b in zip(offsets[:-1], offsets[1:]):
            wj = w[int(a) : int(b)]
            parts.append((wj[:, None] * x[m[int(a) : int(b)]]).sum(0, keepdims=True) / wj.sum())
        return mx.concatenate(parts)

    shape = f"[{n}, {d}] into {k}"
    return [
        ("merge_rows twin: take + segmented_mm", shape, timeit(lambda: rows._merge_mlx(x, o, m, w), repeat)),
        ("naive: per-group ops + concatenate", shape, timeit(naive, max(3, repeat // 4))),
    ]


def bench_quantize(heads, cached, chunk, dim, repeat):
    cache = mx.random.normal((1, heads, cached, dim))
    new = mx.random.normal((1, heads, chunk, dim))
    mx.eval(cache, new)
    shape = f"[1, {heads}, {chunk}, {dim}] onto {cached}"
    return [
        ("quantize_rows twin: quantize new chunk", shape, timeit(lambda: rows._quantize_mlx(new, 64, 4), repeat)),
        (
            "naive: concatenate + quantize all",
            shape,
            timeit(lambda: mx.quantize(mx.concatenate([cache, new], axis=2), 64, 4), repeat),
        ),
    ]


def ring_writes(updates, keep_view, shape=(1, 8, 8192, 128), step=4):
    """Write `updates` chunks into a preallocated ring; return memory and time figures."""
    ring = mx.zeros(shape, mx.float32)
    chunk = mx.ones((*shape[:2], step, shape[3]), mx.float32)
    mx.eval(ring, chunk)
    view = None
    start = mx.get_active_memory()
    growth, t = [], time.perf_counter()
    for u in range(updates):
        i = (u * step) % shape[2]
        before = mx.get_active_memory()
        ring[..., i : i + step, :] = chunk
        mx.eval(ring)
        growth.append(mx.get_active_memory() - before)
        if keep_view:
            view = ring[..., : i + step, :]
            mx.eval(view)
    ms = (time.perf_counter() - t) / updates * 1e3
    del view
    return {
        "ring_mib": ring.nbytes / MiB,
        "updates": updates,
        "second_reference": keep_view,
        "active_drift_mib": (mx.get_active_memory() - start) / MiB,
        "mean_alloc_per_update_mib": statistics.mean(growth) / MiB,
        "ms_per_update": ms,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller repeat counts")
    args = parser.parse_args()
    repeat = 5 if args.quick else 20
    updates = 200 if args.quick else 1000

    rows_out = []
    rows_out += bench_gather(4096, 2048, 1024, repeat)
    rows_out += bench_merge(4096, 2048, 1024, repeat)
    rows_out += bench_quantize(2, 4096, 1, 128, repeat)
    rows_out += bench_quantize(2, 4096, 256, 128, repeat)
    ring = [ring_writes(updates, False), ring_writes(min(updates, 100), True)]

    print(f"BLAS: {_blas.BLAS}   device: {mx.default_device()}   mlx {mx.__version__}")
    print(f"{'op':42s} {'shape':34s} {'ms':>9s}")
    for name, shape, ms in rows_out:
        print(f"{name:42s} {shape:34s} {ms:9.3f}")
    print()
    print(
        f"{'ring write (slice assignment)':42s} {'updates':>8s} {'drift MiB':>10s} "
        f"{'alloc/update MiB':>17s} {'ms/update':>10s}"
    )
    for r in ring:
        label = "with a second view alive" if r["second_reference"] else "sole reference (in place)"
        print(
            f"{label:42s} {r['updates']:8d} {r['active_drift_mib']:10.2f} "
            f"{r['mean_alloc_per_update_mib']:17.2f} {r['ms_per_update']:10.3f}"
        )

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "blas": _blas.BLAS,
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "machine": platform.machine(),
        "timings_ms": [{"op": n, "shape": s, "median_ms": ms} for n, s, ms in rows_out],
        "ring": ring,
    }
    path = out / "bench_kernels.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
