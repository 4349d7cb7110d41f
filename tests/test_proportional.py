"""Size-aware (proportional) attention: a kept token weighs what the tokens it stands for weighed.

The reference is the diagnostic's model, built without any key bias: the uncompacted-length sequence in
which each compact row is repeated once per token it stands for, the copies of one row seeing each other
(a block mask, so that they stay identical at every layer). Softmax over m identical keys is one key with
log(m) added to its logit, so the compact proportional run must equal it, in prefill and decode, with
float and 8-bit caches, and across a rotating-cache wrap-around (the images are pinned in both).
"""

import mlx.core as mx
import numpy as np
import pytest
from tiny_checkpoints import ARCHS

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact.cache import FixedKVCache, KVCache, load_cache, save_cache
from mlx_compact.chat import ChatSession
from mlx_compact.compaction import Compaction
from mlx_compact.generate import generate, pin_point, prefill, prepare
from mlx_compact.loader import load
from mlx_compact.memory import kv_group_size

PROMPT = "how many shapes are there?"
STEPS = 32


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load(str(tiny_checkpoint(arch)))
        return cache[arch]

    return get


def _mass(prep) -> np.ndarray:
    return np.rint(np.exp(np.array(prep.key_bias[0]))).astype(np.int64)  # [Lc]


def _repeated(prep):
    """Inputs of the reference: each row repeated mass times, and the block-causal mask [Lr, Lr]."""
    row = np.repeat(np.arange(prep.embeds.shape[1]), _mass(prep))  # [Lr] compact row of each repeated row
    g = mx.array(row.astype(np.int32))
    ds = [d[:, g] for d in prep.deepstack] if prep.deepstack else None
    mask = mx.array(row[None, :] <= row[:, None])  # [Lr, Lr]: earlier rows, and every copy of its own row
    return prep.embeds[:, g], prep.positions[:, :, g], ds, mask


def _decode(model, cache, first_logits, start_pos, tokens=None):
    """STEPS teacher-forced decode steps from `first_logits`; returns (logits [STEPS, V], tokens fed)."""
    embed = model.language_model.model.embed_tokens
    out, fed, logits = [], [], first_logits
    for n in range(STEPS):
        tok = int(mx.argmax(logits).item()) if tokens is None else tokens[n]
        fed.append(tok)
        pos = mx.full((3, 1, 1), start_pos + n, dtype=mx.int32)
        logits = model.language_model(embed(mx.array([[tok]])), pos, cache=cache)[0, -1]  # [V]
        out.append(logits)
    return mx.stack(out), fed


def _fixed(model, max_tokens, bits, max_chunk):
    group = kv_group_size(model.config.text.head_dim)  # make_cache's
    return [FixedKVCache(max_tokens, bits=bits, group_size=group, max_chunk=max_chunk) for _ in model.layers]


def _compare(model, prep, caches, tol):
    """The proportional compact run against the repeated reference, prefill then STEPS decode steps."""
    (comp_cache, pin), (ref_cache, ref_pin) = caches
    last = prefill(model, prep, comp_cache, step=512, pin=pin)[0]  # [V]
    embeds, positions, ds, mask = _repeated(prep)
    ref_last = model.language_model(embeds, positions, cache=ref_cache, deepstack=ds, mask=mask)[0, -1]
    if ref_pin:
        for c in ref_cache:
            c.pin(ref_pin)
    np.testing.assert_allclose(np.array(last), np.array(ref_last), rtol=tol, atol=tol)
    start = int(prep.positions.max().item()) + 1
    got, fed = _decode(model, comp_cache, last, start)
    want, _ = _decode(model, ref_cache, ref_last, start, tokens=fed)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=tol, atol=tol)
    return comp_cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["diversity", "merge", "pool"])
def test_proportional_equals_repeated_groups_growing_cache(loaded, images, arch, method):
    model, proc = loaded(arch)
    prep = prepare(model, proc, PROMPT, images, compaction=Compaction(method, keep=0.34, proportional=True))
    mass = _mass(prep)
    assert mass.max() > 1 and mass.sum() == len(prepare(model, proc, PROMPT, images).input_ids)
    cache = _compare(model, prep, ((model_cache(model), None), (model_cache(model), None)), 2e-4)
    assert cache[0].key_bias is not None and cache[0].key_bias.shape[1] == prep.embeds.shape[1] + STEPS


def model_cache(model):
    return [KVCache() for _ in model.layers]


@pytest.mark.parametrize("bits", [None, 8])
def test_proportional_equals_repeated_groups_across_a_wrap_around(loaded, images, bits):
    """Fixed-size caches that wrap during decode: the pinned images keep their bias, the ring rotates."""
    model, proc = loaded("qwen3_vl")
    prep = prepare(model, proc, PROMPT, images, compaction=Compaction("diversity", keep=0.34, proportional=True))
    L, extra = prep.embeds.shape[1], int(_mass(prep).sum()) - prep.embeds.shape[1]
    max_tokens, chunk = L + STEPS // 2, 4  # wraps half-way through the decode
    pin = pin_point(model, _fixed(model, max_tokens, bits, chunk), prep.input_ids, True, None)
    ref_pin = pin + extra  # every repeated row lies inside the pinned images
    caches = ((_fixed(model, max_tokens, bits, chunk), pin), (_fixed(model, max_tokens + extra, bits, chunk), ref_pin))
    cache = _compare(model, prep, caches, 2e-4 if bits is None else 2e-3)
    assert cache[0].offset > cache[0].max_tokens  # it did wrap


def test_all_masses_one_is_the_unbiased_run_bit_for_bit(loaded, images):
    model, proc = loaded("qwen2_vl")
    n = len(prepare(model, proc, PROMPT, images).input_ids)
    kw = dict(max_tokens=8, temperature=0.0)
    every = Compaction("diversity", tokens=10**6, proportional=True)  # keeps everything: every mass is 1
    prep = prepare(model, proc, PROMPT, images, compaction=every)
    assert prep.key_bias is None and len(prep.input_ids) == n
    a = generate(model, proc, PROMPT, images, compaction=every, **kw)
    b = generate(model, proc, PROMPT, images, **kw)
    assert a.tokens == b.tokens
    c0 = [KVCache() for _ in model.layers]
    c1 = [KVCache() for _ in model.layers]
    l0 = prefill(model, prep, c0)
    l1 = prefill(model, prepare(model, proc, PROMPT, images), c1)
    assert mx.array_equal(l0, l1)  # bit-identical: no bias is applied at all
    assert c0[0].key_bias is None


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_in_encoder_units_carry_their_mass(loaded, images, arch):
    model, proc = loaded(arch)
    c = Compaction("diversity", keep=0.34, where="encoder", encoder_layer=1, proportional=True)
    prep = prepare(model, proc, PROMPT, images, compaction=c)
    mass = _mass(prep)
    assert mass.max() > 1 and mass.sum() == len(prepare(model, proc, PROMPT, images).input_ids)


def test_fixed_cache_bias_rotates_and_pins_with_its_slots():
    """Token t written with bias t: after wrapping, each slot's bias is the position of the token it holds."""
    P, M, chunk = 5, 16, 3
    c = FixedKVCache(M, max_chunk=chunk)
    kv = lambda n: mx.zeros((1, 1, n, 4))  # noqa: E731
    c.update_bias(mx.arange(P, dtype=mx.float32)[None], P)
    c.update_and_fetch(kv(P), kv(P))
    c.pin(P)
    t = P
    for n in (3, 1, 2, 3, 3, 1, 2, 3, 2):
        held = c.update_bias(mx.arange(t, t + n, dtype=mx.float32)[None], n)  # before the keys, as a model does
        c.update_and_fetch(kv(n), kv(n))
        assert held.shape == c.key_bias.shape
        t += n
    assert t > M
    ring = M - P
    want = list(range(P)) + [max(u for u in range(P, t) if P + (u - P) % ring == s) for s in range(P, M)]
    assert np.array(c.key_bias[0]).tolist() == want
    plain = FixedKVCache(M, max_chunk=chunk)
    plain.update_and_fetch(kv(P), kv(P))
    assert c.nbytes == plain.nbytes + M * 4  # one float32 per slot, allocated with the buffers


def test_session_save_load_keeps_the_bias(loaded, images, tmp_path):
    model, proc = loaded("qwen2_vl")
    c = Compaction("diversity", keep=0.34, proportional=True)
    chat = ChatSession(model, proc, compaction=c, max_kv_size=256)
    first = chat.ask(PROMPT, images, max_tokens=4)
    assert first.stats["proportional"]
    bias = np.array(chat.cache[0].key_bias)
    chat.save(str(tmp_path / "s.safetensors"))
    other = ChatSession(model, proc, compaction=c, max_kv_size=256)
    other.load(str(tmp_path / "s.safetensors"))
    assert np.array_equal(np.array(other.cache[0].key_bias), bias)
    follow = dict(max_tokens=6)
    assert other.ask("and now?", **follow).tokens == chat.ask("and now?", **follow).tokens
    caches, _ = load_cache(str(tmp_path / "s.safetensors"))
    save_cache(str(tmp_path / "t.safetensors"), caches)  # a loaded cache saves again with its bias
    again, _ = load_cache(str(tmp_path / "t.safetensors"))
    assert np.array_equal(np.array(again[-1].key_bias), np.array(caches[-1].key_bias))


def test_kv_bytes_grow_by_one_float_per_slot_once_for_all_layers(loaded, images):
    model, proc = loaded("qwen2_vl")
    kw = dict(max_tokens=2, max_kv_size=256)
    plain = generate(
        model, proc, PROMPT, images, compaction=Compaction("diversity", keep=0.34, proportional=False), **kw
    ).stats
    prop = generate(
        model, proc, PROMPT, images, compaction=Compaction("diversity", keep=0.34, proportional=True), **kw
    ).stats
    assert prop["kv_bytes_allocated"] - plain["kv_bytes_allocated"] == 4 * 256  # once, not per layer
    assert prop["proportional"] and not plain["proportional"]


def test_default_is_on_where_it_wins_and_off_elsewhere():
    assert all(Compaction(m, keep=0.33).proportional for m in ("diversity", "merge", "pool"))
    assert not any(Compaction(m, keep=0.33).proportional for m in ("floor", "saliency", "random", "prompt"))
    assert not Compaction("diversity", keep=0.33, where="encoder").proportional
    assert not Compaction("diversity", keep=0.33, proportional=False).proportional
    assert Compaction("saliency", keep=0.33, proportional=True).proportional
