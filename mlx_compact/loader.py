"""Load a Qwen-VL model (and its processor) from a directory or a Hugging Face repo id.

Accepted checkpoints:
- a directory written by `mlx-compact convert` or by `mlx_vlm.convert` (float or quantized);
- a raw Hugging Face checkpoint directory: either key layout (`model.layers.*` / `visual.*`, or
  `model.language_model.*` / `model.visual.*`), one `model.safetensors` or shards with an index,
  any config.json dialect;
- a repo id such as ``"Qwen/Qwen2.5-VL-3B-Instruct"``, fetched with `huggingface_hub.snapshot_download`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .compaction.types import as_compaction
from .files import InputError, checked_file, checkpoint_root, plain_name, read_json, safetensors_header
from .fp8 import FP8Error, dequantize, fp8_config
from .models import build_model
from .models.base import WeightsError
from .models.config import MODEL_TYPES, ConfigError

# The small Qwen3-VL trained on synthetic scenes that ships inside the package: works offline.
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "assets" / "qwen3-vl-tiny")

# What a model directory needs from the hub (weights, config, tokenizer, processor, chat template).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class LoadError(InputError):
    """A checkpoint cannot be loaded; the message says why and what to do."""


# ---------------------------------------------------------------- public


def load(
    path_or_repo: str | None = None,
    *,
    dtype=None,
    revision: str | None = None,
    compaction=None,
    memory_budget: int | None = None,
    pipeline: bool = False,
    layer_split=None,
    pipeline_timeout: float | None = None,
):
    """Load a Qwen-VL checkpoint and return ``(model, processor)``.

    path_or_repo: a local directory (ours, mlx-vlm's, or a raw Hugging Face checkpoint) or a hub repo
    id; defaults to `DEFAULT_MODEL`.
    dtype: ``mx.float32`` / ``"bfloat16"`` / ...: the dtype of the float parameters. Default: float32 on
    the CPU backend, the checkpoint's own dtype on Metal. Quantized weights stay packed.
    revision: a branch, tag or commit of the hub repo.
    compaction: the model's default visual-token compaction (a ``Compaction``, or a spec such as
    ``"diversity:0.33"``), set as ``model.default_compaction`` (declared by `models.base.VLModel`), which
    ``generate``, ``stream_generate`` and ``ChatSession`` use when they are not given one.
    memory_budget: bytes the weights may take (default: what this device allows); checked from the
    safetensors headers before anything is allocated.
    pipeline: under ``mlx.launch`` with 2 or more ranks, run the LLM layers across the ranks (see
    `mlx_compact.pipeline`): each rank reads only its share, split by bytes in proportion to each rank's memory
    (``layer_split``, e.g. ``[20, 12]`` or ``"20,12"``: the layers of each rank, in rank order), rank 0 also the
    vision tower and embeddings, the last rank the LM head; ``memory_budget`` is then each rank's. On rank 0
    this returns as usual; on every other rank it serves its layers until rank 0 ends, then exits the process.
    ``pipeline_timeout``: seconds one transfer between ranks may wait before the rank gives up (default 300).
    Without ``mlx.launch`` (one process) ``pipeline`` changes nothing.
    Raises `LoadError` with a message naming the problem.
    """
    path = resolve(path_or_repo, revision=revision)
    model = load_model(
        path,
        dtype=dtype,
        memory_budget=memory_budget,
        pipeline=pipeline,
        layer_split=layer_split,
        pipeline_timeout=pipeline_timeout,
    )
    from .pipeline import pipeline_of

    pipe = pipeline_of(model)
    if pipe is not None and pipe.rank != 0:
        pipe.serve(model)
        sys.exit(0)
    model.default_compaction = as_compaction(compaction)
    from .processor import Processor  # imported here: the processor pulls in the tokenizer stack

    return model, Processor.from_pretrained(path)


def load_model(
    path_or_repo: str | Path,
    *,
    dtype=None,
    revision: str | None = None,
    lazy: bool = False,
    memory_budget: int | None = None,
    dequantize_fp8: bool = False,
    pipeline: bool = False,
    layer_split=None,
    pipeline_timeout: float | None = None,
):
    """Load only the model (see `load`). ``lazy=True`` leaves the weights unevaluated (for conversion and
    planning) and skips the memory check. ``dequantize_fp8``: an FP8 block-quantized checkpoint is dequantized
    (`mlx_compact.fp8`; the converter's path); without it such a checkpoint is refused, naming the converter.
    With ``pipeline`` (under ``mlx.launch``), this rank's share only; the model's `mlx_compact.pipeline.Pipeline`
    then says which (``serve`` it on ranks other than 0)."""
    from .pipeline import group_size, parse_split

    split = parse_split(layer_split)
    group = mx.distributed.init() if pipeline and not lazy and group_size() > 1 else None
    path = resolve(path_or_repo, revision=revision)
    config = read_config(path)
    files = weight_files(path)
    headers = {f: safetensors_header(f, checkpoint_root(path)) for f in files}
    config = _tie_by_weights(config, headers)
    try:
        fp8 = fp8_config(config)
    except FP8Error as e:
        raise LoadError(f"{path}: {e}") from None
    if fp8 is not None:
        if not dequantize_fp8:
            raise LoadError(
                f"{path} is an FP8 checkpoint; convert it first (it is dequantized on the way): mlx-compact "
                f"convert --hf-path {path} --mlx-path OUTPUT [--quantize]"
            )
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        model = build_model(config)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:  # a config the validation missed
        raise LoadError(f"{path}: config.json does not describe a buildable model ({e})") from None

    if not lazy and group is None:
        _check_weights_fit(path, headers, _resolve_dtype(dtype), memory_budget)
    try:
        weights = read_weights(path, files)
        if fp8 is not None:
            weights = dequantize(weights, headers, fp8)
        weights = model.sanitize(weights)
    except (WeightsError, FP8Error) as e:
        raise LoadError(f"{path}: {e}") from None
    quantization = _quantization(config)
    if quantization is not None:
        _quantize_like(model, quantization, weights)
    _check_weights(model, weights, path)

    dtype = _resolve_dtype(dtype)
    if dtype is not None:
        # a Gated DeltaNet's A_log stays float32 (its decay exp(-exp(A_log)) is sensitive), as mlx-lm keeps it
        weights = {k: v.astype(dtype) if _is_float(v) and not k.endswith(".A_log") else v for k, v in weights.items()}
    if group is not None:
        weights = _take_share(model, weights, group, split, memory_budget, pipeline_timeout, path)
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    if group is not None:  # every rank has its share before rank 0 sends anything
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model


def _take_share(model, weights: dict, group, split, budget, timeout, path) -> dict:
    """This rank's weights (still unread) and the model cut to its share of a pipeline; the split agreed by every
    rank from every rank's memory, and refused on every rank, naming the rank, when a share would not fit."""
    from .memory import device_budget, fmt_bytes
    from .pipeline import DEFAULT_TIMEOUT, Pipeline, fitting_split, gather, layer_of, layer_split, owners

    lm = model.language_model
    n, size, rank = len(lm.model.layers), group.size(), group.rank()
    tied = lm.cfg.tie_word_embeddings
    layer_bytes, fixed = [0] * n, [0] * size
    for name, v in weights.items():
        layer = layer_of(name)
        if layer is not None:
            layer_bytes[layer] += v.nbytes
        else:
            for r in owners(name, [1] * size, tied):
                fixed[r] += v.nbytes
    mine = device_budget()
    budgets, memory = zip(*gather([budget or mine["available"], mine["total"]], group))
    # rank 0 holds at least the first attention layer: its cache tells the runtime where the conversation stands
    min_first = 1 + next((i for i in range(n) if not lm.cfg.is_linear(i)), 0)
    if split is None:
        split = layer_split(layer_bytes, fixed, memory, min_first)
    elif split[0] < min_first:
        raise LoadError(f"--layer-split: rank 0 needs at least {min_first} layers (through the first attention layer)")
    elif len(split) != size or sum(split) != n:
        raise LoadError(
            f"--layer-split {','.join(map(str, split))} must give {size} ranks (one number each) {n} layers in all"
        )
    stops = [sum(split[: r + 1]) for r in range(size)]
    need = [fixed[r] + sum(layer_bytes[stops[r] - split[r] : stops[r]]) for r in range(size)]
    over = [r for r in range(size) if need[r] > budgets[r]]
    if over:
        r = over[0]
        fits = fitting_split(layer_bytes, fixed, budgets, min_first)
        advice = (
            f"--layer-split {','.join(map(str, fits))}"
            if fits
            else f"nothing: the {size} ranks have {fmt_bytes(sum(budgets))} together and the weights take "
            f"{fmt_bytes(sum(need))}; use a more quantized checkpoint or add a Mac"
        )
        a, b = stops[r] - split[r], stops[r] - 1
        holds = [f"LLM layers {a}-{b} of {n}" if b > a else f"LLM layer {a} of {n}"]
        holds += ["the vision tower and embeddings"] if r == 0 else []
        holds += ["the LM head"] if r == size - 1 else []
        raise LoadError(
            f"{path}: rank {r} would hold {fmt_bytes(need[r])} of weights ({', '.join(holds)}) but "
            f"{fmt_bytes(budgets[r])} is available there; what would fit: {advice}"
        )
    pipe = Pipeline(group, split, timeout or DEFAULT_TIMEOUT)
    lm.layer_range = (pipe.first, pipe.stop)
    lm.pipeline = pipe
    for i in range(n):
        if not pipe.first <= i < pipe.stop:
            lm.model.layers[i] = nn.Module()
    if rank != 0:
        model.vision_tower = nn.Module()
        if not (pipe.last and tied):
            lm.model.embed_tokens = nn.Module()
    if not pipe.last:
        lm.model.norm = nn.Module()
        if "lm_head" in lm:
            lm.lm_head = nn.Module()
    if rank == 0:
        import atexit

        atexit.register(pipe.close)
    return {k: v for k, v in weights.items() if rank in owners(k, split, tied)}


def resolve(path_or_repo: str | Path | None, *, revision: str | None = None) -> Path:
    """A local directory for ``path_or_repo``: the path itself, or a hub snapshot of the repo id."""
    if path_or_repo is None:
        path_or_repo = DEFAULT_MODEL
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; give the checkpoint's directory instead")
        check_files(path)
        return path
    name = str(path_or_repo)
    if not _looks_like_repo_id(name):
        raise LoadError(f"{name} does not exist (and is not a Hugging Face repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id=name, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # hub errors come in many classes; all mean "could not get it"
        raise LoadError(
            f"{name} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from None
    check_files(path)
    return path


def check_files(path: Path) -> None:
    """Every file of the checkpoint that a load may read (weights, JSON, tokenizer, template) is a regular
    file inside the checkpoint (a hub snapshot: inside the repo's cache folder); else `LoadError`."""
    root = checkpoint_root(path)
    for f in sorted(path.iterdir()):
        if f.is_dir() and not f.is_symlink():
            continue  # subfolders are never read
        if any(f.match(p) for p in ALLOW_PATTERNS):
            try:
                checked_file(f, root, "checkpoint file")
            except FileNotFoundError:
                raise LoadError(f"{f} is a broken link; download the checkpoint again") from None
            except InputError as e:
                raise LoadError(str(e)) from None


def read_config(path: Path) -> dict:
    """config.json of a checkpoint directory, checked to be a supported Qwen-VL model."""
    file = Path(path) / "config.json"
    supported = ", ".join(MODEL_TYPES)
    if not file.exists():
        raise LoadError(f"{path} has no config.json: not a Qwen-VL checkpoint (supported: {supported})")
    try:
        config = read_json(file, checkpoint_root(path), "config.json")
    except InputError as e:
        raise LoadError(str(e)) from None
    if config.get("model_type") not in MODEL_TYPES:
        raise LoadError(
            f"{path}: model_type {config.get('model_type')!r} is not a supported Qwen-VL model (supported: {supported})"
        )
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named in the index, else every *.safetensors."""
    path = Path(path)
    root = checkpoint_root(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = read_json(index, root, index.name).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise InputError(f"{index}: weight_map is not an object; download the checkpoint again")
            names = sorted({plain_name(n, f"{index.name}") for n in weight_map.values()})
        except InputError as e:
            raise LoadError(str(e)) from None
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


def read_weights(path: Path, files: list[Path] | None = None) -> dict:
    """Every tensor of the checkpoint, loaded lazily (nothing is read until evaluated).

    Each file's header is validated first (`mlx_compact.files.safetensors_header`)."""
    weights = {}
    root = checkpoint_root(path)
    for f in files if files is not None else weight_files(path):
        try:
            safetensors_header(f, root)
            weights.update(mx.load(str(f)))
        except InputError as e:
            raise LoadError(str(e)) from None
        except (RuntimeError, ValueError, OSError) as e:
            raise LoadError(f"weights file {f} cannot be read ({_first_line(e)}); download it again") from None
    return weights


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_weights_fit(path: Path, headers: dict, dtype, budget) -> None:
    """Refuse, before anything is allocated, weights larger than the memory budget (from the headers)."""
    from .memory import device_budget, fmt_bytes

    total = 0
    for header in headers.values():
        for name, entry in header.items():
            if name != "__metadata__":
                kind, shape, nbytes = entry
                if dtype is not None and kind in ("F16", "BF16", "F32", "F64"):
                    nbytes = nbytes // {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[kind] * dtype.size
                total += nbytes
    if budget is None:
        budget = device_budget()["available"]
    if total > budget:
        raise LoadError(
            f"{path}: the weights take {fmt_bytes(total)} but {fmt_bytes(budget)} is available; use a "
            "smaller or more quantized checkpoint (e.g. a 4-bit one)"
        )


# ---------------------------------------------------------------- helpers


def _tie_by_weights(config: dict, headers: dict) -> dict:
    """The config with the head's tie decided: by the top-level ``tie_word_embeddings`` when it has one (what
    transformers obeys), else by whether the weights hold an ``lm_head.weight`` (a tied save has none)."""
    if "tie_word_embeddings" in config:
        return config
    names = (n for h in headers.values() for n in h if n != "__metadata__")
    return config if any(n.endswith("lm_head.weight") for n in names) else {**config, "tie_word_embeddings": True}


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
    for key in (path, path[len("language_model.") :] if path.startswith("language_model.") else None):
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
        if _is_float(param) != _is_float(weights[name]) or (
            not _is_float(param) and param.dtype != weights[name].dtype
        ):
            raise LoadError(
                f"{path}: tensor {name} has dtype {weights[name].dtype} in the checkpoint where "
                f"{param.dtype} is expected: the checkpoint is corrupt"
            )
