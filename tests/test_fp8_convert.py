"""FP8 block-quantized checkpoints (the Qwen FP8 releases' format): the converter dequantizes them.

The FP8 checkpoints are built here with torch (``float8_e4m3fn`` weights, a float32
``weight_scale_inv`` per block, ``quantization_config {quant_method: fp8, weight_block_size}``), with block
sizes that leave partial edge blocks on the tiny widths. The reference dequantization is torch's, written
independently below (and cross-checked against transformers' own ``_dequantize_fp8_weight`` when it exists):
the converter's float32 output must equal, tensor for tensor, the conversion of the same checkpoint with the
reference's float weights written in.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_compact.convert import convert
from safetensors.torch import load_file, save_file
from tiny_checkpoints import MOE

from mlx_compact import fp8
from mlx_compact.loader import LoadError, load_model

FP8_MAX = 448.0  # float8_e4m3fn


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """torch: fp8 -> float32 times each element's block scale (edge blocks partial)."""
    n, k = q.shape[-2:]
    s = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)[..., :n, :k]
    return q.float() * s


def quantize_fp8(w: torch.Tensor, block):
    """Block-wise FP8 quantization as the FP8 releases do it: scale = amax(block) / fp8 max."""
    n, k = w.shape[-2:]
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.nn.functional.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n))
    blocks = padded.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn))  # [..., nb, bn, kb, bk]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / FP8_MAX  # [..., nb, kb]
    q = (blocks / scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :n, :k].to(torch.float8_e4m3fn)
    return q, scale


def fp8_checkpoint(src, dst, block):
    """Copy ``src`` with its language-model matrices (>= 2-D projections and experts) stored FP8; return the
    copy and a float copy holding the reference dequantization of the same FP8 values."""
    ref = dst.parent / (dst.name + "-reference")
    for d in (dst, ref):
        shutil.copytree(src, d)
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        quant, deq = {}, {}
        for name, w in tensors.items():
            matrix = "language_model" in name and w.ndim >= 2 and "embed" not in name and "mlp.gate." not in name
            if not matrix:
                quant[name] = deq[name] = w
                continue
            q, scale = quantize_fp8(w, block)
            scale_name = name + "_scale_inv"
            quant[name], quant[scale_name] = q, scale
            deq[name] = reference_dequantize(q, scale, block)
        save_file(quant, str(dst / f.name), metadata={"format": "pt"})
        save_file(deq, str(ref / f.name), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head", "embed_tokens", "mlp.gate"],
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst, ref


def test_reference_is_transformers():
    """The reference above is transformers' FineGrainedFP8 dequantization (partial edge blocks included)."""
    ff = pytest.importorskip("transformers.integrations.finegrained_fp8")
    if not hasattr(ff, "_dequantize_fp8_weight"):
        pytest.skip("this transformers has no _dequantize_fp8_weight")
    w = torch.randn(300, 260) * 0.1
    q, scale = quantize_fp8(w, (128, 128))
    assert scale.shape == (3, 3)
    ours = reference_dequantize(q, scale, (128, 128))
    theirs = ff._dequantize_fp8_weight(q, scale, [128, 128], torch.float32)
    assert torch.equal(ours, theirs)
    assert (ours - w).abs().max() <= w.abs().max() / 8  # e4m3 has 3 mantissa bits


@pytest.mark.parametrize("shape", [(300, 260), (3, 200, 130)], ids=["matrix", "experts"])
def test_dequantize_equals_torch(tmp_path, shape):
    """128x128 blocks with partial edges, 2-D and batched (fused experts)."""
    w = torch.randn(*shape) * 0.05
    q, scale = quantize_fp8(w, (128, 128))
    save_file({"w": q, "w_scale_inv": scale}, str(tmp_path / "m.safetensors"))
    from mlx_compact.files import safetensors_header

    f = tmp_path / "m.safetensors"
    out = fp8.dequantize(mx.load(str(f)), {f: safetensors_header(f, tmp_path)}, {"block": (128, 128)})
    assert list(out) == ["w"]
    np.testing.assert_array_equal(np.array(out["w"]), reference_dequantize(q, scale, (128, 128)).numpy())


@pytest.mark.parametrize(
    "arch, layout, block",
    [("qwen3_vl", "default", (16, 24)), (MOE, "release", (32, 16))],
    ids=["qwen3_vl", "moe-fused-experts"],
)
def test_fp8_checkpoint_converts_to_the_reference(ckpt, tmp_path, arch, layout, block):
    src, ref = fp8_checkpoint(ckpt(arch, layout=layout), tmp_path / "fp8", block)
    ours = convert(src, tmp_path / "ours", dtype="float32", progress=False)
    expected = convert(ref, tmp_path / "expected", dtype="float32", progress=False)
    config = json.loads((ours / "config.json").read_text())
    assert "quantization_config" not in config and "quantization" not in config
    a, b = load_file(ours / "model.safetensors"), load_file(expected / "model.safetensors")
    assert a.keys() == b.keys() and not any(k.endswith("_scale_inv") for k in a)
    for k in a:
        assert a[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), k
    # and then quantized in the same conversion: loads, 4-bit
    q4 = convert(src, tmp_path / "q4", quantize=True, dtype="float32", progress=False)
    assert load_model(q4).config.quantization["bits"] == 4


def test_fp8_load_names_the_converter(ckpt, tmp_path):
    src, _ = fp8_checkpoint(ckpt("qwen3_vl"), tmp_path / "fp8", (16, 16))
    with pytest.raises(LoadError, match="is an FP8 checkpoint; convert it first"):
        load_model(src)


def test_bad_fp8_checkpoints_are_named(ckpt, tmp_path):
    src, _ = fp8_checkpoint(ckpt("qwen3_vl"), tmp_path / "fp8", (16, 16))
    config = json.loads((src / "config.json").read_text())
    cases = {  # a quantization_config change: what the one-line error says
        "weight_block_size": ([16], r"weight_block_size is \[16\]"),
        "fmt": ("e5m2", "fmt is 'e5m2': only e4m3"),
        "weight_block_size ": ([8, 8], "in 8x8 blocks needs"),
    }
    for key, (value, message) in cases.items():
        qc = {**config["quantization_config"], key.strip(): value}
        (src / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(LoadError, match=message):
            convert(src, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    (src / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    dropped = next(k for k in tensors if k.endswith("_scale_inv"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(src / "model.safetensors"))
    with pytest.raises(LoadError, match="has no .*_scale_inv; the checkpoint is incomplete"):
        convert(src, tmp_path / "out", progress=False)
