"""The memory plan of the Qwen3.5 hybrids: keys and values in the attention layers only, plus the fixed state of
the Gated DeltaNet layers, counted as the caches allocate them and reported apart in the run's stats."""

from types import SimpleNamespace

import pytest
from conftest import _noise_image
from tiny_hybrid import DENSE, HYBRIDS, MOE, make_checkpoint

from mlx_compact import generate, load
from mlx_compact.generate import plan_run
from mlx_compact.memory import (
    attention_layers,
    fmt_bytes,
    gdn_peak,
    kv_bytes,
    linear_layers,
    linear_state_bytes,
    prefill_peak,
)

PROMPT = "describe the picture"
SETTINGS = [{}, {"max_kv_size": 160}, {"max_kv_size": 160, "kv_bits": 8}]


def release(linear: int, attention: int, kv_heads: int, hv: int, hidden: int = 2048, head_dim: int = 256):
    """The text-config fields the plan reads, of a release: 3 linear layers to 1 attention layer."""
    types = (["linear_attention"] * 3 + ["full_attention"]) * attention
    assert types.count("linear_attention") == linear
    return SimpleNamespace(
        num_hidden_layers=len(types),
        layer_types=tuple(types),
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        linear_num_key_heads=16,
        linear_num_value_heads=hv,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
    )


@pytest.mark.parametrize(
    "cfg, kv_per_token, state",
    [
        # Qwen3.5-27B: 16 attention layers x 2 x 4 heads x 256 x 2 bytes; 48 x (3 x 10240 x 2 + 48 x 128 x 128 x 4)
        (release(48, 16, 4, 48, 5120), 64 * 1024, 48 * (61_440 + 3_145_728)),
        # Qwen3.5-35B-A3B: 10 x 2 x 2 x 256 x 2; 30 x (3 x 8192 x 2 + 32 x 128 x 128 x 4)
        (release(30, 10, 2, 32), 20 * 1024, 30 * (49_152 + 2_097_152)),
    ],
    ids=["27B", "35B-A3B"],
)
def test_release_sizes(cfg, kv_per_token, state):
    """bfloat16 KV per token and the fixed state, as the design table has them (hand-computed here)."""
    assert attention_layers(cfg) + linear_layers(cfg) == cfg.num_hidden_layers
    assert kv_bytes(cfg, 1, dtype_bytes=2) == kv_per_token
    assert kv_bytes(cfg, 1000, dtype_bytes=2) == 1000 * kv_per_token
    assert linear_state_bytes(cfg, dtype_bytes=2) == state
    full = SimpleNamespace(**{**vars(cfg), "layer_types": ()})  # no layer_types: every layer attention, no state
    assert kv_bytes(full, 1, 2) == kv_per_token * 4 and linear_state_bytes(full) == 0


def test_the_cpu_delta_rule_holds_a_few_states_as_planned():
    """On the CPU (mlx-lm's sequential ops path) MLX holds a float32 state per queued row; the layer queues
    DELTA_STEP rows at a time, so a 512-row chunk holds a few states, not 512, and the plan counts them.
    One Gated DeltaNet layer at Qwen3.6-35B-A3B's widths (16 key / 32 value heads of 128, hidden 2048)."""
    import mlx.core as mx

    from mlx_compact.models.language import GatedDeltaNet

    cfg = SimpleNamespace(
        hidden_size=2048,
        rms_norm_eps=1e-6,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
    )
    layer = GatedDeltaNet(cfg)
    x = mx.random.normal((1, 512, 2048)) * 0.1
    mx.eval(layer.parameters(), x)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(layer(x))
    peak, state = mx.get_peak_memory() - base, 32 * 128 * 128 * 4
    assert peak < 100 * state  # queued all at once, the 512 rows held ~530 states (1.1 GiB); now 133 MiB
    assert 0.9 < peak / gdn_peak(cfg, 512, 4, kernel=False) < 1.3
    assert gdn_peak(cfg, 512, 4, kernel=True) < gdn_peak(cfg, 512, 4, kernel=False)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    done = {}

    def get(arch):
        if arch not in done:
            done[arch] = load(str(make_checkpoint(arch, tmp_path_factory.mktemp(arch))))
        return done[arch]

    return get


@pytest.mark.parametrize("settings", SETTINGS, ids=["growing", "fixed", "fixed-8bit"])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_the_plan_counts_what_the_caches_allocate(loaded, arch, settings):
    model, proc = loaded(arch)
    image = _noise_image(60, 90, seed=1)
    r = generate(model, proc, PROMPT, [image], max_tokens=4, **settings)
    s, t = r.stats, model.config.text
    state = linear_state_bytes(t, dtype_bytes=4)  # float32 on the CPU: conv in the model's dtype
    assert 0 < s["linear_state_bytes"] == state
    if "max_kv_size" in settings:  # a fixed cache allocates its slots at once: the plan is exact
        p = plan_run(model, proc, PROMPT, [image], max_tokens=4, max_kv_tokens=160, kv_bits=settings.get("kv_bits"))
        assert s["kv_bytes_allocated"] == p.kv and p.state == state
        assert f"linear state: {fmt_bytes(p.state):>12}" in p.summary()
    else:  # a growing one rounds up to 256-token steps; only the attention layers hold any
        held = s["prompt_tokens"] + s["generation_tokens"] - 1
        assert s["kv_bytes_allocated"] == kv_bytes(t, -(-held // 256) * 256, 4) + state
        assert kv_bytes(t, 256, 4) == 2 * attention_layers(t) * t.num_key_value_heads * t.head_dim * 256 * 4
    assert any("linear layers" in n for n in plan_run(model, proc, PROMPT, [image]).notes)


def test_the_moe_prefill_counts_the_shared_expert(loaded):
    t = loaded(MOE)[0].config.text
    assert t.shared_expert_intermediate_size > 0 and loaded(DENSE)[0].config.text.shared_expert_intermediate_size == 0

    def peak(shared: int) -> int:  # a shared expert wide enough to be the largest term
        cfg = SimpleNamespace(**{**vars(t), "shared_expert_intermediate_size": shared})
        cfg.sparse_layers = t.sparse_layers
        return prefill_peak(cfg, 64, 64, moe_grouped=False)

    assert peak(20_000) - peak(10_000) == 4 * 64 * 10_000 * 4  # gate, up, SiLU, product [T, I_s] in float32


# ---------------------------------------------------------------- the README's figures


def _text(layers: int, hidden: int, heads: int, kv_heads: int, hv: int, **extra) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "full_attention_interval": 4,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 256,
        "attn_output_gate": True,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": hv,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "vocab_size": 248320,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
        **extra,
    }


def _vision(depth: int, width: int, inter: int, out: int) -> dict:
    return {
        "depth": depth,
        "hidden_size": width,
        "num_heads": 16,
        "intermediate_size": inter,
        "out_hidden_size": out,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [],
        "hidden_act": "gelu_pytorch_tanh",
    }


QWEN3_6_35B_A3B = {  # the release's sizes (see the design notes)
    "model_type": "qwen3_5_moe",
    "tie_word_embeddings": False,
    "text_config": _text(
        40,
        2048,
        16,
        2,
        32,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    ),
    "vision_config": _vision(27, 1152, 4304, 2048),
}
QWEN3_5_2B = {  # as the README states them (the 2B release's config.json was not checked here)
    "model_type": "qwen3_5",
    "tie_word_embeddings": True,
    "text_config": _text(24, 2048, 8, 2, 16, intermediate_size=6144),
    "vision_config": _vision(24, 1024, 4096, 2048),
}


@pytest.mark.parametrize(
    "cfg, name, gb, params",
    [(QWEN3_6_35B_A3B, "Qwen3.6-35B-A3B-4bit", 32, 35.1), (QWEN3_5_2B, "Qwen3.5-2B-4bit", 8, 2.2)],
    ids=["35B-A3B", "2B"],
)
def test_readme_states_the_hybrid_plans(cfg, name, gb, params):
    """Built lazily (nothing allocated), bfloat16, quantized as mlx-vlm's converter does (4-bit groups of 64, the
    routers and shared-expert gates 8-bit, the vision tower float), planned for a Mac (fused attention)."""
    import re
    from pathlib import Path

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_compact.memory import plan, weights_bytes
    from mlx_compact.models import build_model

    model = build_model(cfg)
    model.set_dtype(mx.bfloat16)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))

    def predicate(path, m):
        if path.startswith("vision_tower") or not hasattr(m, "to_quantized"):
            return False
        return {"group_size": 64, "bits": 8} if path.endswith(("mlp.gate", "shared_expert_gate")) else True

    nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
    t, budget = model.config.text, int(gb * 2**30 * 2 / 3)
    image = [60 * 34 * 4]  # 1920x1080 -> 60 x 34 merged tokens
    one = plan(model, image, 20, max_tokens=512, fused=True, budget=budget)
    fixed = plan(model, image, 20, max_tokens=512, max_kv_tokens=32768, kv_bits=8, fused=True, budget=budget)
    assert one.fits and fixed.fits and f"{n / 1e9:.1f}" == f"{params}"
    figures = [
        f"| {name} ({params}B",
        f"{fmt_bytes(weights_bytes(model))} | {kv_bytes(t, 1, 2) // 1024} KiB | {fmt_bytes(linear_state_bytes(t, 2))} |"
        f" {fmt_bytes(one.peak)} | {fmt_bytes(fixed.peak)} | {gb} GB Mac: {fmt_bytes(budget)} |",
    ]
    text = re.sub(r"\s+", " ", (Path(__file__).resolve().parent.parent / "README.md").read_text())
    for figure in figures:
        assert figure in text, f"README's {name} row: expected '{figure}'"
