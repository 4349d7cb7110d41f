"""Checkpoint compatibility with mlx-vlm, both ways.

- `mlx_vlm.convert` output (float and 4-bit) loads in mlx-compact with mlx-vlm's own logits.
- `mlx-compact convert` output (float and 4-bit) loads in mlx-vlm with our logits, including from a
  transformers-5 config.json that mlx-vlm cannot read itself.
- `mlx_vlm.convert --q-mode mxfp4 / mxfp8` output (microscaling floats, which MLX quantizes natively) loads in
  mlx-compact with the logits of its dequantized weights.

mlx-vlm 0.7.10 reads Qwen2/2.5-VL language settings only from a flat 4.4x config and Qwen3-VL's only from
`text_config.rope_theta` / `rope_scaling`; on configs saved by transformers 5 (`rope_parameters`) its
`from_dict` raises `TypeError: TextConfig.__init__() missing ... 'rope_theta'`. So its converter is fed the
hub dialects (flat44 for Qwen2/2.5-VL, qwen3_nested for Qwen3-VL), which every arch runs on here.
Measured: ours vs mlx-vlm, max relative logit difference <= 1e-6 (float32 and 4-bit) for all three archs.
"""

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
