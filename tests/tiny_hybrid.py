"""Builders of tiny random Qwen3.5 / Qwen3.5-MoE checkpoints (the Gated DeltaNet hybrids), made offline for tests
with transformers + torch on the CPU, in the style of `tiny_checkpoints` (same tokenizer, chat template and
processor files; the special tokens at small ids).

Sizes are odd on purpose: 4 LLM layers ``[linear, full, linear, full]`` (``full_attention_interval`` 2, so the
first attention layer is layer 1), width 96, 4 query heads / 2 KV heads of 64 with rotary 0.25 (16 dims, M-RoPE
sections [3, 3, 2]), Gated DeltaNet with 2 key heads of 24 and 4 value heads of 16 (Hk != Hv, dk != dv); MoE:
6 experts top 2 of 40, a shared expert of 56.

Conditioning (random hybrids amplify float32 rounding): embeddings at 0.5, the branch outputs (``o_proj``,
``out_proj``, ``down_proj``) at 0.04, every other parameter moved off its init (``A_log``, ``dt_bias``, conv
and norm weights included), the final norm flipped (effective weight ~ -1: a tied random head otherwise echoes
the last token), routers redrawn until no top-k near-tie on the test prompts (see `router_gap`).

Layouts: "default" (what transformers 5 saves: per-expert MoE keys), "release" (the Qwen release: fused experts
[E, 2I, H] / [E, H, I] without ``.weight``, and ``mtp.*`` tensors). Dialects: "default" (transformers 5:
``layer_types`` only, the rotary factor in ``rope_parameters``), "release" (``layer_types`` and
``full_attention_interval``, the factor at both levels, ``attn_output_gate``, ``mtp_*``, vision model_type
"qwen3_5", ``deepstack_visual_indexes: []``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tiny_checkpoints import (
    CHAT_TEMPLATE,
    TOKEN_IDS,
    VOCAB_SIZE,
    _preprocessor_config,
    _video_preprocessor_config,
    _write_json,
    make_tokenizer,
)

DENSE, MOE = "qwen3_5", "qwen3_5_moe"
HYBRIDS = (DENSE, MOE)
LAYOUTS = ("default", "release")
DIALECTS = ("default", "release")
HIDDEN = 96
EXPERTS, TOP_K, MOE_I, SHARED_I = 6, 2, 40, 56
ROUTER_SEED = 2


def _text_config(arch: str) -> dict:
    cfg = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=24,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"] * 2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
            "partial_rotary_factor": 0.25,
        },
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=TOKEN_IDS["<|im_end|>"],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
    )
    if arch == MOE:
        cfg.pop("intermediate_size")
        cfg.update(
            num_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=MOE_I,
            shared_expert_intermediate_size=SHARED_I,
        )
    return cfg


def _vision_config() -> dict:
    return dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=16,
        hidden_act="gelu_pytorch_tanh",
    )


def classes(arch: str):
    import transformers as tf

    return {
        DENSE: (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
        MOE: (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration),
    }[arch]


def make_config(arch: str, tie_word_embeddings: bool = False):
    config_cls, _ = classes(arch)
    return config_cls(
        text_config=_text_config(arch),
        vision_config=_vision_config(),
        image_token_id=TOKEN_IDS["<|image_pad|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


BRANCH_OUTPUTS = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded values for every parameter, conditioned as the module says."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("A_log"):
                p.copy_(torch.log(0.5 + 3.5 * torch.rand(p.shape, generator=gen)))  # A in (0.5, 4)
            elif name.endswith("dt_bias"):
                p.copy_(0.5 + 0.3 * noise)
            elif "conv1d" in name:
                p.copy_(noise * p.shape[-1] ** -0.5)
            elif p.ndim >= 2:
                fan_in = p.shape[-1] if ".experts." in name else math.prod(p.shape[1:])
                if "embed_tokens" in name:
                    scale = 0.5
                elif "pos_embed" in name:
                    scale = 1.0
                elif "language_model" in name and name.endswith(BRANCH_OUTPUTS):
                    scale = 0.04
                else:
                    scale = fan_in**-0.5 * (2.0 if name.endswith("mlp.gate.weight") else 1.0)
                p.copy_(noise * scale)
            elif name.endswith("language_model.norm.weight"):
                p.copy_(-2.0 + 0.2 * noise)  # zero-centred: (1 + w) ~ -1
            elif "language_model" in name and "norm" in name and "linear_attn" not in name:
                p.copy_(0.2 * noise)  # zero-centred norms: (1 + w) ~ 1
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def redraw_routers(model, seed: int) -> None:
    """Routers whose logits spread wide (std ~6), so that top-k near-ties are rare: `ROUTER_SEED` is one
    for which no router logit of the tests' prompts is within 1e-3 of a tie (the tests check it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 6.0 * p.shape[-1] ** -0.5)


def _release(path: Path, arch: str, layout: str, dialect: str) -> None:
    from safetensors.torch import load_file, save_file

    if layout == "release":
        files = sorted(path.glob("*.safetensors"))
        assert len(files) == 1
        state = load_file(str(files[0]))
        if arch == MOE:  # per-expert keys -> fused [E, 2I, H], [E, H, I] (no .weight)
            for layer in range(4):
                prefix = f"model.language_model.layers.{layer}.mlp.experts."
                gate = [state.pop(f"{prefix}{e}.gate_proj.weight") for e in range(EXPERTS)]
                up = [state.pop(f"{prefix}{e}.up_proj.weight") for e in range(EXPERTS)]
                down = [state.pop(f"{prefix}{e}.down_proj.weight") for e in range(EXPERTS)]
                state[prefix + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
                state[prefix + "down_proj"] = torch.stack(down)
        gen = torch.Generator().manual_seed(99)
        for name, shape in (("mtp.fc.weight", (HIDDEN, 2 * HIDDEN)), ("mtp.norm.weight", (HIDDEN,))):
            state[name] = torch.randn(shape, generator=gen)
        save_file({k: v.contiguous() for k, v in state.items()}, str(files[0]), metadata={"format": "pt"})
    if dialect == "release":
        cfg = json.loads((path / "config.json").read_text())
        text, vision = cfg["text_config"], cfg["vision_config"]
        text["full_attention_interval"] = 2
        text["partial_rotary_factor"] = text["rope_parameters"]["partial_rotary_factor"]
        text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
        text.update(attn_output_gate=True, mtp_num_hidden_layers=1, mamba_ssm_dtype="float32")
        vision.pop("rope_parameters", None)
        vision.update(model_type=arch, deepstack_visual_indexes=[])
        cfg.update(transformers_version="4.57.1", language_model_only=False)
        _write_json(path / "config.json", cfg)


def make_checkpoint(
    arch: str, path, *, layout: str = "default", dialect: str = "default", seed: int = 0, tie_word_embeddings=False
) -> Path:
    """Write a tiny random Qwen3.5 (``arch`` "qwen3_5" or "qwen3_5_moe") checkpoint into ``path``; return it."""
    from transformers import GenerationConfig

    if arch not in HYBRIDS or layout not in LAYOUTS or dialect not in DIALECTS:
        raise ValueError(f"arch in {HYBRIDS}, layout in {LAYOUTS}, dialect in {DIALECTS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, model_cls = classes(arch)
    torch.manual_seed(seed)
    model = model_cls(make_config(arch, tie_word_embeddings)).float().eval()
    _randomize(model, seed)
    if arch == MOE:
        redraw_routers(model, ROUTER_SEED + seed)
    if tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
    )
    model.save_pretrained(str(path))
    tok = make_tokenizer()
    tok.save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    _write_json(path / "preprocessor_config.json", _preprocessor_config("qwen3_vl"))
    _write_json(path / "video_preprocessor_config.json", _video_preprocessor_config("qwen3_vl"))
    _release(path, arch, layout, dialect)
    return path


def load_reference(path, dtype=torch.float32):
    """transformers' model of a checkpoint directory, eval mode (the eager expert loop: odd sizes)."""
    from transformers import AutoConfig

    arch = AutoConfig.from_pretrained(str(path)).model_type
    extra = {"experts_implementation": "eager"} if arch == MOE else {}
    return classes(arch)[1].from_pretrained(str(path), dtype=dtype, **extra).eval()
