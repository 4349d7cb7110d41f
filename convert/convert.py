"""Convert a Hugging Face Qwen-VL checkpoint into an MLX directory (optionally quantized).

The output is laid out as `mlx_vlm.convert` writes it, so either library loads the other's output:
weights named ``language_model.model.*`` / ``language_model.lm_head.*`` / ``vision_tower.*`` (Conv3d
stored ``(O, T, H, W, C)``) in ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``; config.json with ``quantization`` and ``quantization_config`` when
quantized; tokenizer, processor, chat-template and generation-config files copied alongside.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_compact.loader import DTYPES, LoadError, load_model, read_config, resolve

MAX_SHARD_BYTES = 5 << 30  # as mlx-vlm
SIDECAR_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}


class ConvertError(ValueError):
    """The conversion cannot be done; the message says why and what to do."""


def convert(
    hf_path,
    mlx_path,
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str = "bfloat16",
    quantize_vision: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the checkpoint at ``hf_path`` (directory or hub repo id) into ``mlx_path``; return it.

    quantize: affine-quantize the language model's linears and embeddings to ``q_bits`` bits with
    groups of ``q_group_size``; layers whose input width is not a multiple of the group size stay float.
    dtype: the dtype of the float parameters (and of the quantization scales).
    quantize_vision: quantize the vision tower too (kept float by default).
    force: replace an existing ``mlx_path``.
    The output appears only when complete; on any error (or Ctrl-C) nothing is left behind.
    Raises `ConvertError` or `mlx_compact.loader.LoadError` with a message naming the problem.
    """
    if dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if quantize and q_bits not in (2, 3, 4, 5, 6, 8):
        raise ConvertError(f"q_bits must be one of 2, 3, 4, 5, 6, 8 (got {q_bits})")
    if quantize and q_group_size not in (32, 64, 128):
        raise ConvertError(f"q_group_size must be 32, 64 or 128 (got {q_group_size})")
    src = resolve(hf_path)
    dst = Path(mlx_path).expanduser()
    if dst.resolve() == src.resolve():
        raise ConvertError(f"the output {dst} is the source checkpoint; choose another --mlx-path")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} already exists; choose another --mlx-path or pass --force to replace it")

    config = read_config(src)
    model = load_model(src, dtype=DTYPES[dtype], lazy=True)
    if quantize:
        if model.config.quantization:
            raise ConvertError(f"{src} is already quantized; convert from the float checkpoint")
        config = _quantize(model, config, q_bits, q_group_size, quantize_vision)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
        save_weights(tmp, model, progress=progress)
        _copy_sidecars(src, tmp)
        save_config(_mlx_config(config, model), tmp / "config.json")
        _move_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_weights(path: Path, model: nn.Module, *, progress: bool = True) -> None:
    """Evaluate and write the model's parameters as mlx-vlm does (shards of <= 5 GiB plus an index)."""
    from tqdm import tqdm

    weights = dict(tree_flatten(model.parameters()))
    show = progress and sys.stderr.isatty()
    for v in tqdm(weights.values(), desc="Converting", unit="tensor", disable=not show):
        mx.eval(v)  # reads, casts and quantizes one tensor

    shards, shard, size = [], {}, 0
    for k, v in weights.items():
        if shard and size + v.nbytes > MAX_SHARD_BYTES:
            shards.append(shard)
            shard, size = {}, 0
        shard[k] = v
        size += v.nbytes
    shards.append(shard)

    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def save_config(config: dict, path: Path) -> None:
    """config.json with sorted keys, as mlx-vlm writes it."""
    config = {k: v for k, v in config.items() if k not in ("_name_or_path", "torch_dtype")}
    Path(path).write_text(json.dumps(dict(sorted(config.items())), indent=4))


# ---------------------------------------------------------------- helpers


def _quantize(model: nn.Module, config: dict, bits: int, group_size: int, quantize_vision: bool) -> dict:
    """Quantize in place like mlx-vlm's convert; return the config with its quantization keys."""

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if path.startswith("vision_tower") and not (quantize_vision and isinstance(module, nn.Linear)):
            return False  # the ViT's position table (Qwen3-VL) is read directly, never quantized
        return module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, mode="affine", class_predicate=predicate)
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    return {**config, "quantization": quantization, "quantization_config": dict(quantization)}


def _mlx_config(config: dict, model: nn.Module) -> dict:
    """The source config, plus the keys mlx-vlm's config readers need whatever the source dialect was.

    mlx-vlm reads Qwen2/2.5-VL's language-model settings from the top level (``rope_scaling`` with
    ``type`` and ``mrope_section``) and Qwen3-VL's from ``text_config`` (``rope_theta``, ``rope_scaling``);
    configs saved by newer transformers keep them nested or under ``rope_parameters``, and name the
    vision config's model_type ``<type>_vision``, which mlx-vlm rejects. Other keys are left as they are.
    """
    config = json.loads(json.dumps(config))  # deep copy
    vision = config.setdefault("vision_config", {})
    if str(vision.get("model_type", "_vision")).endswith("_vision"):
        vision["model_type"] = config["model_type"]  # mlx-vlm rejects transformers-5's "<type>_vision"
    t = model.config.text
    text = {
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "intermediate_size": t.intermediate_size,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "vocab_size": t.vocab_size,
        "rope_theta": t.rope_theta,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if model.config.model_type == "qwen3_vl":
        tc = config.setdefault("text_config", {})
        text["head_dim"] = t.head_dim
        for k, v in text.items():
            tc.setdefault(k, v)
        tc.setdefault(
            "rope_scaling",
            {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
        )
    else:
        for k, v in text.items():
            config.setdefault(k, v)
        config.setdefault("rope_scaling", {"type": "mrope", "mrope_section": list(t.mrope_section)})
    return config


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_sidecars(src: Path, dst: Path) -> None:
    """Tokenizer, processor, chat-template and generation-config files (not weights, not config.json)."""
    for pattern in SIDECAR_PATTERNS:
        for f in src.glob(pattern):
            if f.is_file() and f.name not in NOT_COPIED:
                shutil.copy2(f, dst / f.name)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished temp dir to ``dst``, replacing an old ``dst`` only now (``force``)."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    old.rmdir()
    dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


__all__ = ["convert", "ConvertError", "LoadError", "save_weights", "save_config"]
