"""Shared helpers for the benchmarks: real-width configs at reduced depth, random weights,
timing, BLAS/device reporting, JSON results.

Import this module before ``mlx.core`` anywhere else: it imports ``mlx_compact`` first, which
preloads OpenBLAS for MLX's CPU backend on Linux.
"""

import copy
import json
import platform
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

import mlx_compact  # noqa: F401  (before mlx.core: loads OpenBLAS on Linux)
from mlx_compact import _blas

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20

# ----- configs (Hugging Face config.json format) --------------------------------------------


def qwen2_5_vl_3b_config(llm_layers: int = 4, vit_layers: int = 4) -> dict:
    """Qwen2.5-VL-3B widths (flat transformers 4.4x dialect) at reduced depth.

    Full-attention ViT blocks keep the checkpoint's 1-in-4 pattern ([7, 15, 23, 31] of 32): every
    block i with (i + 1) % 4 == 0, and at least the last block.
    """
    full = [i for i in range(vit_layers) if (i + 1) % 4 == 0] or [vit_layers - 1]
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "num_hidden_layers": llm_layers,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 128000,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "eos_token_id": 151645,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": vit_layers,
            "hidden_act": "silu",
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "in_chans": 3,
            "in_channels": 3,
            "out_hidden_size": 2048,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": full,
            "tokens_per_second": 2,
        },
    }


def qwen3_vl_2b_config(llm_layers: int = 4, vit_layers: int = 4) -> dict:
    """Qwen3-VL-2B widths (nested transformers 4.57 dialect) at reduced depth.

    DeepStack taps: the checkpoint has [5, 11, 17] of 24 ViT blocks feeding LLM layers 0-2; here up
    to min(3, llm_layers) taps spread over the reduced ViT depth.
    """
    n_taps = max(1, min(3, llm_layers, vit_layers))
    taps = sorted({(k + 1) * vit_layers // (n_taps + 1) for k in range(n_taps)})
    taps = [min(t, vit_layers - 1) for t in taps]
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "num_hidden_layers": llm_layers,
            "vocab_size": 151936,
            "rms_norm_eps": 1e-6,
            "rope_theta": 5000000,
            "max_position_embeddings": 262144,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "tie_word_embeddings": True,
            "attention_bias": False,
            "hidden_act": "silu",
            "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": vit_layers,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "in_channels": 3,
            "out_hidden_size": 2048,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": taps,
        },
    }


def qwen3_vl_moe_30b_a3b_config(llm_layers: int = 4, vit_layers: int = 4) -> dict:
    """Qwen3-VL-30B-A3B widths in its release dialect (transformers 4.57: ``num_experts``, ``rope_theta`` and
    ``rope_scaling`` in text_config, vision model_type "qwen3_vl_moe", which mlx-vlm reads) at reduced depth.

    LLM: hidden 2048, 32 query / 4 KV heads of 128, every layer sparse: 128 experts of width 768, top 8, no
    shared expert; untied lm_head. Vision: 1152 wide, 16 heads, MLP 4304 -> 2048; the release's DeepStack
    taps [8, 16, 24] of 27 blocks spread over the reduced depth as for Qwen3-VL-2B.
    """
    cfg = qwen3_vl_2b_config(llm_layers, vit_layers)
    text, vision = cfg["text_config"], cfg["vision_config"]
    cfg.update(
        model_type="qwen3_vl_moe",
        architectures=["Qwen3VLMoeForConditionalGeneration"],
        tie_word_embeddings=False,
        transformers_version="4.57.0.dev0",
    )
    text.update(
        model_type="qwen3_vl_moe_text",
        num_attention_heads=32,
        num_key_value_heads=4,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )
    vision.update(model_type="qwen3_vl_moe", hidden_size=1152, intermediate_size=4304)
    return cfg


HYBRID_VOCAB = 248320  # Qwen3.5 / 3.6 releases


def hybrid_id(token_id: int, vocab_size: int = HYBRID_VOCAB) -> int:
    """A Qwen3.5 special token id (``<|endoftext|>`` 248044 .. ``<|video_pad|>`` 248057) in a vocabulary of
    ``vocab_size`` rows: the same distance from its end."""
    return token_id - (HYBRID_VOCAB - vocab_size)


def qwen3_6_27b_config(llm_layers: int = 4, vit_layers: int = 4, vocab_size: int = HYBRID_VOCAB) -> dict:
    """Qwen3.6-27B widths (the Qwen3.5-27B release dialect, transformers 4.57: ``layer_types`` and
    ``full_attention_interval``, ``rope_parameters`` with the rotary factor in text_config) at reduced depth.

    LLM: hidden 5120, MLP 17408, layers in the release's 3:1 pattern (``llm_layers`` of them: three Gated DeltaNet
    then one gated attention), attention 24 query / 4 KV heads of 256 with the output gate and rotary 0.25,
    Gated DeltaNet 16 key / 48 value heads of 128, conv kernel 4; untied lm_head. Vision: the Qwen3-VL tower
    1152 wide, 16 heads, MLP 4304 -> 5120, no DeepStack. ``vocab_size``: the release's 248320, or fewer rows
    where the embedding and lm_head would not fit (say so where it is used); the special token ids (248044 ..
    248057 in the release) then keep their places at the top of the smaller vocabulary (`hybrid_id`)."""
    types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(llm_layers)]
    return {
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "image_token_id": hybrid_id(248056, vocab_size),
        "video_token_id": hybrid_id(248057, vocab_size),
        "vision_start_token_id": hybrid_id(248053, vocab_size),
        "vision_end_token_id": hybrid_id(248054, vocab_size),
        "tie_word_embeddings": False,
        "transformers_version": "4.57.1",
        "text_config": {
            "model_type": "qwen3_5_text",
            "hidden_size": 5120,
            "intermediate_size": 17408,
            "num_hidden_layers": llm_layers,
            "layer_types": types,
            "full_attention_interval": 4,
            "num_attention_heads": 24,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "attn_output_gate": True,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 48,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 262144,
            "partial_rotary_factor": 0.25,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.25,
            },
            "mamba_ssm_dtype": "float32",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "hidden_act": "silu",
            "eos_token_id": hybrid_id(248044, vocab_size),
        },
        "vision_config": {
            "model_type": "qwen3_5",
            "depth": vit_layers,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "in_channels": 3,
            "out_hidden_size": 5120,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [],
        },
    }


def qwen3_6_35b_a3b_config(
    llm_layers: int = 4, vit_layers: int = 4, vocab_size: int = HYBRID_VOCAB, experts: int = 256
) -> dict:
    """Qwen3.6-35B-A3B widths (the Qwen3.5-35B-A3B release dialect) at reduced depth, 3:1 as in the release.

    LLM: hidden 2048, every MLP a mixture of ``experts`` (the release: 256; fewer where they would not fit) of
    width 512, top 8, plus a sigmoid-gated shared expert of 512; attention 16 query / 2 KV heads of 256, gated,
    rotary 0.25; Gated DeltaNet 16 key / 32 value heads of 128; untied lm_head. Vision: 1152 wide -> 2048."""
    cfg = qwen3_6_27b_config(llm_layers, vit_layers, vocab_size)
    text = cfg["text_config"]
    cfg.update(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"])
    cfg["transformers_version"] = "4.57.0.dev0"
    del text["intermediate_size"]
    text.update(
        model_type="qwen3_5_moe_text",
        hidden_size=2048,
        num_attention_heads=16,
        num_key_value_heads=2,
        linear_num_value_heads=32,
        num_experts=experts,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    )
    cfg["vision_config"].update(model_type="qwen3_5_moe", out_hidden_size=2048)
    return cfg


CONFIGS = {
    "qwen2_5_vl": qwen2_5_vl_3b_config,
    "qwen3_vl": qwen3_vl_2b_config,
    "qwen3_vl_moe": qwen3_vl_moe_30b_a3b_config,
    "qwen3_5": qwen3_6_27b_config,
    "qwen3_5_moe": qwen3_6_35b_a3b_config,
}
NAMES = {
    "qwen2_5_vl": "Qwen2.5-VL-3B",
    "qwen3_vl": "Qwen3-VL-2B",
    "qwen3_vl_moe": "Qwen3-VL-30B-A3B",
    "qwen3_5": "Qwen3.6-27B",
    "qwen3_5_moe": "Qwen3.6-35B-A3B",
}

# ----- models and weights -------------------------------------------------------------------


def build_ours(config: dict):
    from mlx_compact.models import build_model

    return build_model(copy.deepcopy(config))


def build_mlx_vlm(config: dict):
    """mlx-vlm's Model built the way ``mlx_vlm.utils.load_model`` builds it (no weights)."""
    import importlib

    from mlx_vlm.utils import update_module_configs

    cfg = copy.deepcopy(config)
    module = importlib.import_module(f"mlx_vlm.models.{cfg['model_type']}")
    cfg.setdefault("text_config", cfg.pop("llm_config", {}))
    cfg.setdefault("vision_config", {})
    cfg.setdefault("audio_config", {})
    model_config = module.ModelConfig.from_dict(cfg)
    model_config = update_module_configs(
        model_config, module, cfg, ["text", "vision", "perceiver", "projector", "audio"]
    )
    return module.Model(model_config)


def _init_std(name: str, shape) -> float:
    """Standard deviation for a random parameter (None: ones, for norm scales)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return 0.02
    if any(n in name for n in ("norm", "ln_q")) and len(shape) == 1:
        return None
    if "embed_tokens" in name or "pos_embed" in name:
        return 0.02
    if ".switch_mlp." in name:  # stacked experts [E, out, in]: each expert's own fan-in
        return shape[-1] ** -0.5
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return fan_in**-0.5


_POOL_SIZE = 1_000_003  # prime, so tiled rows of any width differ


def random_weights(model, seed: int = 0, dtype=mx.float32) -> dict:
    """Random float weights for every parameter of ``model`` (names and shapes from it).

    Drawing ~700M normals costs minutes on a busy 2-core VM, so each tensor is a fresh copy of a
    prime-length pool of standard normals, tiled from a random offset and scaled (norm scales:
    1 + 0.05 * noise). Every tensor is its own materialized buffer, so memory traffic is real.
    """
    return dict(iter_random_weights(model, seed, dtype))


def iter_random_weights(model, seed: int = 0, dtype=mx.float32):
    """`random_weights` one (name, array) at a time, in the same order with the same values, so a caller can
    write them out without holding them all."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(2 * _POOL_SIZE, dtype=np.float32)
    for name, p in tree_flatten(model.parameters()):
        std = _init_std(name, p.shape)
        n = int(np.prod(p.shape))
        off = int(rng.integers(0, _POOL_SIZE))
        w = np.resize(pool[off : off + _POOL_SIZE], n).reshape(p.shape)
        w = (1.0 + 0.05 * w) if std is None else (std * w)
        out = mx.array(w.astype(np.float32, copy=False)).astype(dtype)
        mx.eval(out)
        yield name, out


def load_same_weights(models, weights: dict):
    """Load one weight dict (shared arrays) into every model, strictly; check names match."""
    names = set(weights)
    for m in models:
        own = {k for k, _ in tree_flatten(m.parameters())}
        if own != names:
            raise RuntimeError(
                f"{type(m).__module__}: parameter names differ: missing {sorted(names - own)[:5]}, "
                f"extra {sorted(own - names)[:5]}"
            )
        m.load_weights(list(weights.items()), strict=True)
        m.eval()


def param_bytes(weights: dict, prefix: str = "") -> int:
    return sum(v.nbytes for k, v in weights.items() if k.startswith(prefix))


# ----- timing and memory --------------------------------------------------------------------


def timed(fn):
    """Run ``fn`` (which must evaluate its own results); return (seconds, result)."""
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


class Peak:
    """Peak MLX memory above the memory active at entry (``mx.reset_peak_memory`` first)."""

    def __enter__(self):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        self.base = mx.get_active_memory()
        return self

    def __exit__(self, *exc):
        mx.synchronize()
        self.peak = mx.get_peak_memory()
        self.delta = self.peak - self.base
        return False


# ----- environment and results --------------------------------------------------------------


def environment() -> dict:
    import mlx_vlm

    return {
        "blas": _blas.BLAS,
        "mlx": mx.__version__,
        "mlx_vlm": getattr(mlx_vlm, "__version__", "?"),
        "device": str(mx.default_device()),
        "device_info": {k: str(v) for k, v in mx.device_info().items()} if hasattr(mx, "device_info") else {},
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": __import__("os").cpu_count(),
    }


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
