"""The minimal generation path: cached decoding equals full recomputation, stats are filled in."""

import mlx.core as mx
import numpy as np
import pytest
from tiny_checkpoints import ARCHS

from mlx_compact.generate import generate
from mlx_compact.loader import load
from mlx_compact.memory import kv_bytes

STATS_KEYS = {
    "prompt_tokens",
    "generation_tokens",
    "visual_tokens",
    "kv_bytes_allocated",
    "kv_bytes_used",
    "linear_state_bytes",
    "ttft_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
    "kv_evicted_tokens",
    "image_decode_bytes",
    "proportional",
    "finish_reason",
}


def _load(path):
    return load(str(path))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_tokens_equal_full_recomputation(arch, tiny_checkpoint, images):
    model, proc = _load(tiny_checkpoint(arch))
    result = generate(model, proc, "describe both", images, max_tokens=12)
    inputs = proc(text=proc.build_prompt("describe both", n_images=2), images=images)
    ids = [int(i) for i in inputs["input_ids"][0]]
    pv, grid = mx.array(inputs["pixel_values"]), inputs["grid_thw"].tolist()
    expected = []
    eos = set(proc.eos_token_ids)
    for _ in range(12):
        tok = int(mx.argmax(model(mx.array([ids + expected]), pv, grid)[0, -1]).item())
        if tok in eos:
            break
        expected.append(tok)
    assert result.tokens == expected
    assert result.text == proc.decode(expected)


def test_stats_are_complete_and_consistent(tiny_checkpoint, image_wide):
    model, proc = _load(tiny_checkpoint("qwen2_vl"))
    result = generate(model, proc, "hi", [image_wide], max_tokens=5)
    s = result.stats
    assert set(s) == STATS_KEYS
    grid = proc(text=proc.build_prompt("hi", n_images=1), images=[image_wide])["grid_thw"][0]
    assert s["visual_tokens"] == [{"before": int(np.prod(grid)) // 4, "after": int(np.prod(grid)) // 4}]
    assert s["generation_tokens"] == len(result.tokens)
    assert s["kv_bytes_allocated"] >= kv_bytes(model.config.text, s["prompt_tokens"], dtype_bytes=4)  # float32
    assert set(s["ttft_s"]) == {"preprocess", "vision", "prefill"}
    assert all(v > 0 for v in s["ttft_s"].values())
    assert s["peak_memory_bytes"] > 0
