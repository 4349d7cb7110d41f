"""FP8 block-quantized checkpoints (``quantization_config.quant_method: fp8``), dequantized for the converter.

The Qwen FP8 releases (and DeepSeek-V3's format, which transformers' FineGrainedFP8 integration reads) store each
quantized weight ``W`` [..., N, K] as ``float8_e4m3fn`` with a float scale per block of ``weight_block_size``
[bn, bk] rows and columns (``W_scale_inv`` [..., ceil(N / bn), ceil(K / bk)], named ``<weight>_scale_inv``:
``q_proj.weight_scale_inv``, or ``gate_up_proj_scale_inv`` for a fused expert tensor):

    W[i, j] = fp8[i, j] * scale_inv[i // bn, j // bk]

the edge blocks are partial (the scale of the block a row or column falls in), as transformers'
``_dequantize_fp8_weight`` has it. Without ``weight_block_size`` the scale is one per tensor. Tensors without a
scale (``modules_to_not_convert``: norms, embeddings, routers, ...) are float already and pass through.
"""

from __future__ import annotations

import mlx.core as mx

from .files import InputError

FP8_DTYPE = "F8_E4M3"  # the safetensors name; MLX loads it as raw uint8 (and cannot read F8_E5M2 at all)
SCALE_SUFFIX = "_scale_inv"
ACTIVATION_SCALES = ("input_scale", "activation_scale")  # static activation scales: unused once dequantized


class FP8Error(InputError):
    """An FP8 checkpoint that cannot be dequantized; the message says why."""


def fp8_config(config: dict) -> dict | None:
    """The checkpoint's FP8 quantization settings ``{"block": (bn, bk) or None}``, or None if it is not FP8.

    Raises `FP8Error` on settings this module cannot dequantize (an unknown ``fmt``, a bad block size)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
        return None
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise FP8Error(
            f"quantization_config.fmt is {fmt!r}: only e4m3 FP8 checkpoints can be read (MLX reads no other FP8 "
            "tensors); convert from the bfloat16 release instead"
        )
    block = qc.get("weight_block_size")
    if block is not None:
        if not (
            isinstance(block, list) and len(block) == 2 and all(type(b) is int and 0 < b <= 1 << 20 for b in block)
        ):
            raise FP8Error(f"quantization_config.weight_block_size is {block!r}; expected two positive whole numbers")
        block = tuple(block)
    return {"block": block}


def dequantize(weights: dict, headers: dict, settings: dict) -> dict:
    """``weights`` (name -> lazily loaded array) with every FP8 tensor multiplied out by its scales, in float32.

    ``headers``: the validated safetensors headers of the files (`files.safetensors_header`), whose dtypes say
    which uint8 tensors are FP8. Scales and static activation scales are dropped. Raises
    `FP8Error` naming the tensor when a weight has no scale, a scale no weight, or a shape does not match."""
    kinds = {name: entry[0] for h in headers.values() for name, entry in h.items() if name != "__metadata__"}
    out = {}
    for name, w in weights.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in weights:
                raise FP8Error(
                    f"the scale {name} has no weight {name[: -len(SCALE_SUFFIX)]}; the checkpoint is incomplete"
                )
            continue
        if name.rsplit(".", 1)[-1] in ACTIVATION_SCALES:
            continue
        kind = kinds.get(name)
        if kind != FP8_DTYPE:
            out[name] = w
            continue
        scale = weights.get(name + SCALE_SUFFIX)
        if scale is None:
            raise FP8Error(f"the FP8 tensor {name} has no {name + SCALE_SUFFIX}; the checkpoint is incomplete")
        out[name] = _dequantize_one(name, w, scale, settings["block"])
    return out


def _dequantize_one(name: str, w: mx.array, scale: mx.array, block) -> mx.array:
    w = mx.from_fp8(w, mx.float32)
    scale = scale.astype(mx.float32)
    if block is None or w.ndim < 2:
        if scale.size != 1:
            raise FP8Error(f"{name}: one scale per tensor expected (no weight_block_size), got shape {scale.shape}")
        return w * scale.reshape(())
    (bn, bk), (n, k), lead = block, w.shape[-2:], w.shape[:-2]
    nb, kb = -(-n // bn), -(-k // bk)
    if tuple(scale.shape) != (*lead, nb, kb):
        raise FP8Error(
            f"{name}{SCALE_SUFFIX} has shape {tuple(scale.shape)} but a weight of shape {tuple(w.shape)} in "
            f"{bn}x{bk} blocks needs {(*lead, nb, kb)}; the checkpoint is corrupt"
        )
    if nb * bn != n or kb * bk != k:  # partial edge blocks: pad, scale, cut
        w = mx.pad(w, [(0, 0)] * len(lead) + [(0, nb * bn - n), (0, kb * bk - k)])
    w = w.reshape(*lead, nb, bn, kb, bk) * scale.reshape(*lead, nb, 1, kb, 1)  # [..., nb, bn, kb, bk]
    return w.reshape(*lead, nb * bn, kb * bk)[..., :n, :k]
