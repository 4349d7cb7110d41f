"""Decode-step time and memory of the KV caches at real widths.

Attention-layer decode step (one new token: update the cache, then attention over it) at
1k / 8k / 32k context for FixedKVCache (float, 8-bit) and mlx-lm's KVCache and
RotatingKVCache, with random K/V; then active memory over a long decode.

    python benchmarks/bench_cache.py [--layers 4] [--steps 10] [--decode 20000]

Prints a table and writes JSON to benchmarks/results/bench_cache.json.
"""

import argparse
import json
import os
import platform
import time

import mlx.core as mx
from mlx_lm.models import cache as lm_cache

import mlx_compact  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mlx_compact import _blas
from mlx_compact.cache import FixedKVCache
from mlx_compact.models.language import cache_attention

HQ, HKV, D = 16, 8, 128  # Qwen2.5-VL-3B / Qwen3-VL-2B style attention widths
PINNED = 256  # system prompt + image tokens kept by FixedKVCache (keep= for RotatingKVCache)
DTYPE = mx.float32  # the CPU backend computes in float32
CONTEXTS = (1024, 8192, 32768)


def make_cache(kind, ctx):
    if kind == "mlx-lm KVCache":
        return lm_cache.KVCache()
    if kind == "mlx-lm RotatingKVCache":
        return lm_cache.RotatingKVCache(max_size=ctx, keep=PINNED)
    bits = 8 if "8-bit" in kind else None
    return FixedKVCache(ctx, pinned=PINNED, bits=bits)


KINDS = ("mlx-lm KVCache", "mlx-lm RotatingKVCache", "FixedKVCache float", "FixedKVCache 8-bit")


def fill(caches, ctx, chunk=2048):
    """Prefill every layer's cache with `ctx` random tokens (no attention)."""
    k = mx.random.normal((1, HKV, chunk, D)).astype(DTYPE)  # [1, HKV, chunk, D]
    mx.eval(k)
    for t in range(0, ctx, chunk):
        n = min(chunk, ctx - t)
        mx.eval([c.update_and_fetch(k[:, :, :n], k[:, :, :n]) for c in caches])


def decode_step(caches, q, k, v):
    """One decode step through every layer: make_mask, update_and_fetch, attention."""
    outs = []
    for c in caches:
        mask = c.make_mask(1, return_array=False, window_size=None)  # mlx-lm's signature
        keys, values = c.update_and_fetch(k, v)
        outs.append(cache_attention(q, keys, values, D**-0.5, mask, c))  # [1, HQ, 1, D], the model's attention
    mx.eval(outs)


def time_decode(kind, ctx, layers, steps):
    caches = [make_cache(kind, ctx) for _ in range(layers)]
    fill(caches, ctx)
    q = mx.random.normal((1, HQ, 1, D)).astype(DTYPE)  # [1, HQ, 1, D]
    kv = mx.random.normal((steps + 3, 1, HKV, 1, D)).astype(DTYPE)  # one new token per step
    mx.eval(q, kv)
    for i in range(3):  # warm-up (also wraps the fixed caches, so timing is the steady state)
        decode_step(caches, q, kv[i], kv[i])
    t0 = time.perf_counter()
    for i in range(3, steps + 3):
        decode_step(caches, q, kv[i], kv[i])
    ms = (time.perf_counter() - t0) * 1e3 / steps / layers
    nbytes = sum(c.nbytes for c in caches) / layers
    del caches
    return ms, nbytes


def memory_over_decode(kind, tokens, capacity, layers, every=1000):
    """Active memory (MiB, above the start) every `every` tokens of a one-token-at-a-time decode."""
    caches = [make_cache(kind, capacity) for _ in range(layers)]
    kv = mx.random.normal((every, 1, HKV, 1, D)).astype(DTYPE)
    mx.eval(kv)
    base = mx.get_active_memory()
    trace = []
    for t in range(tokens):
        mx.eval([c.update_and_fetch(kv[t % every], kv[t % every]) for c in caches])
        if (t + 1) % every == 0:
            trace.append(round((mx.get_active_memory() - base) / 2**20, 1))
    del caches
    return trace


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--decode", type=int, default=20000, help="tokens in the memory run")
    ap.add_argument("--capacity", type=int, default=4096, help="fixed/rotating size in the memory run")
    args = ap.parse_args()
    print(f"BLAS: {_blas.BLAS}")
    print(f"mlx {mx.__version__}, {platform.machine()}, device {mx.default_device()}, dtype {DTYPE}")
    print(f"widths: {HQ} q heads, {HKV} kv heads x {D} head_dim, {args.layers} layers; pinned {PINNED}\n")

    rows = []
    print(f"{'cache':<24}{'context':>9}{'ms/layer/step':>15}{'KV MiB/layer':>14}")
    for ctx in CONTEXTS:
        for kind in KINDS:
            ms, nbytes = time_decode(kind, ctx, args.layers, args.steps)
            rows.append({"cache": kind, "context": ctx, "ms_per_layer_step": ms, "kv_bytes_per_layer": nbytes})
            print(f"{kind:<24}{ctx:>9}{ms:>15.2f}{nbytes / 2**20:>14.1f}", flush=True)

    every = max(1, args.decode // 20)
    print(
        f"\nactive memory (MiB above start, {args.layers} layers) every {every} tokens of a "
        f"{args.decode}-token decode; fixed/rotating capacity {args.capacity}"
    )
    memory = {}
    for kind in KINDS:
        memory[kind] = memory_over_decode(kind, args.decode, args.capacity, args.layers, every)
        print(f"{kind:<24}" + " ".join(f"{m:.0f}" for m in memory[kind]), flush=True)

    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", "bench_cache.json")
    with open(out, "w") as f:
        json.dump(
            {
                "blas": _blas.BLAS,
                "mlx": mx.__version__,
                "machine": platform.machine(),
                "widths": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "layers": args.layers},
                "pinned": PINNED,
                "dtype": str(DTYPE),
                "decode": rows,
                "memory_every": every,
                "memory_capacity": args.capacity,
                "memory_mib": memory,
            },
            f,
            indent=1,
        )
    print(f"\nwrote {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
