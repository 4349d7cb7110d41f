"""Tests for mlx_compact.cache: attention through the caches equals a by-hand reference."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

import mlx_compact  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mlx_compact.cache import (
    FixedKVCache,
    KVCache,
    load_cache,
    save_cache,
)
from mlx_compact.memory import kv_bytes
from mlx_compact.models.language import cache_attention

B, HQ, HKV, D = 1, 4, 2, 64
GS = 32  # quantization group size used in the small tests
SCALE = D**-0.5


def make_qkv(T, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((B, HQ, T, D))  # [B, HQ, T, D]
    k = mx.random.normal((B, HKV, T, D))  # [B, HKV, T, D]
    v = mx.random.normal((B, HKV, T, D))  # [B, HKV, T, D]
    mx.eval(q, k, v)
    return q, k, v


def dequant(x, bits):
    return mx.dequantize(*mx.quantize(x, group_size=GS, bits=bits), group_size=GS, bits=bits)


def reference(q, k, v, pinned, window):
    """Attention of each query t over keys s <= t with s < pinned or s > t - window (numpy)."""
    q, k, v = (np.array(x, dtype=np.float64) for x in (q, k, v))
    T = q.shape[2]
    k = np.repeat(k, HQ // HKV, axis=1)  # [B, HQ, T, D]
    v = np.repeat(v, HQ // HKV, axis=1)
    t, s = np.arange(T)[:, None], np.arange(T)[None]
    visible = (s <= t) & ((s < pinned) | (s > t - window))  # [T, T]
    scores = np.where(visible, q @ k.transpose(0, 1, 3, 2) * SCALE, -np.inf)  # [B, HQ, T, T]
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v  # [B, HQ, T, D]


def run(cache, q, k, v, chunks, pin_after=None):
    """Feed the tokens chunk by chunk through the documented call order; return [B, HQ, T, D]."""
    outs, t = [], 0
    for n in chunks:
        mask = cache.make_mask(n)  # before the update
        keys, values = cache.update_and_fetch(k[:, :, t : t + n], v[:, :, t : t + n])
        outs.append(cache_attention(q[:, :, t : t + n], keys, values, SCALE, mask, cache))  # what the model runs
        mx.eval(outs[-1])
        del keys, values
        t += n
        if pin_after is not None and t == pin_after:
            cache.pin()
    assert t == q.shape[2]
    return mx.concatenate(outs, axis=2)


def split(T, first, sizes, seed=0):
    """Chunk sizes: `first`, then sizes drawn from `sizes` until T tokens are covered."""
    rng = np.random.default_rng(seed)
    chunks = [first]
    while sum(chunks) < T:
        chunks.append(min(int(rng.choice(sizes)), T - sum(chunks)))
    return chunks


C, P, MAX_CHUNK = 48, 8, 5  # window = 48 - 8 - 5 + 1 = 36
CASES = {
    "short-1tok": (30, lambda T: [1] * T),
    "short-chunks": (30, lambda T: split(T, P, [1, 3, 5])),
    "long-1tok": (150, lambda T: [1] * T),
    "long-chunks": (150, lambda T: split(T, P, [1, 2, 5, 4])),
    "long-bigprefill": (150, lambda T: split(T, 45, [5, 1, 3])),  # prefill fills all but 3 slots
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pin_mode", ["ctor", "pin()"])
def test_float_matches_reference(case, pin_mode):
    T, chunker = CASES[case]
    q, k, v = make_qkv(T)
    chunks = chunker(T)
    if pin_mode == "ctor":
        cache = FixedKVCache(C, pinned=P, max_chunk=MAX_CHUNK)
        out = run(cache, q, k, v, chunks)
    else:  # pin() the first P tokens once they are written
        ends = sorted(set(np.cumsum(chunks).tolist()) | {P})
        chunks = np.diff([0] + ends).tolist()
        cache = FixedKVCache(C, max_chunk=MAX_CHUNK)
        out = run(cache, q, k, v, chunks, pin_after=P)
    assert cache.window == C - P - MAX_CHUNK + 1 and cache.offset == T and cache.size() == min(T, C)
    np.testing.assert_allclose(np.array(out), reference(q, k, v, P, cache.window), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits,loose,loose_mean", [(8, 0.03, 0.004), (4, 0.4, 0.05)])
@pytest.mark.parametrize("case", ["short-chunks", "long-1tok", "long-chunks"])
def test_quantized_matches_reference(bits, loose, loose_mean, case):
    T, chunker = CASES[case]
    q, k, v = make_qkv(T, seed=1)
    cache = FixedKVCache(C, pinned=P, bits=bits, group_size=GS, max_chunk=MAX_CHUNK)
    out = np.array(run(cache, q, k, v, chunker(T)))
    assert cache.bits == bits and cache.group_size == GS
    exact = reference(q, dequant(k, bits), dequant(v, bits), P, cache.window)
    np.testing.assert_allclose(out, exact, atol=1e-4, rtol=1e-4)  # same numbers, other order
    float_ref = reference(q, k, v, P, cache.window)
    err = np.abs(out - float_ref)  # quantization error only (outputs are ~0.2 in size)
    assert err.max() < loose and err.mean() < loose_mean


def test_window_is_whole_ring_with_max_chunk_1():
    T = 100
    q, k, v = make_qkv(T, seed=2)
    cache = FixedKVCache(32, pinned=4, max_chunk=1)
    out = run(cache, q, k, v, [4] + [1] * (T - 4))
    assert cache.window == 28
    np.testing.assert_allclose(np.array(out), reference(q, k, v, 4, 28), atol=2e-5, rtol=1e-4)


def test_chunking_does_not_change_the_answer():
    T = 120
    q, k, v = make_qkv(T, seed=3)
    a = run(FixedKVCache(C, pinned=P, max_chunk=MAX_CHUNK), q, k, v, [1] * T)
    b = run(FixedKVCache(C, pinned=P, max_chunk=MAX_CHUNK), q, k, v, split(T, 40, [5, 4]))
    np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5)


def test_masks():
    c = FixedKVCache(16, pinned=4, max_chunk=3)  # ring 12, window 10
    k = mx.zeros((1, 1, 1, 8))
    assert c.make_mask(1) is None and c.make_mask(4) == "causal"
    c.update_and_fetch(mx.zeros((1, 1, 10, 8)), mx.zeros((1, 1, 10, 8)))
    assert c.make_mask(4) == "causal"  # keys 0..13, last query 13 still sees 4
    m = c.make_mask(5)  # last query 14 no longer sees token 4
    assert m.shape == (5, 15) and not m[4, 4].item() and m[4, 3].item() and m[3, 4].item()
    for _ in range(6):
        c.update_and_fetch(k, k)
    assert c.offset == 16
    m = c.make_mask(1)  # wrapped: slot 4 will hold token 16, slots 5, 6 hold tokens 5, 6
    assert m.shape == (1, 16)
    assert m[0].tolist() == [True] * 5 + [False] * 2 + [True] * 9
    assert c.make_mask(2, return_array=True).shape == (2, 16)


def test_float_cache_has_no_bits_for_mlx_lm_dispatch():
    assert not hasattr(FixedKVCache(64), "bits")
    assert FixedKVCache(64, bits=4).bits == 4


def test_errors_and_trim():
    c = FixedKVCache(16, max_chunk=3)
    x = mx.zeros((1, 1, 12, 8))
    c.update_and_fetch(x, x)  # a big chunk is fine while nothing is overwritten
    with pytest.raises(ValueError, match="max_chunk"):
        c.update_and_fetch(x[:, :, :5], x[:, :, :5])
    assert c.is_trimmable() and c.trim(2) == 2 and c.offset == 10
    c.pin(4)
    with pytest.raises(ValueError, match="ring"):
        c.pin(14)
    for _ in range(3):  # 10 -> 19: wraps
        c.update_and_fetch(x[:, :, :3], x[:, :, :3])
    assert not c.is_trimmable() and c.trim(1) == 0
    with pytest.raises(ValueError, match="wrapped"):
        c.pin(6)


def test_kvcache_equals_fixed_without_rotation():
    T = 70
    q, k, v = make_qkv(T, seed=4)
    chunks = split(T, 20, [1, 7, 1])
    a = run(KVCache(), q, k, v, chunks)
    fixed = FixedKVCache(1024, max_chunk=8)
    b = run(fixed, q, k, v, chunks)
    assert np.array_equal(np.array(a), np.array(b))
    np.testing.assert_allclose(np.array(a), reference(q, k, v, 0, T), atol=2e-5, rtol=1e-4)


def _measure_alloc(bits):
    Hk, Dk, Ck = 8, 128, 4096
    cache = FixedKVCache(Ck, bits=bits)
    x = mx.random.normal((1, Hk, 16, Dk))
    mx.eval(x)
    before = mx.get_active_memory()
    keys, values = cache.update_and_fetch(x, x)
    mx.eval(keys, values)
    del keys, values
    grown = mx.get_active_memory() - before
    return cache, grown


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_nbytes_is_allocated_memory(bits):
    cache, grown = _measure_alloc(bits)
    expected = kv_bytes(SimpleNamespace(num_hidden_layers=1, num_key_value_heads=8, head_dim=128), 4096, 4, bits)
    assert cache.nbytes == expected
    assert abs(grown - cache.nbytes) <= 0.01 * cache.nbytes, (grown, cache.nbytes)
    assert cache.used_bytes == cache.nbytes * 16 // 4096


def _full_cache(bits, C=2048):
    cache = FixedKVCache(C, pinned=32, bits=bits, max_chunk=16)
    x = mx.random.normal((1, 8, C, 128))
    mx.eval(cache.update_and_fetch(x, x))  # full
    step = mx.random.normal((1, 8, 16, 128))
    mx.eval(step)
    return cache, step


@pytest.mark.parametrize("bits", [None, 8])
def test_updates_stay_in_place(bits):
    cache, step = _full_cache(bits)
    flat = mx.get_active_memory()
    for i in range(300):
        n = 1 if i % 3 else 16  # single tokens and chunks that wrap the ring
        mx.reset_peak_memory()
        mask = cache.make_mask(n)
        keys, values = cache.update_and_fetch(step[:, :, :n], step[:, :, :n])
        mx.eval(keys, values, *([mask] if isinstance(mask, mx.array) else []))
        del keys, values, mask
        assert mx.get_active_memory() == flat, i
        assert mx.get_peak_memory() - flat < cache.nbytes // 8, i  # no buffer was copied
    assert cache.offset == 2048 + 100 * 16 + 200


def test_a_live_view_forces_a_copy():
    """Control for the test above: holding a view makes the update copy the buffer."""
    cache, step = _full_cache(None)
    held = cache.state  # views of both buffers
    flat = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(cache.update_and_fetch(step[:, :, :1], step[:, :, :1]))
    assert mx.get_peak_memory() - flat >= cache.nbytes
    del held


def test_kv_bytes_formula():
    cfg = SimpleNamespace(num_hidden_layers=28, num_key_value_heads=4, head_dim=128)
    assert kv_bytes(cfg, 1000) == 2 * 28 * 4 * 128 * 2 * 1000
    # notes: quantized = 2 x layers x kv_heads x head_dim x (bits/8 + 4/group_size) per token
    assert kv_bytes(cfg, 1000, bits=4) == 2 * 28 * 4 * 128 * (4 / 8 + 4 / 64) * 1000
    assert kv_bytes(
        SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=32), 10, bits=8
    ) == 2 * 2 * 2 * 10 * (32 + 2 * 2)  # head_dim 32: groups of kv_group_size(32) = 32, one scale and bias each


@pytest.mark.parametrize("kind", ["kv", "fixed", "fixed-wrapped", "q8-wrapped", "empty"])
def test_save_load_round_trip(tmp_path, kind):
    T = 60
    q, k, v = make_qkv(T + 1, seed=5)
    size, bits = (C if "wrapped" in kind else 128), (8 if kind.startswith("q8") else None)
    if kind == "kv":
        caches = [KVCache(), KVCache()]
    else:
        caches = [FixedKVCache(size, P, bits, GS, max_chunk=MAX_CHUNK) for _ in range(2)]
    if kind != "empty":
        for c in caches:
            run(c, q[:, :, :T], k[:, :, :T], v[:, :, :T], [P] + [1] * (T - P))
    path = str(tmp_path / "chat.safetensors")
    save_cache(path, caches, {"turns": 3, "model": "qwen"})
    loaded, meta = load_cache(path)
    assert meta == {"turns": 3, "model": "qwen"}
    for a, b in zip(caches, loaded):
        assert type(a) is type(b) and a.offset == b.offset and a.meta_state == b.meta_state
        if isinstance(a, FixedKVCache):
            assert a.nbytes == b.nbytes  # full size again
        fa, fb = _flat(a.state), _flat(b.state)
        assert len(fa) == len(fb) and all(mx.array_equal(x, y).item() for x, y in zip(fa, fb))
        if kind != "empty":  # the next token gives the same answer
            sl = slice(T, T + 1)
            oa = run(a, q[:, :, sl], k[:, :, sl], v[:, :, sl], [1])
            ob = run(b, q[:, :, sl], k[:, :, sl], v[:, :, sl], [1])
            assert mx.array_equal(oa, ob).item()


def _flat(state):
    out = []
    for x in state:
        out.extend(x if isinstance(x, tuple) else (x,))
    return out


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool2d", "bool4d-per-head"])
def test_quantized_attention_masks(mask_kind):
    L, S = 5, 20
    q, k, v = make_qkv(S, seed=6)
    q = q[:, :, -L:]  # [B, HQ, L, D], the last L positions
    cache = FixedKVCache(64, bits=8, group_size=GS, max_chunk=8)
    keys, values = cache.update_and_fetch(k, v)
    rng = np.random.default_rng(0)
    mask = {
        "none": None,
        "causal": "causal",
        "bool2d": mx.array(rng.random((L, S)) > 0.3),
        "bool4d-per-head": mx.array(rng.random((B, HQ, L, S)) > 0.3),
    }[mask_kind]
    out = cache_attention(q, keys, values, SCALE, mask, cache)
    dk, dv = dequant(k, 8), dequant(v, 8)
    ref = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=SCALE, mask=mask)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-5, rtol=1e-4)
