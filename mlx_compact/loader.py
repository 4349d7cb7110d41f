"""Load a Qwen-VL model (and its processor) from a directory or a Hugging Face repo id.

Accepted checkpoints:
- a directory written by `mlx-compact convert` or by `mlx_vlm.convert` (float or quantized);
- a raw Hugging Face checkpoint directory: either key layout (`model.layers.*` / `visual.*`, or
  `model.language_model.*` / `model.visual.*`), one `model.safetensors` or shards with an index,
  any config.json dialect;
- a repo id such as ``"Qwen/Qwen2.5-VL-3B-Instruct"``, fetched with `huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import build_model
from .models.config import MODEL_TYPES, ConfigError

# The small Qwen3-VL trained on synthetic scenes that ships inside the package: works offline.
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "assets" / "qwen3-vl-tiny")

# What a model directory needs from the hub (weights, config, tokenizer, processor, chat template).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class LoadError(ValueError):
    """A checkpoint cannot be loaded; the message says why and what to do."""


# ---------------------------------------------------------------- public


def load(path_or_repo: str | None = None, *, dtype=None, revision: str | None = None, compaction=None):
    """Load a Qwen-VL checkpoint and return ``(model, processor)``.

    path_or_repo: a local directory (ours, mlx-vlm's, or a raw Hugging Face checkpoint) or a hub repo
    id; defaults to `DEFAULT_MODEL`.
    dtype: ``mx.float32`` / ``"bfloat16"`` / ...: the dtype of the float parameters. Default: float32 on
    the CPU backend, the checkpoint's own dtype on Metal. Quantized weights stay packed.
    revision: a branch, tag or commit of the hub repo.
    compaction: the model's default visual-token compaction (a ``Compaction``, or a spec such as
    ``"diversity:0.33"``), used by ``generate`` and ``ChatSession`` when they are not given one.
    Raises `LoadError` with a message naming the problem.
    """
    path = resolve(path_or_repo, revision=revision)
    model = load_model(path, dtype=dtype)
    if compaction is not None:
        from .generate import set_default_compaction

        set_default_compaction(model, compaction)
    from .processor import Processor  # imported here: the processor pulls in the tokenizer stack

    return model, Processor.from_pretrained(path)


def load_model(path_or_repo: str | Path, *, dtype=None, revision: str | None = None, lazy: bool = False):
    """Load only the model (see `load`). ``lazy=True`` leaves the weights unevaluated (for conversion)."""
    path = resolve(path_or_repo, revision=revision)
    config = read_config(path)
    try:
        model = build_model(config)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None

    weights = model.sanitize(read_weights(path))
    quantization = _quantization(config)
    if quantization is not None:
        _quantize_like(model, quantization, weights)
    _check_weights(model, weights, path)

    dtype = _resolve_dtype(dtype)
    if dtype is not None:
        weights = {k: v.astype(dtype) if _is_float(v) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def resolve(path_or_repo: str | Path | None, *, revision: str | None = None) -> Path:
    """A local directory for ``path_or_repo``: the path itself, or a hub snapshot of the repo id."""
    if path_or_repo is None:
        path_or_repo = DEFAULT_MODEL
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; give the checkpoint's directory instead")
        return path
    name = str(path_or_repo)
    if not _looks_like_repo_id(name):
        raise LoadError(f"{name} does not exist (and is not a Hugging Face repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # hub errors come in many classes; all mean "could not get it"
        raise LoadError(
            f"{name} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory, checked to be a supported Qwen-VL model."""
    file = Path(path) / "config.json"
    supported = ", ".join(MODEL_TYPES)
    if not file.exists():
        raise LoadError(f"{path} has no config.json: not a Qwen-VL checkpoint (supported: {supported})")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{file} is not valid JSON ({e})") from None
    if config.get("model_type") not in MODEL_TYPES:
        raise LoadError(
            f"{path}: model_type {config.get('model_type')!r} is not a supported Qwen-VL model "
            f"(supported: {supported})"
        )
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named in the index, else every *.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise LoadError(
                f"{path}: shard {missing[0]} is listed in {index.name} but missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; download the checkpoint again"
            )
        if names:
            return [path / n for n in names]
    files = sorted(f for f in path.glob("*.safetensors") if f.name != "consolidated.safetensors")
    if not files:
        other = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = (
            f" (found {', '.join(other[:3])}: re-save with transformers' save_pretrained to get safetensors)"
            if other
            else ""
        )
        raise LoadError(f"{path}: no weights found: no *.safetensors files{hint}")
    return files


def read_weights(path: Path) -> dict:
    """Every tensor of the checkpoint, loaded lazily (nothing is read until evaluated)."""
    weights = {}
    for f in weight_files(path):
        weights.update(mx.load(str(f)))
    return weights


# ---------------------------------------------------------------- helpers


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def _is_float(v: mx.array) -> bool:
    return mx.issubdtype(v.dtype, mx.floating)


def _resolve_dtype(dtype):
    """The dtype to cast float weights to, or None to keep the checkpoint's."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype is not None:
        return dtype
    on_cpu = mx.default_device() == mx.cpu or not mx.metal.is_available()
    return mx.float32 if on_cpu else None


def _quantization(config: dict):
    """The mlx quantization settings of a checkpoint ({group_size, bits, mode, per-module...}) or None."""
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "quant_method" in qc:
            raise LoadError(
                f"quantization method {qc['quant_method']!r} is not supported: use the float checkpoint, "
                "or one quantized by mlx-compact / mlx-vlm"
            )
        if isinstance(qc, dict) and "bits" in qc and "group_size" in qc:
            q = qc
    return q


def _module_override(quantization: dict, path: str):
    """A per-module entry of the quantization config (mlx-vlm keys it with or without 'language_model.')."""
    for key in (path, path[len("language_model."):] if path.startswith("language_model.") else None):
        if key is not None and key in quantization:
            return quantization[key]
    return None


def _quantize_like(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Swap in quantized layers exactly where the checkpoint has quantized tensors (as mlx-vlm does)."""

    def predicate(path, module):
        override = _module_override(quantization, path)
        if override is False:
            return False
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return override if isinstance(override, dict) else True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "")


def _check_weights(model: nn.Module, weights: dict, path: Path) -> None:
    """Every parameter present with the shape the config implies, and nothing else."""
    expected = dict(tree_flatten(model.parameters()))
    missing = expected.keys() - weights.keys()
    unexpected = weights.keys() - expected.keys()
    if missing:
        raise LoadError(f"{path}: the checkpoint lacks {len(missing)} tensors the config needs: {_few(missing)}")
    if unexpected:
        raise LoadError(
            f"{path}: the checkpoint has {len(unexpected)} tensors this model does not use: {_few(unexpected)}"
        )
    for name, param in expected.items():
        if tuple(weights[name].shape) != tuple(param.shape):
            raise LoadError(
                f"{path}: tensor {name} has shape {tuple(weights[name].shape)} in the checkpoint but "
                f"config.json implies {tuple(param.shape)}: the config does not match the weights"
            )
