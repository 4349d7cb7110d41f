"""Memory accounting: exact KV bytes, device budget, and a plan that refuses before allocating."""

import json

import pytest

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_compact.cache import FixedKVCache
from mlx_compact.memory import Plan, device_budget, kv_bytes, plan, weights_bytes
from mlx_compact.models import build_model


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = build_model(json.loads((tiny_checkpoint("qwen3_vl") / "config.json").read_text()))
    mx.eval(m.parameters())
    return m


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_kv_bytes_equals_allocated_fixed_cache(model, bits):
    t = model.config.text
    caches = [FixedKVCache(256, bits=bits, group_size=32) for _ in range(t.num_hidden_layers)]
    k = mx.zeros((1, t.num_key_value_heads, 4, t.head_dim), mx.float16)
    for c in caches:
        c.update_and_fetch(k, k)
    assert sum(c.nbytes for c in caches) == kv_bytes(t, 256, dtype_bytes=2, bits=bits, group_size=32)


def test_weights_bytes_counts_every_parameter(model):
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    assert weights_bytes(model) == 4 * n  # float32


def test_device_budget_reports_positive_available_memory():
    b = device_budget()
    assert 0 < b["available"] <= b["total"]


def test_plan_grows_with_image_size_and_refuses_a_small_budget(model):
    small = plan(model, [64], 20)
    big = plan(model, [4096], 20)
    assert big.vision > small.vision and big.kv > small.kv
    compact = plan(model, [4096], 20, keep=0.25)
    assert compact.kv < big.kv and compact.visual_tokens == [256]
    tight = plan(model, [4096], 20, budget=big.weights + 1)
    assert isinstance(tight, Plan) and not tight.fits and "NO" in tight.summary()
