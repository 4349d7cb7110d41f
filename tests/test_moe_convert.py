"""Qwen3-VL-MoE checkpoints through the converter and to and from mlx-vlm.

- A Hugging Face checkpoint (transformers-5 save or Qwen release layout) -> `convert` -> load gives
  transformers' logits; the output is mlx-vlm's layout (`mlp.switch_mlp.*`), routers float unless asked.
- Quantized (4 / 6 / 8 bit) conversions load exactly: the same logits as the float model quantized in memory.
- `mlx_vlm.convert` output (float, 4 / 6 / 8 bit, routers quantized as mlx-vlm does) loads here with mlx-vlm's
  own logits on that directory; our output loads in mlx-vlm with ours.

mlx-vlm 0.7.10 cannot read a transformers-5 config.json (`TextConfig` wants `num_experts` and `rope_theta`) and
its sanitizer assumes the release expert orientation, so its converter is fed the release layout and dialect;
our converter is fed the transformers-5 save, which mlx-vlm then loads from our output. Its vision tower swaps
the two GELUs (tanh in the merger, exact erf in the ViT MLP; transformers has it the other way round), so with
images it is compared after those two are put right on the loaded instance; as it ships, its image logits
differ from transformers' by 5.8e-4 relative (ours: 7.5e-7). Measured: ours vs mlx-vlm 0 on text (float and
quantized), 7e-7 with images once its GELUs are put right.
"""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_compact.convert import convert
from mlx_compact.convert.convert import save_config, save_weights
from test_loader import our_logits, reference_inputs, reference_logits, rel_err
from tiny_checkpoints import MOE

from mlx_compact.loader import load_model

mlx_vlm_utils = pytest.importorskip("mlx_vlm.utils")

TOL = 1e-4  # ours vs transformers, float32
SAME = 1e-5  # the same weights in two MLX implementations: summation order only
TEXT = list(range(10, 60))  # a text-only prompt


def text_logits(model) -> np.ndarray:
    return np.array(model(mx.array([TEXT]))[0])


def mlx_vlm_model(path, gelus_put_right: bool = False):
    model, _ = mlx_vlm_utils.load(str(path))
    if gelus_put_right:  # transformers: tanh GELU in the ViT MLP, exact erf GELU in the mergers
        tower = model.vision_tower
        for block in tower.blocks:
            block.mlp.act_fn = nn.GELU(approx="tanh")
        for merger in [tower.merger, *tower.deepstack_merger_list]:
            merger.act_fn = nn.GELU()
    return model


def mlx_vlm_logits(model, inputs=None) -> np.ndarray:
    if inputs is None:
        return np.array(model(mx.array([TEXT]), None, mask=None).logits[0])
    out = model(
        mx.array(inputs["input_ids"]),
        mx.array(inputs["pixel_values"]),
        mask=None,
        image_grid_thw=mx.array(inputs["image_grid_thw"]),
    )
    return np.array(out.logits[0].astype(mx.float32))


def in_memory_quantized(path, bits: int, router_bits=None):
    """The float model quantized in memory as the converter does (vision and, unless ``router_bits``, routers
    float)."""
    model = load_model(path)

    def predicate(p, m):
        if not hasattr(m, "to_quantized") or p.startswith("vision_tower"):
            return False
        if p.endswith(".mlp.gate"):
            return {"group_size": 32, "bits": router_bits} if router_bits else False
        return m.weight.shape[-1] % 32 == 0

    nn.quantize(model, group_size=32, bits=bits, class_predicate=predicate)
    return model


@pytest.mark.parametrize("layout,dialect", [("default", "default"), ("release", "release")])
def test_hf_checkpoint_converts_to_mlx_vlms_layout_with_transformers_logits(ckpt, tmp_path, layout, dialect):
    out = convert(ckpt(MOE, layout=layout, dialect=dialect), tmp_path / "out", dtype="float32", progress=False)
    weights = mx.load(str(out / "model.safetensors"))
    assert not any(".experts." in k for k in weights)
    prefix = "language_model.model.layers.0.mlp."
    assert weights[prefix + "switch_mlp.gate_proj.weight"].shape == (6, 64, 96)
    assert weights[prefix + "switch_mlp.down_proj.weight"].shape == (6, 96, 64)
    assert weights[prefix + "gate.weight"].shape == (6, 96)
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["num_experts"], text["rope_theta"], text["norm_topk_prob"], text["tie_word_embeddings"]) == (
        6,
        5e6,
        True,
        False,
    )
    ref = str(ckpt(MOE))
    assert rel_err(our_logits(load_model(out), reference_inputs(ref)), reference_logits(ref)) < TOL


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_quantized_conversion_keeps_routers_float_and_loads_exactly(ckpt, tmp_path, bits):
    src = ckpt(MOE)
    out = convert(
        src, tmp_path / f"q{bits}", dtype="float32", quantize=True, q_bits=bits, q_group_size=32, progress=False
    )
    weights = mx.load(str(out / "model.safetensors"))
    prefix = "language_model.model.layers.2.mlp."
    assert weights[prefix + "gate.weight"].dtype == mx.float32 and prefix + "gate.scales" not in weights
    assert weights[prefix + "switch_mlp.up_proj.weight"].dtype == mx.uint32
    assert prefix + "switch_mlp.up_proj.scales" in weights
    loaded = load_model(out)
    assert loaded.layers[2].mlp.switch_mlp.down_proj.bits == bits
    inputs = reference_inputs(str(src))
    assert rel_err(our_logits(loaded, inputs), our_logits(in_memory_quantized(src, bits), inputs)) < 1e-6
    if bits == 8:  # against transformers: measured cosine 0.99988, argmax 70 / 71 (a router flips on rounding)
        logits, ref = our_logits(loaded, inputs), reference_logits(str(src))
        assert (logits * ref).sum() / np.linalg.norm(logits) / np.linalg.norm(ref) > 0.999
        assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.95


def test_cli_converts_6_bit(ckpt, tmp_path, capsys):
    from mlx_compact.cli import main

    src, out = ckpt(MOE, layout="release", dialect="release"), tmp_path / "q6"
    assert (
        main(
            [
                "convert",
                "--hf-path",
                str(src),
                "--mlx-path",
                str(out),
                "-q",
                "--q-bits",
                "6",
                "--q-group-size",
                "32",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 6
    inputs = reference_inputs(str(ckpt(MOE)))
    assert rel_err(our_logits(load_model(out), inputs), our_logits(in_memory_quantized(ckpt(MOE), 6), inputs)) < 1e-6


def test_routers_quantized_on_request_and_8_bit_router_overrides_load(ckpt, tmp_path):
    src = ckpt(MOE)
    out = convert(
        src, tmp_path / "qr", dtype="float32", quantize=True, q_group_size=32, quantize_router=True, progress=False
    )
    assert load_model(out).layers[0].mlp.gate.bits == 4
    # a 4-bit checkpoint whose routers are 8-bit, declared per module (as mlx-lm's MoE recipes write it)
    model = in_memory_quantized(src, 4, router_bits=8)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_weights(mixed, model, progress=False)
    quant = {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        **{f"language_model.model.layers.{i}.mlp.gate": {"group_size": 32, "bits": 8} for i in (0, 2)},
    }
    config = json.loads((src / "config.json").read_text())
    save_config({**config, "quantization": quant, "quantization_config": quant}, mixed / "config.json")
    loaded = load_model(mixed)
    assert loaded.layers[0].mlp.gate.bits == 8 and loaded.layers[0].mlp.switch_mlp.gate_proj.bits == 4
    inputs = reference_inputs(str(src))
    assert rel_err(our_logits(loaded, inputs), our_logits(model, inputs)) < 1e-6


@pytest.mark.parametrize("bits", [None, 4, 6, 8], ids=["float", "q4", "q6", "q8"])
def test_mlx_vlm_converted_loads_with_mlx_vlms_logits(ckpt, tmp_path, bits):
    from mlx_vlm.convert import convert as mlx_vlm_convert

    out = tmp_path / "mlx-vlm"
    mlx_vlm_convert(
        str(ckpt(MOE, layout="release", dialect="release")),
        str(out),
        quantize=bits is not None,
        q_bits=bits or 4,
        q_group_size=32,
        dtype="float32",
    )
    weights = mx.load(str(out / "model.safetensors"))
    assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight" in weights
    if bits:  # mlx-vlm quantizes the routers too
        assert "language_model.model.layers.0.mlp.gate.scales" in weights
    ours = load_model(out)
    assert rel_err(text_logits(ours), mlx_vlm_logits(mlx_vlm_model(out))) < SAME
    inputs = reference_inputs(str(ckpt(MOE)))
    logits = our_logits(ours, inputs)
    assert rel_err(logits, mlx_vlm_logits(mlx_vlm_model(out, gelus_put_right=True), inputs)) < SAME
    if bits is None:
        assert rel_err(logits, reference_logits(str(ckpt(MOE)))) < TOL


@pytest.mark.parametrize("bits", [None, 4], ids=["float", "q4"])
def test_our_converted_loads_in_mlx_vlm(ckpt, tmp_path, bits):
    # from the transformers-5 save (num_local_experts, rope_parameters), which mlx-vlm cannot read itself
    out = convert(
        ckpt(MOE),
        tmp_path / "ours",
        dtype="float32",
        quantize=bits is not None,
        q_bits=bits or 4,
        q_group_size=32,
        progress=False,
    )
    ours = load_model(out)
    assert rel_err(mlx_vlm_logits(mlx_vlm_model(out)), text_logits(ours)) < SAME
    inputs = reference_inputs(str(ckpt(MOE)))
    assert rel_err(mlx_vlm_logits(mlx_vlm_model(out, gelus_put_right=True), inputs), our_logits(ours, inputs)) < SAME
