"""The forward pass in float16 and bfloat16 (what a Mac runs: the checkpoint's own dtype on Metal) against float32.

Each tiny architecture is loaded from one checkpoint in float32, float16 and bfloat16. The vision tower (merged
features and DeepStack), the LLM logits of the full forward with two images, and the runtime path (compaction
with proportional attention, a fixed-size cache, 8-bit where the head size allows, chunked prefill and cached
decode) run in the half dtype (checked: their outputs are in it) and are compared with float32.

Error: the largest absolute difference over the largest float32 magnitude. Tolerance: 10 roundings of the dtype
(eps 2**-10 for float16, 2**-7 for bfloat16: 0.0098 and 0.078). Measured here (MLX 0.32 CPU) at most: vision
0.0016 / 0.013, logits 0.0022 / 0.018, runtime 0.0027 / 0.013 (float16 / bfloat16), a margin of about 4x;
a layer computed in the wrong dtype or with a float16 overflow is off by far more.
"""

import mlx.core as mx
import numpy as np
import pytest
from tiny_checkpoints import ARCHS, MOE

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact.compaction import Compaction
from mlx_compact.generate import make_cache, prefill, prepare
from mlx_compact.loader import load

HALF = {"float16": mx.float16, "bfloat16": mx.bfloat16}
TOLERANCE = {name: 10 * float(mx.finfo(dt).eps) for name, dt in HALF.items()}
PROMPT = "describe the pictures"
CPU_GATHER_MM = pytest.mark.xfail(
    not mx.metal.is_available(),
    raises=RuntimeError,
    strict=True,
    reason="MLX's CPU gather_mm (the MoE experts) takes float32 only; Metal runs them in half precision",
)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache = {}

    def get(arch, dtype):
        if (arch, dtype) not in cache:
            cache[arch, dtype] = load(str(tiny_checkpoint(arch)), dtype=dtype)
        return cache[arch, dtype]

    return get


def relative_error(x, ref) -> float:
    x, ref = np.array(x.astype(mx.float32)), np.array(ref.astype(mx.float32))
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def _inputs(proc, images):
    out = proc(text=proc.build_prompt(PROMPT, n_images=len(images)), images=images)
    return mx.array(out["input_ids"]), mx.array(out["pixel_values"]), out["grid_thw"].tolist()


def _report(capsys, what, errors):
    with capsys.disabled():
        print(f"\n{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ARCHS + (MOE,))
def test_vision_tower_in_half_precision_matches_float32(arch, dtype, loaded, images, capsys):
    ref_model, proc = loaded(arch, "float32")
    model, _ = loaded(arch, dtype)
    _, pixels, grid = _inputs(proc, images)
    ref, out = ref_model.encode(pixels, grid), model.encode(pixels, grid)
    assert out.features.dtype == HALF[dtype] and all(d.dtype == HALF[dtype] for d in out.deepstack)
    errors = {"features": relative_error(out.features, ref.features)}
    errors.update(
        {f"deepstack {i}": relative_error(d, r) for i, (d, r) in enumerate(zip(out.deepstack, ref.deepstack))}
    )
    _report(capsys, f"{arch} {dtype} vision vs float32", errors)
    assert len(out.deepstack) == len(ref.deepstack)
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ARCHS + (pytest.param(MOE, marks=CPU_GATHER_MM),))
def test_llm_logits_in_half_precision_match_float32(arch, dtype, loaded, images, capsys):
    ref_model, proc = loaded(arch, "float32")
    model, _ = loaded(arch, dtype)
    ids, pixels, grid = _inputs(proc, images)
    ref, out = ref_model(ids, pixels, grid), model(ids, pixels, grid)  # [1, L, V], the full forward with images
    mx.eval(out)
    assert out.dtype == HALF[dtype] and out.shape == ref.shape
    err = relative_error(out, ref)
    _report(capsys, f"{arch} {dtype} logits vs float32", {"logits": err})
    assert err <= TOLERANCE[dtype]


def _runtime_logits(model, proc, images, tokens):
    """Compaction (floor, proportional: a key bias in every layer), a fixed-size cache (8-bit when the head size
    allows), prefill in chunks of 16, then cached decode of `tokens`: the logits [1 + len(tokens), V] in float32."""
    prep = prepare(model, proc, PROMPT, images, compaction=Compaction("floor", keep=0.5, proportional=True))
    bits = 8 if model.config.text.head_dim % 32 == 0 else None
    cache = make_cache(model, max_kv_size=512, kv_bits=bits)
    out = [prefill(model, prep, cache, step=16)]
    embed = model.language_model.model.embed_tokens
    pos = int(prep.positions.max().item()) + 1
    for t in tokens:
        step = model.language_model(embed(mx.array([[t]])), mx.full((3, 1, 1), pos, dtype=mx.int32), cache=cache)
        out.append(step[:, -1])
        pos += 1
    assert all(o.dtype == model.language_model.model.norm.weight.dtype for o in out)
    return mx.concatenate(out)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ARCHS)
def test_runtime_in_half_precision_matches_float32(arch, dtype, loaded, images, capsys):
    ref_model, proc = loaded(arch, "float32")
    model, _ = loaded(arch, dtype)
    tokens = [int(t) for t in np.random.default_rng(1).integers(10, 300, 8)]
    ref, out = _runtime_logits(ref_model, proc, images, tokens), _runtime_logits(model, proc, images, tokens)
    err = relative_error(out, ref)
    _report(capsys, f"{arch} {dtype} runtime (compact, fixed cache, decode) vs float32", {"logits": err})
    assert err <= TOLERANCE[dtype]
