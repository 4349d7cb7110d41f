"""One config for every Qwen-VL config.json dialect.

Dialects met in the wild (see the project's design notes):
- flat transformers 4.4x: LLM keys at the top level, ``rope_scaling: {type: mrope, mrope_section}``;
- transformers 4.57: nested ``text_config`` with ``rope_scaling``;
- transformers 5.x: ``rope_parameters`` (top level or in ``text_config``);
- Qwen3-VL: nested, ``mrope_interleaved: true``;
- Qwen3-VL-MoE: the expert count is ``num_experts`` in the releases (transformers 4.57) and
  ``num_local_experts`` in transformers-5 saves (which also move ``rope_theta`` into ``rope_parameters``);
- Qwen3.5 / Qwen3.5-MoE (the Gated DeltaNet hybrids): the releases give ``layer_types`` and
  ``full_attention_interval``, ``partial_rotary_factor`` at both levels and ``tie_word_embeddings`` at both;
  transformers-5 saves only ``layer_types``, the factor in ``rope_parameters``, and a tied model's
  ``text_config.tie_word_embeddings`` false under a top-level true (the top level is what transformers obeys).
mlx-vlm writes the Hugging Face config back with a ``quantization`` key added, so it is one of the above.
"""

import json
import math
from dataclasses import dataclass, field

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
QWEN3 = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # the Qwen3-VL vision tower, Qwen3 attention (q/k norms)
HYBRID = ("qwen3_5", "qwen3_5_moe")  # Gated DeltaNet hybrids: no DeepStack, gated attention, partial M-RoPE
MOE_TYPES = ("qwen3_vl_moe", "qwen3_5_moe")
LAYER_KINDS = ("linear_attention", "full_attention")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_tanh", "silu")  # vision.ACTIVATIONS' names
QUANT_MODES = {  # mode: (group sizes, bits) that mlx's quantize takes
    "affine": ((32, 64, 128), (1, 2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "mxfp8": ((32,), (8,)),
    "nvfp4": ((16,), (4,)),
}
QUANT_OVERRIDE_KEYS = ("group_size", "bits", "mode", "quantize_input")  # what to_quantized takes
# Whole-number fields (text and vision share names): generous for every real Qwen-VL (Qwen2.5-VL-72B: width
# 8192, 80 layers, MLP 29568, vocab 152064) and its successors, far below what would exhaust memory.
BOUNDS = {
    "hidden_size": (1, 65536),
    "embed_dim": (1, 65536),
    "out_hidden_size": (1, 65536),
    "intermediate_size": (1, 262144),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "num_heads": (1, 1024),
    "head_dim": (1, 1024),
    "vocab_size": (1, 2**22),
    "depth": (1, 256),
    "patch_size": (1, 64),
    "temporal_patch_size": (1, 16),
    "spatial_merge_size": (1, 8),
    "in_channels": (1, 16),
    "window_size": (0, 65536),
    "num_position_embeddings": (0, 65536),
    "num_experts": (1, 1024),  # Qwen3-VL-MoE releases: 128
    "moe_intermediate_size": (1, 262144),
    "decoder_sparse_step": (1, 1024),
    "shared_expert_intermediate_size": (1, 262144),
    "linear_num_key_heads": (1, 1024),
    "linear_num_value_heads": (1, 1024),
    "linear_key_head_dim": (1, 1024),
    "linear_value_head_dim": (1, 1024),
    "linear_conv_kernel_dim": (1, 64),
    "full_attention_interval": (1, 1024),
}


# The special token ids: field -> (config.json keys, first wins; Qwen's id, used when config.json is silent)
TOKEN_ID_KEYS = {
    "image_token_id": (("image_token_id", "image_token_index"), 151655),
    "video_token_id": (("video_token_id", "video_token_index"), 151656),
    "vision_start_token_id": (("vision_start_token_id",), 151652),
    "vision_end_token_id": (("vision_end_token_id",), 151653),
}
# Qwen3.5's ids (vocabulary 248320), used when its config.json is silent
HYBRID_TOKEN_IDS = {
    "image_token_id": 248056,
    "video_token_id": 248057,
    "vision_start_token_id": 248053,
    "vision_end_token_id": 248054,
}
HYBRID_EOS = 248046  # <|im_end|>


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
    # Qwen3-VL-MoE; a dense model has no experts
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    shared_expert_intermediate_size: int = 0  # Qwen3.5-MoE: the sigmoid-gated shared expert
    # Qwen3.5 (hybrid): per layer "linear_attention" (Gated DeltaNet) or "full_attention"; () = all attention
    layer_types: tuple = ()
    partial_rotary_factor: float = 1.0  # the share of head_dim that RoPE rotates
    attn_output_gate: bool = False  # q_proj gives per head [q | gate]; the output is scaled by sigmoid(gate)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear(self, layer: int) -> bool:
        """Whether LLM layer ``layer`` is a Gated DeltaNet (linear attention) layer."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    def sparse(self, layer: int) -> bool:
        """Whether LLM layer ``layer`` has the MoE MLP (transformers' rule: not in ``mlp_only_layers`` and
        ``(layer + 1) % decoder_sparse_step == 0``)."""
        step = self.decoder_sparse_step
        return self.num_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % step == 0

    @property
    def sparse_layers(self) -> int:
        return sum(self.sparse(i) for i in range(self.num_hidden_layers))


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
    image_token_id: int = TOKEN_ID_KEYS["image_token_id"][1]
    video_token_id: int = TOKEN_ID_KEYS["video_token_id"][1]
    vision_start_token_id: int = TOKEN_ID_KEYS["vision_start_token_id"][1]
    vision_end_token_id: int = TOKEN_ID_KEYS["vision_end_token_id"][1]
    eos_token_id: list = field(default_factory=lambda: [151645])
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Normalize a raw config.json dict (any dialect) into a ModelConfig, validating it completely.

        Every field the modules are sized by is checked for type (whole numbers are ints, not bools or
        floats), bounds (`BOUNDS`) and consistency (head counts, M-RoPE sections, block indexes, widths),
        as are the mlx quantization settings, so that building the model cannot crash or exhaust memory.
        Raises `ConfigError` with a one-line message naming the key and its value. A null ``head_dim``,
        ``num_key_value_heads``, ``mrope_section`` or ``eos_token_id`` counts as absent, as before.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"config.json holds {_kind(raw)}, not an object")
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a supported Qwen-VL model (expected one of {', '.join(MODEL_TYPES)})"
            )
        if "vision_config" not in raw:
            raise ConfigError("config.json has no vision_config: this is not a Qwen-VL checkpoint")
        tc = _object(raw, "text_config", "")
        text = _text_config(model_type, raw, tc)
        vc = _object(raw, "vision_config", "", required=True)
        vision = _vision_config(model_type, vc, raw, text.hidden_size)
        top = _Fields("", ("", raw), ("text_config.", tc))
        ids = (0, text.vocab_size - 1)
        eos_name, value = top.find(("eos_token_id",), HYBRID_EOS if model_type in HYBRID else 151645, nullable=True)
        eos = list(value) if isinstance(value, (list, tuple)) else [value]
        if eos_name and (not eos or any(type(e) is not int or not 0 <= e <= ids[1] for e in eos)):
            _bad(eos_name, value, f"a token id or a list of token ids from 0 to {ids[1]}")
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            **token_ids(raw, text.vocab_size),
            eos_token_id=eos,
            quantization=_quantization(raw),
        )


def token_ids(raw: dict, vocab_size: int | None = None) -> dict:
    """The special token ids of a raw config.json, as `ModelConfig` fields (`TOKEN_ID_KEYS`): each read at the top
    level, then in ``text_config``, under its name or an alias; Qwen's id when absent; checked to be a token id
    (below ``vocab_size`` when given). The one reading of them: the model (`ModelConfig.from_dict`) and the
    processor both use it, so the ids the processor writes are the ones the model looks for."""
    top = _Fields("", ("", raw), ("text_config.", _object(raw, "text_config", "")))
    bounds = (0, (vocab_size or BOUNDS["vocab_size"][1]) - 1)
    defaults = HYBRID_TOKEN_IDS if raw.get("model_type") in HYBRID else {}
    return {
        name: top.whole(*keys, default=defaults.get(name, default), bounds=bounds)
        for name, (keys, default) in TOKEN_ID_KEYS.items()
    }


_REQUIRED = object()


def _show(value) -> str:
    """A value as config.json spells it, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _bad(name: str, value, expected: str):
    raise ConfigError(f"config.json: {name} is {_show(value)}; expected {expected}")


def _whole(name: str, value, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        _bad(name, value, f"a whole number from {lo} to {hi}")
    return value


def _object(src: dict, key: str, prefix: str, required: bool = False) -> dict:
    """``src[key]`` if it is a dict, {} if it is absent or null (and not required)."""
    value = src.get(key)
    if isinstance(value, dict):
        return value
    if value is None and not required:
        return {}
    _bad(prefix + key, value, "an object")


class _Fields:
    """Typed reads of keys from dicts searched in order (first hit wins); errors name the key's path."""

    def __init__(self, what: str, *scopes):
        self.what, self.scopes = what, scopes  # scopes: (path prefix, dict) pairs

    def find(self, keys, default=_REQUIRED, nullable=False):
        """(path, value) of the first of ``keys`` present, or (None, default)."""
        for key in keys:
            for prefix, src in self.scopes:
                if key in src and not (nullable and src[key] is None):
                    return prefix + key, src[key]
        if default is _REQUIRED:
            raise ConfigError(f"config.json lacks the {self.what} key {keys[0]!r}")
        return None, default

    def whole(self, *keys, default=_REQUIRED, bounds=None, nullable=False) -> int:
        name, value = self.find(keys, default, nullable)
        return _whole(name, value, *(bounds or BOUNDS[keys[0]])) if name else value

    def positive(self, key, default) -> float:
        name, value = self.find((key,), default)
        if name and (type(value) not in (int, float) or not 0 < value < math.inf):
            _bad(name, value, "a positive number")
        return value

    def flag(self, key, default) -> bool:
        name, value = self.find((key,), default)
        if name and type(value) is not bool:
            _bad(name, value, "true or false")
        return value

    def choice(self, key, default, choices, note=""):
        name, value = self.find((key,), default)
        if name and (type(value) is not type(choices[0]) or value not in choices):
            _bad(name, value, f"one of {', '.join(map(str, choices))}{note}")
        return value

    def indexes(self, key, n: int, nullable: bool = False) -> tuple:
        """Distinct block indexes in [0, n)."""
        name, value = self.find((key,), (), nullable)
        if name and (
            not isinstance(value, list)
            or any(type(i) is not int or not 0 <= i < n for i in value)
            or len(set(value)) != len(value)
        ):
            _bad(name, value, f"a list of distinct block indexes from 0 to {n - 1}")
        return tuple(value)


def _rope_scopes(raw: dict, tc: dict) -> list:
    """The RoPE dicts, the one that wins first (later dialects override earlier ones)."""
    scopes = []
    for prefix, src in (("text_config.", tc), ("", raw)):
        for key in ("rope_parameters", "rope_scaling"):
            scopes.append((f"{prefix}{key}.", _object(src, key, prefix)))
    return scopes


def _text_config(model_type: str, raw: dict, tc: dict) -> TextConfig:
    qwen3, hybrid = model_type in QWEN3, model_type in HYBRID
    f = _Fields("language-model", ("text_config.", tc), ("", raw))
    rope = _Fields("RoPE", *_rope_scopes(raw, tc))
    hidden, heads = f.whole("hidden_size"), f.whole("num_attention_heads")
    kv_heads = f.whole("num_key_value_heads", default=heads, nullable=True)
    head_dim = f.whole("head_dim", default=None, nullable=True)
    if head_dim is None:
        if hidden % heads:
            _bad("num_attention_heads", heads, f"a divisor of hidden_size {hidden} (there is no head_dim)")
        head_dim = hidden // heads
    if heads % kv_heads:
        _bad("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads {heads}")
    factor = 1.0
    if hybrid:  # rope_parameters (transformers 5), else text_config / the top level (the releases)
        name, factor = _Fields("RoPE", *rope.scopes, *f.scopes).find(("partial_rotary_factor",), 0.25)
        rotary = int(head_dim * factor) if type(factor) in (int, float) and 0 < factor <= 1 else 0
        if name and (rotary < 2 or rotary % 2):
            _bad(name, factor, f"a number in (0, 1] that makes an even rotary size of head_dim {head_dim}")
    rotary = int(head_dim * factor)
    default_section = (11, 11, 10) if hybrid else (24, 20, 20) if qwen3 else (16, 24, 24)
    name, section = rope.find(("mrope_section",), default_section, nullable=True)
    if (
        not isinstance(section, (list, tuple))
        or len(section) != 3
        or any(type(s) is not int or s < 0 for s in section)
        or 2 * sum(section) != rotary
    ):
        what = "head_dim / 2" if rotary == head_dim else "the rotary size / 2"
        _bad(
            name or "mrope_section (absent: the default)",
            section,
            f"3 whole numbers that sum to {what} = {rotary / 2:g}",
        )
    layers = f.whole("num_hidden_layers")
    moe = model_type in MOE_TYPES
    return TextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=f.whole("intermediate_size", default=0 if model_type == "qwen3_5_moe" else _REQUIRED),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=f.whole("vocab_size"),
        rms_norm_eps=f.positive("rms_norm_eps", 1e-6),
        rope_theta=_Fields("RoPE", *rope.scopes, *f.scopes).positive(
            "rope_theta", 1e7 if hybrid else 5e6 if qwen3 else 1e6
        ),
        mrope_section=tuple(section),
        mrope_interleaved=rope.flag("mrope_interleaved", qwen3),
        attention_bias=f.flag("attention_bias", not qwen3),
        qk_norm=qwen3,
        tie_word_embeddings=_Fields("", ("", raw), ("text_config.", tc)).flag("tie_word_embeddings", False),
        **(_moe_fields(f, layers, shared=model_type == "qwen3_5_moe") if moe else {}),
        **(_hybrid_fields(f, layers, factor) if hybrid else {}),
    )


def _hybrid_fields(f: _Fields, layers: int, factor: float) -> dict:
    """Qwen3.5's layer pattern (``layer_types``, else every ``full_attention_interval``-th layer attention) and
    its Gated DeltaNet sizes."""
    name, kinds = f.find(("layer_types",), None, nullable=True)
    if name is None:
        interval = f.whole("full_attention_interval", default=4)
        kinds = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    elif not (isinstance(kinds, list) and len(kinds) == layers and all(k in LAYER_KINDS for k in kinds)):
        _bad(name, kinds, f"a list of {layers} layer kinds, each {' or '.join(map(repr, LAYER_KINDS))}")
    if "full_attention" not in kinds:
        _bad(name or "full_attention_interval", kinds, "a pattern with at least one full_attention layer")
    hk, hv = f.whole("linear_num_key_heads", default=16), f.whole("linear_num_value_heads", default=32)
    if hv % hk:
        _bad("linear_num_value_heads", hv, f"a multiple of linear_num_key_heads {hk}")
    return dict(
        layer_types=tuple(kinds),
        partial_rotary_factor=float(factor),
        attn_output_gate=True,  # transformers gates every Qwen3.5 attention (it never reads attn_output_gate)
        linear_num_key_heads=hk,
        linear_num_value_heads=hv,
        linear_key_head_dim=f.whole("linear_key_head_dim", default=128),
        linear_value_head_dim=f.whole("linear_value_head_dim", default=128),
        linear_conv_kernel_dim=f.whole("linear_conv_kernel_dim", default=4),
    )


def _moe_fields(f: _Fields, layers: int, shared: bool = False) -> dict:
    """The expert settings (Qwen3-VL-MoE; Qwen3.5-MoE adds the shared expert). ``norm_topk_prob`` is not read:
    transformers always renormalises."""
    found = [f.find((key,), None) for key in ("num_experts", "num_local_experts")]
    (name, experts), (other, value) = found if found[0][0] else found[::-1]
    if name is None:
        raise ConfigError("config.json lacks the language-model key 'num_experts' (or 'num_local_experts')")
    _whole(name, experts, *BOUNDS["num_experts"])
    if other is not None and value != experts:
        _bad(other, value, f"the same as {name} = {_show(experts)}")
    return dict(
        num_experts=experts,
        num_experts_per_tok=f.whole("num_experts_per_tok", bounds=(1, experts)),
        moe_intermediate_size=f.whole("moe_intermediate_size"),
        decoder_sparse_step=f.whole("decoder_sparse_step", default=1),
        mlp_only_layers=f.indexes("mlp_only_layers", layers, nullable=True),
        **({"shared_expert_intermediate_size": f.whole("shared_expert_intermediate_size")} if shared else {}),
    )


def _vision_config(model_type: str, vc: dict, raw: dict, llm_width: int) -> VisionConfig:
    v = _Fields("vision_config", ("vision_config.", vc))
    if model_type == "qwen2_vl":
        # Trap: embed_dim is the ViT width, hidden_size the LLM width.
        width, out_key = v.whole("embed_dim"), "hidden_size"
        ratio = v.positive("mlp_ratio", 4)
        intermediate, (lo, hi) = int(width * ratio), BOUNDS["intermediate_size"]
        if not lo <= intermediate <= hi:
            _bad("vision_config.mlp_ratio", ratio, f"a ratio that makes embed_dim * mlp_ratio from {lo} to {hi}")
        act = v.choice("hidden_act", "quick_gelu", ACTIVATIONS)
    else:
        width, out_key = v.whole("hidden_size"), "out_hidden_size"
        intermediate = v.whole("intermediate_size")
        act = v.choice("hidden_act", "silu" if model_type == "qwen2_5_vl" else "gelu_pytorch_tanh", ACTIVATIONS)
    out_width = v.whole(out_key, default=llm_width, bounds=BOUNDS["out_hidden_size"])
    if out_width != llm_width:
        _bad(f"vision_config.{out_key}", out_width, f"the language model's hidden_size {llm_width}")
    depth, heads = v.whole("depth"), v.whole("num_heads")
    if width % heads or (width // heads) % 4:
        _bad(
            "vision_config.num_heads",
            heads,
            f"a divisor of the vision width {width} into heads whose size is a multiple of 4",
        )
    patch = v.whole("patch_size", "spatial_patch_size", default=16 if model_type in QWEN3 else 14)
    merge = v.whole("spatial_merge_size", default=2)
    window = v.whole("window_size", default=112 if model_type == "qwen2_5_vl" else 0)  # transformers' default
    if model_type == "qwen2_5_vl" and window < patch * merge:
        _bad("vision_config.window_size", window, f"at least patch_size * spatial_merge_size = {patch * merge}")
    positions = v.whole("num_position_embeddings", default=0)
    if model_type in QWEN3 and positions < 1:
        _bad("vision_config.num_position_embeddings", positions, "at least 1 for Qwen3-VL (its position table)")
    vision_rope = _object(vc, "rope_parameters", "vision_config.")
    rope = _Fields("vision RoPE", ("vision_config.rope_parameters.", vision_rope), ("vision_config.", vc))
    return VisionConfig(
        depth=depth,
        hidden_size=width,
        num_heads=heads,
        intermediate_size=intermediate,
        out_hidden_size=out_width,
        patch_size=patch,
        temporal_patch_size=v.whole("temporal_patch_size", default=2),
        spatial_merge_size=merge,
        in_channels=v.whole("in_channels", "in_chans", default=3),
        hidden_act=act,
        rope_theta=rope.positive("rope_theta", 10000.0),
        window_size=window,
        fullatt_block_indexes=v.indexes("fullatt_block_indexes", depth),
        num_position_embeddings=positions,
        deepstack_visual_indexes=_deepstack(model_type, v, depth),
        tokens_per_second=_Fields("", ("vision_config.", vc), ("", raw)).positive("tokens_per_second", 2.0),
    )


def _deepstack(model_type: str, v: _Fields, depth: int) -> tuple:
    indexes = v.indexes("deepstack_visual_indexes", depth, nullable=model_type in HYBRID)
    if indexes and model_type in HYBRID:
        _bad("vision_config.deepstack_visual_indexes", list(indexes), f"[] ({model_type} has no DeepStack)")
    return indexes


def _quantization(raw: dict) -> dict | None:
    """The quantization settings as given, the mlx kind (not ``quant_method`` ones: the loader's) validated."""
    q, qc = raw.get("quantization"), raw.get("quantization_config")
    if q is not None:
        _check_quantization("quantization", q)
    if qc is not None:
        _object(raw, "quantization_config", "")
        if "quant_method" not in qc and ("bits" in qc or "group_size" in qc):
            _check_quantization("quantization_config", qc)
    return q or qc


def _check_quantization(name: str, q, override: bool = False) -> None:
    """bits / group_size / mode as mlx's quantize takes them; per-module override dicts likewise."""
    if not isinstance(q, dict):
        _bad(name, q, "an object")
    if override and set(q) - set(QUANT_OVERRIDE_KEYS):
        _bad(name, q, f"an object of {', '.join(QUANT_OVERRIDE_KEYS)}")
    f = _Fields(name, (name + ".", q))
    mode = f.choice("mode", "affine", tuple(QUANT_MODES))
    sizes, bits = QUANT_MODES[mode]
    default = None if override else _REQUIRED  # overrides default to the mode's own values, as to_quantized does
    f.choice("group_size", default, sizes, f" for mode {mode}")
    f.choice("bits", default, bits, f" for mode {mode}")
    if override:
        f.flag("quantize_input", False)
        return
    for key, value in q.items():
        if isinstance(value, dict):
            _check_quantization(f"{name}.{key}", value, override=True)
