"""Memory accounting: exact KV bytes, device budget, and a plan that refuses before allocating."""

import importlib
import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_compact.cache import FixedKVCache
from mlx_compact.compaction import Compaction
from mlx_compact.loader import load
from mlx_compact.memory import Plan, device_budget, kv_bytes, plan, weights_bytes
from mlx_compact.models import build_model

gen = importlib.import_module("mlx_compact.generate")  # the module (mlx_compact.generate is also a function's name)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    m = build_model(json.loads((tiny_checkpoint("qwen3_vl") / "config.json").read_text()))
    mx.eval(m.parameters())
    return m


def _name(c) -> str:
    return "none" if c is None else f"{c.method}:{c.tokens or c.keep}:{c.where}"


@pytest.mark.parametrize("c", [Compaction(keep=0.33), Compaction(tokens=3), Compaction("pool")], ids=_name)
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])  # a video is one block / one block per temporal slice
def test_the_plan_counts_the_visual_tokens_of_a_video_the_run_keeps(
    arch, c, tiny_checkpoint, image_wide, video_frames, monkeypatch
):
    model, proc = load(str(tiny_checkpoint(arch)))
    plans = []
    planned = gen.plan
    monkeypatch.setattr(gen, "plan", lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1])
    r = gen.generate(model, proc, "describe", [image_wide], videos=[video_frames], max_tokens=1, compaction=c)
    kept = [v["after"] for v in r.stats["visual_tokens"]]  # the image, then the video (Qwen3-VL: each slice)
    assert len(kept) == (3 if arch == "qwen3_vl" else 2)  # 4 frames: 2 temporal slices
    assert plans and all(sum(p.visual_tokens) == sum(kept) for p in plans), (kept, [p.visual_tokens for p in plans])


@pytest.fixture(scope="module")
def qwen2_vl(tiny_checkpoint):
    return load(str(tiny_checkpoint("qwen2_vl")))  # a full-attention vision tower: in-encoder compaction too


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


@pytest.mark.parametrize("source", ["os", "metal"])
def test_the_plan_does_not_count_the_loaded_weights_twice(model, source, monkeypatch):
    from mlx_compact import memory

    # what the OS reports once the weights are loaded: they are no longer available, yet the plan counts them
    monkeypatch.setattr(memory, "device_budget", lambda: {"total": 1 << 40, "available": 1 << 20, "source": source})
    p = plan(model, [(1, 4, 4)], 20)
    if source == "os":  # the CPU backend: MLX's memory in this process (the weights among it) is given back
        assert p.budget >= (1 << 20) + weights_bytes(model)
        assert p.budget == memory.run_budget()
    else:  # Metal's budget is the working set, not what is free
        assert p.budget == 1 << 20


def test_plan_grows_with_image_size_and_refuses_a_small_budget(model):
    small = plan(model, [(1, 4, 4)], 20)  # merged grids: 16 and 1024 visual tokens
    big = plan(model, [(1, 32, 32)], 20)
    assert big.vision > small.vision and big.kv > small.kv
    assert plan(model, [4096], 20).vision == big.vision  # a patch count plans the same image, shape unknown
    compact = plan(model, [(1, 32, 32)], 20, keep=0.25)
    assert compact.kv < big.kv and compact.visual_tokens == [256]
    tight = plan(model, [(1, 32, 32)], 20, budget=big.weights + 1)
    assert isinstance(tight, Plan) and not tight.fits and "NO" in tight.summary()


COMPACTIONS = [
    None,
    Compaction(keep=0.33),
    Compaction(tokens=5),  # an absolute budget (the plan once counted it as no compaction)
    Compaction(tokens=10_000),  # larger than an image: all kept
    Compaction("pool"),  # ceil(h/2) * ceil(w/2), whatever keep says
    Compaction("merge", keep=0.4),
    Compaction("floor", keep=0.3, where="encoder"),
    Compaction("diversity", tokens=7, where="encoder"),
]


@pytest.mark.parametrize("c", COMPACTIONS, ids=_name)
def test_the_plan_counts_the_visual_tokens_the_run_keeps(c, qwen2_vl, images, monkeypatch):
    """check_memory's plan (what generate refuses or fits by) counts exactly the visual tokens generate keeps."""
    model, proc = qwen2_vl
    plans = []
    planned = gen.plan
    monkeypatch.setattr(gen, "plan", lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1])
    r = gen.generate(model, proc, "describe", images, max_tokens=1, compaction=c)
    kept = [v["after"] for v in r.stats["visual_tokens"]]
    assert plans and all(p.visual_tokens == kept for p in plans), (kept, [p.visual_tokens for p in plans])
    grids = gen.image_grids(proc, images)
    assert kept == [(c or Compaction.none()).kept(g) for g in grids]
    assert gen.plan_run(model, proc, "describe", images, compaction=c).visual_tokens == kept
