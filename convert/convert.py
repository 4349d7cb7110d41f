"""Convert a Hugging Face Qwen-VL checkpoint into an MLX directory (optionally quantized).

The output is laid out as `mlx_vlm.convert` writes it, so either library loads the other's output:
weights named ``language_model.model.*`` / ``language_model.lm_head.*`` / ``vision_tower.*`` (Conv3d
stored ``(O, T, H, W, C)``; Qwen3-VL-MoE and Qwen3.5-MoE experts as ``mlp.switch_mlp.{gate,up,down}_proj``;
Qwen3.5's conv1d ``[C, K, 1]`` and zero-centred norms holding ``1 + w``, its ``mtp.*`` tensors dropped) in
``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``;
config.json with ``quantization`` and ``quantization_config`` when quantized; tokenizer, processor,
chat-template and generation-config files copied alongside.

Careful with what is there: ``force`` replaces only an empty folder or a previous conversion's output,
never the source or a folder holding it; sidecar files are copied only when they are regular files
inside the checkpoint; SIGTERM and SIGHUP clean up like Ctrl-C; and the temp folders of a killed
conversion (``.{name}.*.tmp`` beside the output, marked with their writer's pid) are removed by the
next conversion to the same output once their writer is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_compact.files import InputError, checked_file, checkpoint_root, inside, read_bytes, read_json
from mlx_compact.fp8 import fp8_config
from mlx_compact.loader import DTYPES, LoadError, load_model, read_config, resolve
from mlx_compact.models.config import HYBRID

MAX_SHARD_BYTES = 5 << 30  # as mlx-vlm
SIDECAR_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
NOT_COPIED = {"config.json", "model.safetensors.index.json"}
OUTPUT_PATTERNS = (*SIDECAR_PATTERNS, "tokenizer*", "model.safetensors")  # what a conversion writes
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MARKER = ".mlx-compact-convert"  # in a conversion's temp folder only: {"pid": ..., "host": ...}
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class ConvertError(InputError):
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
    quantize_router: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the checkpoint at ``hf_path`` (directory or hub repo id) into ``mlx_path``; return it.

    quantize: affine-quantize the language model's linears and embeddings to ``q_bits`` bits with
    groups of ``q_group_size``; layers whose input width is not a multiple of the group size stay float.
    dtype: the dtype of the float parameters (and of the quantization scales).
    An FP8 block-quantized source (``quantization_config.quant_method: fp8``, the Qwen FP8 releases) is
    dequantized into ``dtype`` (`mlx_compact.fp8`), then quantized if asked.
    quantize_vision: quantize the vision tower too (kept float by default).
    quantize_router: quantize the MoE routers (``mlp.gate``; Qwen3.5-MoE's ``mlp.shared_expert_gate`` too) as
    well; kept float by default: they are small (experts x hidden per layer) and pick which experts run.
    force: replace an existing ``mlx_path``, which must be empty or a previous conversion's output
    (config.json, weights and sidecar files, nothing else); the source, a folder holding it, a file,
    or a folder with anything else in it is refused even then.
    The output appears only when complete; on any error (or Ctrl-C, SIGTERM, SIGHUP) nothing is left
    behind, and an existing output is replaced only once the new one is complete.
    A sidecar file (tokenizer, template, ...) that is a link leading outside the checkpoint, or a
    FIFO, socket or device, is refused rather than skipped: the output would silently lack it.
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
    _check_output(src, dst, force)
    sidecars = _sidecars(src)

    with _stop_signals_interrupt():
        config = read_config(src)
        model = load_model(src, dtype=DTYPES[dtype], lazy=True, dequantize_fp8=True)
        if fp8_config(config) is not None:  # dequantized by the load: the output is a float checkpoint
            config = {k: v for k, v in config.items() if k != "quantization_config"}
        if quantize:
            if model.config.quantization:
                raise ConvertError(f"{src} is already quantized; convert from the float checkpoint")
            config = _quantize(model, config, q_bits, q_group_size, quantize_vision, quantize_router)

        tmp = None
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(dst, ".tmp")
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
            _write_marker(tmp)
            save_weights(tmp, model, progress=progress)
            _copy_sidecars(src, sidecars, tmp)
            save_config(_mlx_config(config, model), tmp / "config.json")
            (tmp / MARKER).unlink()
            _check_output(src, dst, force)  # again: the output may have changed meanwhile
            _move_into_place(tmp, dst)
        except BaseException as e:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise ConvertError(f"cannot write the output {dst}: {e.strerror or e}") from None
            raise
        _remove_stale(dst, ".old")
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
        try:
            mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        except RuntimeError as e:  # MLX gives no errno; a full disk is the usual cause
            if shutil.disk_usage(path).free < sum(v.nbytes for v in shard.values()):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
            raise OSError(f"{name}: {e}") from None
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


def _quantize(
    model: nn.Module, config: dict, bits: int, group_size: int, quantize_vision: bool, quantize_router: bool = False
) -> dict:
    """Quantize in place like mlx-vlm's convert; return the config with its quantization keys.

    The experts (``SwitchLinear``) are quantized like linears; MoE routers (``mlp.gate``, and the shared
    expert's gate ``mlp.shared_expert_gate``) stay float unless ``quantize_router``."""

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if path.startswith("vision_tower") and not (quantize_vision and isinstance(module, nn.Linear)):
            return False  # the ViT's position table (Qwen3-VL) is read directly, never quantized
        if path.endswith((".mlp.gate", ".mlp.shared_expert_gate")) and not quantize_router:
            return False
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
    if model.config.model_type in HYBRID:
        _hybrid_config(config, model.config, text)
    elif model.config.model_type in ("qwen3_vl", "qwen3_vl_moe"):
        tc = config.setdefault("text_config", {})
        text["head_dim"] = t.head_dim
        if model.config.model_type == "qwen3_vl_moe":
            _moe_text_config(tc, t)
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


def _hybrid_config(config: dict, c, text: dict) -> None:
    """Qwen3.5 / Qwen3.5-MoE keys as mlx-vlm's config reader needs them, from either dialect: the resolved tie
    in ``text_config`` (mlx-vlm reads it there, where a tied transformers-5 save says false), the layer pattern
    as ``full_attention_interval`` (mlx-vlm has no ``layer_types``; written only when the pattern is one),
    ``rope_parameters`` with every key it requires, and ``max_position_embeddings``."""
    t = c.text
    tc = config.setdefault("text_config", {})
    kinds, n = list(t.layer_types), t.num_hidden_layers
    interval = next(
        (
            i
            for i in range(1, n + 1)
            if kinds == ["linear_attention" if (j + 1) % i else "full_attention" for j in range(n)]
        ),
        None,
    )
    if interval is not None:
        tc.setdefault("full_attention_interval", interval)
    tc["layer_types"] = kinds
    rope = dict(tc.get("rope_parameters") or {})
    rope.update(
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        rope_theta=t.rope_theta,
        mrope_section=list(t.mrope_section),
        mrope_interleaved=True,
        partial_rotary_factor=t.partial_rotary_factor,
    )
    tc["rope_parameters"] = rope
    if c.model_type == "qwen3_5_moe":
        text.pop("intermediate_size")
        _moe_text_config(tc, t, f"{c.model_type}_text")
        tc["shared_expert_intermediate_size"] = t.shared_expert_intermediate_size
    tc.update(tie_word_embeddings=t.tie_word_embeddings, head_dim=t.head_dim)
    tc.setdefault("max_position_embeddings", 262144)
    tc.setdefault("model_type", f"{c.model_type}_text")
    for k, v in text.items():
        tc.setdefault(k, v)
    config["vision_config"].setdefault("deepstack_visual_indexes", [])
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        config.setdefault(k, getattr(c, k))


def _moe_text_config(tc: dict, t, model_type: str = "qwen3_vl_moe_text") -> None:
    """Qwen3-VL-MoE keys as mlx-vlm's config reader needs them, from either dialect.

    mlx-vlm requires ``num_experts`` (transformers 5 writes ``num_local_experts``) and every other field of its
    text config; it renormalises the top-k weights only with ``norm_topk_prob`` true, which transformers
    always does (it never reads the key), so that is written true; and it reads ``tie_word_embeddings``
    from ``text_config``, where transformers 5 leaves the class default (true) while the top level, which
    it obeys, says false: the resolved value is written there.
    """
    tc.update(
        num_experts=t.num_experts,
        num_experts_per_tok=t.num_experts_per_tok,
        moe_intermediate_size=t.moe_intermediate_size,
        decoder_sparse_step=t.decoder_sparse_step,
        mlp_only_layers=list(t.mlp_only_layers),
        norm_topk_prob=True,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    tc.setdefault("model_type", model_type)
    tc.setdefault("max_position_embeddings", 262144)  # the releases' value; mlx-vlm requires the key


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_output(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output that is, holds or replaces something it must not (see `convert`)."""
    if dst.name in ("", ".", ".."):
        raise ConvertError(f"--mlx-path {dst} does not name a folder; give the output folder by its name")
    real = os.path.realpath(dst)
    if real == os.path.realpath(src):
        raise ConvertError(f"the output {dst} is the source checkpoint; choose another --mlx-path")
    if inside(src, real) or inside(checkpoint_root(src), real):
        raise ConvertError(f"the output {dst} contains the source checkpoint {src}; choose another --mlx-path")
    above = dst.parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConvertError(f"the output {dst} cannot be created: {above} is not a folder; choose another --mlx-path")
    if not os.path.lexists(dst):
        return
    if dst.is_symlink():
        raise ConvertError(f"the output {dst} is a link to {real}; give --mlx-path {real} itself")
    if not dst.is_dir():
        raise ConvertError(f"the output {dst} is a file, not a folder; choose another --mlx-path")
    if not force:
        raise ConvertError(f"{dst} already exists; choose another --mlx-path or pass --force to replace it")
    problem = _not_an_output(dst)
    if problem:
        raise ConvertError(
            f"{dst} is not a previous mlx-compact conversion ({problem}); --force replaces only "
            "those: choose a new or empty --mlx-path"
        )
    linked = next((f for f in sorted(src.iterdir()) if inside(f, real)), None)
    if linked is not None:
        raise ConvertError(f"the source's {linked.name} is a link into the output {dst}; choose another --mlx-path")


def _written_by_conversion(name: str) -> bool:
    return bool(SHARD.fullmatch(name)) or any(fnmatch.fnmatchcase(name, p) for p in OUTPUT_PATTERNS)


def _foreign(folder: Path, marker: bool = False) -> str | None:
    """What in ``folder`` a conversion does not write ("it holds ..."), or None; ``marker``: allow `MARKER`."""
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if e.is_symlink():
            return f"it holds the link {e.name}"
        if e.is_dir():
            return f"it holds the folder {e.name}"
        if not e.is_file():
            return f"it holds the special file {e.name}"
        if not (_written_by_conversion(e.name) or (marker and e.name == MARKER)):
            return f"it holds {e.name}"
    return None


def _not_an_output(folder: Path) -> str | None:
    """Why ``folder`` is neither empty nor a previous conversion's output, or None."""
    names = set(os.listdir(folder))
    if not names:
        return None
    problem = _foreign(folder)
    if problem:
        return problem
    if "config.json" not in names:
        return "it has no config.json"
    sharded = "model.safetensors.index.json" in names and any(SHARD.fullmatch(n) for n in names)
    if "model.safetensors" not in names and not sharded:
        return "it has no model weights"
    return None


def _sidecars(src: Path) -> list[Path]:
    """The source's sidecar files to copy, each checked to be a regular file inside the checkpoint.

    Folders and dangling links are skipped (nothing is read from them); a link leading outside the
    checkpoint's root (for a hub snapshot, the repo's cache folder) or a FIFO, socket or device is a
    `ConvertError` naming it.
    """
    root = checkpoint_root(src)
    files = []
    for pattern in SIDECAR_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.name in NOT_COPIED or os.path.isdir(f):
                continue
            try:
                files.append(checked_file(f, root, "sidecar file"))
            except FileNotFoundError:
                continue
            except InputError as e:
                raise ConvertError(str(e)) from None
    return files


def _copy_sidecars(src: Path, files: list[Path], dst: Path) -> None:
    """Copy the checked sidecar ``files`` into ``dst``, read through `open_regular` (never blocking on a FIFO)."""
    root = checkpoint_root(src)
    for f in files:
        try:
            data = read_bytes(f, root, "sidecar file")
        except InputError as e:
            raise ConvertError(str(e)) from None
        except OSError as e:
            raise ConvertError(f"cannot read the sidecar file {f}: {e.strerror or e}") from None
        with open(dst / f.name, "xb") as out:
            out.write(data)


def _write_marker(folder: Path) -> None:
    (folder / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def _why_kept(folder: Path) -> str | None:
    """Why ``folder`` is not provably a dead conversion's leftover, or None."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    problem = _foreign(folder, marker=True)
    if problem:
        return f"{problem}, which a conversion does not write"
    try:
        marker = read_json(folder / MARKER, folder, MARKER, limit=4096)
    except FileNotFoundError:
        return f"it has no {MARKER} file naming its writer"
    except (InputError, OSError):
        return f"its {MARKER} file is unreadable"
    pid, host = marker.get("pid"), marker.get("host")
    if host != socket.gethostname():
        return f"it was written on the host {host!r}; remove it once no conversion runs there"
    if type(pid) is not int or pid <= 0:
        return f"its {MARKER} file names no process"
    if _alive(pid):
        return f"its writer, process {pid}, is still running"
    return None


def _remove_stale(dst: Path, suffix: str) -> None:
    """Remove the ``.{dst.name}.*{suffix}`` folders beside ``dst`` left by killed conversions; name the others."""
    for folder in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*{suffix}")):
        try:
            why = _why_kept(folder)
            if why is None:
                for name in os.listdir(folder):
                    os.unlink(folder / name)
                folder.rmdir()
                continue
        except OSError as e:
            why = f"checking or removing it failed ({e.strerror or e})"
        print(f"mlx-compact convert: leaving {folder} alone: {why}", file=sys.stderr)


@contextlib.contextmanager
def _stop_signals_interrupt():
    """Within, SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does (main thread only), so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # let the cleanup finish
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished temp dir to ``dst``, replacing an old ``dst`` only now (``force``)."""
    if not os.path.lexists(dst):
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
    with contextlib.suppress(OSError):
        _write_marker(old)  # if killed now, the next conversion removes it
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["convert", "ConvertError", "LoadError", "save_weights", "save_config"]
