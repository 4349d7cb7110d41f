"""Checkpoint compatibility with mlx-vlm, both ways.

- `mlx_vlm.convert` output (float and 4-bit) loads in mlx-compact with mlx-vlm's own logits.
- `mlx-compact convert` output (float and 4-bit) loads in mlx-vlm with our logits, including from a
  transformers-5 config.json that mlx-vlm cannot read itself.
- Qwen3.5 / Qwen3.5-MoE (the hybrids), float and 4-bit: our conversion of every source (release, transformers 5,
  a tied transformers-5 save that mlx-vlm cannot read itself) loads in mlx-vlm, and mlx-vlm's conversion of the
  release loads in ours: logits within 1e-5 and greedy tokens (each library's own generation loop, hybrid
  cache and chunked prefill) equal.
- `mlx_vlm.convert --q-mode mxfp4 / mxfp8` output (microscaling floats, which MLX quantizes natively) loads in
  mlx-compact with the logits of its dequantized weights.

mlx-vlm 0.7.10 reads Qwen2/2.5-VL language settings only from a flat 4.4x config and Qwen3-VL's only from
`text_config.rope_theta` / `rope_scaling`; on configs saved by transformers 5 (`rope_parameters`) its
`from_dict` raises `TypeError: TextConfig.__init__() missing ... 'rope_theta'`. So its converter is fed the
hub dialects (flat44 for Qwen2/2.5-VL, qwen3_nested for Qwen3-VL), which every arch runs on here.
Measured: ours vs mlx-vlm, max relative logit difference <= 1e-6 (float32 and 4-bit) for all three archs.
"""

import itertools
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_compact.convert import convert
from test_loader import ARCHS, our_logits, reference_inputs, rel_err

from mlx_compact.loader import load_model

mlx_vlm_utils = pytest.importorskip("mlx_vlm.utils")

HUB_DIALECT = {"qwen2_vl": "flat44", "qwen2_5_vl": "flat44", "qwen3_vl": "qwen3_nested"}
TOL = 1e-5  # same weights, same float32 math: only summation order differs


def mlx_vlm_logits(path, inputs) -> np.ndarray:
    """Logits [L, V] of mlx-vlm's own model for a directory (its Qwen-VL calling convention)."""
    model, _ = mlx_vlm_utils.load(str(path))
    out = model(
        mx.array(inputs["input_ids"]),
        mx.array(inputs["pixel_values"]),
        mask=None,
        image_grid_thw=mx.array(inputs["image_grid_thw"]),
    )
    return np.array(out.logits[0].astype(mx.float32))


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_vlm_converted_loads_in_mlx_compact(ckpt, tmp_path, arch, quantize):
    from mlx_vlm.convert import convert as mlx_vlm_convert

    src = ckpt(arch, dialect=HUB_DIALECT[arch])
    out = tmp_path / "mlx-vlm"
    mlx_vlm_convert(str(src), str(out), quantize=quantize, q_bits=4, q_group_size=64, dtype="float32")
    if quantize:
        assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    inputs = reference_inputs(str(ckpt(arch)))
    assert rel_err(our_logits(load_model(out), inputs), mlx_vlm_logits(out, inputs)) < TOL


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_our_converted_loads_in_mlx_vlm(ckpt, tmp_path, arch, quantize):
    # Source in the transformers-5 dialect (`rope_parameters`), which mlx-vlm's converter cannot read.
    out = convert(ckpt(arch, dialect="v5"), tmp_path / "ours", quantize=quantize, dtype="float32", progress=False)
    inputs = reference_inputs(str(ckpt(arch)))
    assert rel_err(mlx_vlm_logits(out, inputs), our_logits(load_model(out), inputs)) < TOL


def dequantized(model, mode: str, bits: int, group_size: int = 32):
    """``model`` with every quantized layer replaced by the float layer of its weights dequantized as ``mode``
    (the test's, not what the layer says)."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=group_size, bits=bits, mode=mode)
            linear = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            linear.update({"weight": w, **({"bias": m.bias} if "bias" in m else {})})
            layers.append((name, linear))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=group_size, bits=bits, mode=mode)
            embedding = nn.Embedding(*w.shape)
            embedding.weight = w
            layers.append((name, embedding))
    model.update_modules(tree_unflatten(layers))
    return model


@pytest.mark.parametrize("mode, bits", [("mxfp4", 4), ("mxfp8", 8)])
def test_mlx_vlm_microscaling_checkpoints_load(ckpt, tmp_path, mode, bits):
    """mlx-vlm's MXFP4 / MXFP8 conversions (mlx-community's other quantized kind) load in mlx-compact, and our
    logits equal those of the float model made of their dequantized weights (an independent reference: the
    checkpoint's tensors through mx.dequantize). mlx-vlm's own logits on the same directory measured 1.5e-3 to
    1.6e-3 from that reference (ours 5e-7), so they are checked only loosely here."""
    from mlx_vlm.convert import convert as mlx_vlm_convert

    out = tmp_path / mode
    mlx_vlm_convert(
        str(ckpt("qwen3_vl", dialect=HUB_DIALECT["qwen3_vl"])),
        str(out),
        quantize=True,
        q_bits=bits,
        q_group_size=32,
        q_mode=mode,
        dtype="float32",
    )
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    inputs = reference_inputs(str(ckpt("qwen3_vl")))
    model = load_model(out)
    assert any(getattr(m, "mode", None) == mode for _, m in model.named_modules())
    ours = our_logits(model, inputs)
    assert rel_err(ours, our_logits(dequantized(load_model(out), mode, bits), inputs)) < TOL
    assert rel_err(ours, mlx_vlm_logits(out, inputs)) < 1e-2


# ---------------------------------------------------------------- Qwen3.5 / Qwen3.5-MoE (the hybrids)

GREEDY = 8


def our_greedy(model, inputs, n: int = GREEDY) -> list:
    """Greedy tokens from our runtime (prepare, chunked prefill, the hybrid cache, decode)."""
    from mlx_compact.generate import generate_step, make_cache, prepare_ids

    prep = prepare_ids(
        model, inputs["input_ids"][0].tolist(), inputs["pixel_values"], inputs["image_grid_thw"].tolist()
    )
    steps = generate_step(model, prep, make_cache(model), lambda x: mx.argmax(x, axis=-1), 512)
    return [int(t) for t, _ in itertools.islice(steps, n)]


def mlx_vlm_greedy(path, inputs, n: int = GREEDY) -> list:
    """Greedy tokens from mlx-vlm's own generation loop on a directory."""
    from mlx_vlm.generate.ar import generate_step

    model, _ = mlx_vlm_utils.load(str(path))
    gen = generate_step(
        mx.array(inputs["input_ids"]),
        model,
        mx.array(inputs["pixel_values"]),
        None,
        max_tokens=n,
        temperature=0.0,
        image_grid_thw=mx.array(inputs["image_grid_thw"]),
    )
    return [int(t) for t, _ in itertools.islice(gen, n)]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from tiny_hybrid import make_checkpoint

    done = {}

    def get(arch, layout="default", dialect="default", tie=False):
        key = (arch, layout, dialect, tie)
        if key not in done:
            path = tmp_path_factory.mktemp(f"{arch}-{layout}-{dialect}-{tie}")
            done[key] = make_checkpoint(arch, path, layout=layout, dialect=dialect, tie_word_embeddings=tie)
        return done[key]

    return get


def hybrid_inputs(path) -> dict:
    """Numpy inputs for one chat prompt with one 90x60 image, made by our processor (transformers 5.24 has no
    processor class for the tiny hybrids' files)."""
    from conftest import _noise_image

    from mlx_compact.processor import Processor

    proc = Processor.from_pretrained(path)
    out = proc(text=proc.build_prompt("What is this?", n_images=1), images=[_noise_image(60, 90, seed=1)])
    return {
        "input_ids": np.asarray(out["input_ids"]),
        "pixel_values": np.asarray(out["pixel_values"]),
        "image_grid_thw": np.asarray(out["grid_thw"]),
    }


HYBRID_SOURCES = [("release", "release", False), ("default", "default", False), ("default", "default", True)]


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("source", HYBRID_SOURCES, ids=["release", "v5", "v5-tied"])
@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_hybrid_our_converted_loads_in_mlx_vlm(hybrid, tmp_path, arch, source, quantize):
    """Every source layout, the tied transformers-5 save included (which mlx-vlm cannot read itself)."""
    out = convert(
        hybrid(arch, *source), tmp_path / "ours", quantize=quantize, q_group_size=32, dtype="float32", progress=False
    )  # groups of 32: most of the tiny widths (96, 160, 64) divide
    inputs = hybrid_inputs(out)
    ours = load_model(out)
    assert rel_err(mlx_vlm_logits(out, inputs), our_logits(ours, inputs)) < TOL
    assert mlx_vlm_greedy(out, inputs) == our_greedy(ours, inputs)


@pytest.mark.parametrize("quantize", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_moe"])
def test_hybrid_mlx_vlm_converted_loads_in_mlx_compact(hybrid, tmp_path, arch, quantize):
    """From the release layout and dialect (mlx-vlm reads that one; not a tied transformers-5 save)."""
    from mlx_vlm.convert import convert as mlx_vlm_convert

    out = tmp_path / "mlx-vlm"
    mlx_vlm_convert(
        str(hybrid(arch, "release", "release")), str(out), quantize=quantize, q_bits=4, q_group_size=32, dtype="float32"
    )
    inputs = hybrid_inputs(out)
    ours = load_model(out)
    if quantize:
        assert ours.config.quantization["bits"] == 4
    assert rel_err(our_logits(ours, inputs), mlx_vlm_logits(out, inputs)) < TOL
    assert our_greedy(ours, inputs) == mlx_vlm_greedy(out, inputs)
