"""``LanguageModel(..., last_only=True)``, what each prefill chunk runs: the last layer computes its query,
attention output and MLP for the last row only (the logits need no more) and still writes every row's keys and
values. Its logits and caches equal the full computation's, chunk after chunk, with DeepStack, key bias, an
explicit mask and the fixed-size (float and 8-bit) caches."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny_checkpoints import ARCHS

from mlx_compact.generate import make_cache, prepare
from mlx_compact.loader import load

ATOL = 1e-5


@pytest.fixture(scope="module")
def prepared(tiny_checkpoint, image_wide):
    out = {}

    def get(arch):
        if arch not in out:
            model, proc = load(str(tiny_checkpoint(arch)))
            out[arch] = model, prepare(model, proc, "what is in the picture", [image_wide])
        return out[arch]

    return get


def _chunks(model, prep, cache, cuts, last_only, key_bias=None):
    """Logits of the last row of each chunk [n_chunks, V]."""
    outs = []
    for i, j in zip(cuts[:-1], cuts[1:]):
        ds = [d[:, i:j] for d in prep.deepstack] if prep.deepstack else None
        kb = None if key_bias is None else key_bias[:, i:j]
        lg = model.language_model(
            prep.embeds[:, i:j], prep.positions[:, :, i:j], cache=cache, deepstack=ds, last_only=last_only, key_bias=kb
        )
        assert lg.shape[1] == (1 if last_only else j - i)
        outs.append(lg[:, -1])
    return np.array(mx.concatenate(outs))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["growing", "fixed", "fixed8", "biased"])
def test_last_only_equals_full(arch, kind, prepared):
    model, prep = prepared(arch)
    if kind == "fixed8" and model.config.text.head_dim % 32:
        pytest.skip("a quantized cache needs a head size that is a multiple of 32")
    L = prep.embeds.shape[1]
    cuts = [0, L // 3, L // 3 + 1, L]  # a one-row chunk among longer ones
    caches = {
        "growing": lambda: make_cache(model),
        "biased": lambda: make_cache(model),
        "fixed": lambda: make_cache(model, max_kv_size=L + 64),
        "fixed8": lambda: make_cache(model, max_kv_size=L + 64, kv_bits=8),
    }[kind]
    bias = None
    if kind == "biased":
        bias = mx.log(mx.array(np.random.default_rng(0).integers(1, 4, (1, L)).astype(np.float32)))
    a, b = caches(), caches()
    got = _chunks(model, prep, a, cuts, True, bias)
    want = _chunks(model, prep, b, cuts, False, bias)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    for ca, cb in zip(a, b):
        for x, y in zip(tree_flatten(ca.state), tree_flatten(cb.state)):
            np.testing.assert_array_equal(np.array(x[1]), np.array(y[1]))


@pytest.mark.parametrize("arch", ARCHS)
def test_last_only_with_a_mask(arch, prepared):
    """An explicit bool mask [L, S] (a window here): the last row's own mask row is the one applied."""
    model, prep = prepared(arch)
    L = prep.embeds.shape[1]
    q, k = mx.arange(L)[:, None], mx.arange(L)[None]
    mask = (k <= q) & ((k < 4) | (k > q - L // 2))
    kw = dict(deepstack=prep.deepstack or None, mask=mask)
    got = model.language_model(prep.embeds, prep.positions, last_only=True, **kw)
    want = model.language_model(prep.embeds, prep.positions, **kw)[:, -1:]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=ATOL, rtol=0)
