"""One config for every Qwen-VL config.json dialect.

Dialects met in the wild (see the project's design notes):
- flat transformers 4.4x: LLM keys at the top level, ``rope_scaling: {type: mrope, mrope_section}``;
- transformers 4.57: nested ``text_config`` with ``rope_scaling``;
- transformers 5.x: ``rope_parameters`` (top level or in ``text_config``);
- Qwen3-VL: nested, ``mrope_interleaved: true``.
mlx-vlm writes the Hugging Face config back with a ``quantization`` key added, so it is one of the above.
"""

from dataclasses import dataclass, field
from typing import Optional

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class ConfigError(ValueError):
    """The config.json is not one of a supported Qwen-VL model."""


@dataclass
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple = (16, 24, 24)
    mrope_interleaved: bool = False
    attention_bias: bool = True
    qk_norm: bool = False
    tie_word_embeddings: bool = False


@dataclass
class VisionConfig:
    depth: int
    hidden_size: int  # ViT width
    num_heads: int
    intermediate_size: int
    out_hidden_size: int  # LLM width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    window_size: int = 0
    fullatt_block_indexes: tuple = ()
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple = ()
    tokens_per_second: float = 2.0


@dataclass
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: list = field(default_factory=lambda: [151645])
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Normalize a raw config.json dict (any dialect) into a ModelConfig."""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a supported Qwen-VL model "
                f"(expected one of {', '.join(MODEL_TYPES)})"
            )
        if "vision_config" not in raw:
            raise ConfigError("config.json has no vision_config: this is not a Qwen-VL checkpoint")
        text = _text_config(model_type, raw)
        vision = _vision_config(model_type, raw["vision_config"], raw, text.hidden_size)
        tc = raw.get("text_config") or {}

        def tok(name, default):
            return raw.get(name, tc.get(name, default))

        eos = tok("eos_token_id", 151645)
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            image_token_id=tok("image_token_id", tok("image_token_index", 151655)),
            video_token_id=tok("video_token_id", tok("video_token_index", 151656)),
            vision_start_token_id=tok("vision_start_token_id", 151652),
            vision_end_token_id=tok("vision_end_token_id", 151653),
            eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else [eos],
            quantization=raw.get("quantization") or raw.get("quantization_config"),
        )


def _rope(raw: dict, tc: dict) -> dict:
    rope = {}
    for src in (raw, tc):
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(src.get(key), dict):
                rope.update(src[key])
    return rope


def _text_config(model_type: str, raw: dict) -> TextConfig:
    tc = raw.get("text_config") or {}
    merged = {**raw, **tc}
    rope = _rope(raw, tc)
    qwen3 = model_type == "qwen3_vl"
    try:
        hidden, heads = merged["hidden_size"], merged["num_attention_heads"]
        section = rope.get("mrope_section") or ((24, 20, 20) if qwen3 else (16, 24, 24))
        return TextConfig(
            hidden_size=hidden,
            num_hidden_layers=merged["num_hidden_layers"],
            intermediate_size=merged["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=merged.get("num_key_value_heads") or heads,
            head_dim=merged.get("head_dim") or hidden // heads,
            vocab_size=merged["vocab_size"],
            rms_norm_eps=merged.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", merged.get("rope_theta", 5e6 if qwen3 else 1e6)),
            mrope_section=tuple(section),
            mrope_interleaved=bool(rope.get("mrope_interleaved", qwen3)),
            attention_bias=merged.get("attention_bias", not qwen3),
            qk_norm=qwen3,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks the language-model key {e.args[0]!r}") from None


def _vision_config(model_type: str, vc: dict, raw: dict, llm_width: int) -> VisionConfig:
    try:
        if model_type == "qwen2_vl":
            # Trap: embed_dim is the ViT width, hidden_size the LLM width.
            width = vc["embed_dim"]
            common = dict(
                hidden_size=width,
                intermediate_size=int(width * vc.get("mlp_ratio", 4)),
                out_hidden_size=vc.get("hidden_size", llm_width),
                hidden_act=vc.get("hidden_act", "quick_gelu"),
            )
        else:
            common = dict(
                hidden_size=vc["hidden_size"],
                intermediate_size=vc["intermediate_size"],
                out_hidden_size=vc.get("out_hidden_size", llm_width),
                hidden_act=vc.get("hidden_act", "silu" if model_type == "qwen2_5_vl" else "gelu_pytorch_tanh"),
            )
        rope = vc.get("rope_parameters") or {}
        return VisionConfig(
            depth=vc["depth"],
            num_heads=vc["num_heads"],
            patch_size=vc.get("patch_size", vc.get("spatial_patch_size", 16 if model_type == "qwen3_vl" else 14)),
            temporal_patch_size=vc.get("temporal_patch_size", 2),
            spatial_merge_size=vc.get("spatial_merge_size", 2),
            in_channels=vc.get("in_channels", vc.get("in_chans", 3)),
            rope_theta=rope.get("rope_theta", vc.get("rope_theta", 10000.0)),
            window_size=vc.get("window_size", 0),
            fullatt_block_indexes=tuple(vc.get("fullatt_block_indexes", ())),
            num_position_embeddings=vc.get("num_position_embeddings", 0),
            deepstack_visual_indexes=tuple(vc.get("deepstack_visual_indexes", ())),
            tokens_per_second=vc.get("tokens_per_second", raw.get("tokens_per_second", 2.0)),
            **common,
        )
    except KeyError as e:
        raise ConfigError(f"vision_config lacks the key {e.args[0]!r}") from None
