"""Builders of tiny random Hugging Face Qwen-VL checkpoints, made offline for tests.

`make_checkpoint(arch, path)` writes a directory that `transformers` can load with
`from_pretrained` (model, tokenizer, AutoProcessor): fp32 weights, every parameter random
(no zeros or ones), a ~300-token byte-level tokenizer with the Qwen special tokens at small
ids, the Qwen2-VL chat template and small min/max pixels.
Variants rewrite the saved files to the key layouts and config.json dialects met on the hub.

Qwen3-VL-MoE ("qwen3_vl_moe") is built by the same function but is not in `ARCHS` (the tests that loop over
`ARCHS` stay as they are): see `MOE_SIZES`, and the "release" layout and dialect.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MOE = "qwen3_vl_moe"
LAYOUTS = ("default", "legacy", "nested", "sharded", "legacy_sharded")
DIALECTS = ("default", "flat44", "nested457", "v5", "qwen3_nested")
MOE_LAYOUTS = ("default", "sharded", "release")  # release: experts [E, H, 2I] / [E, I, H] (transformers-5: transposed)
MOE_DIALECTS = ("default", "release")  # release: num_experts, rope_scaling + rope_theta (transformers 4.57)
# Qwen3-VL-MoE sizes. "odd": widths that are no power of two (and multiples of 32, so 4-bit groups of 32
# fit; experts x H a multiple of 64, as mlx-vlm needs to quantize the router), H != 2I,
# 6 experts top-2, layer 1 dense (mlp_only_layers). "h2i": H == 2I, where the fused gate_up
# orientation cannot be told from its own shape, and decoder_sparse_step 2 (layers 1 and 3 sparse).
MOE_SIZES = {
    "odd": dict(
        hidden_size=96,
        intermediate_size=160,
        moe_intermediate_size=64,
        num_experts=6,
        num_experts_per_tok=2,
        num_hidden_layers=3,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    "h2i": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        decoder_sparse_step=2,
        mlp_only_layers=[],
    ),
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TOKEN_IDS = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 320  # embedding rows; the tokenizer itself has 7 + 256 + merges < 320 tokens

# The Qwen2-VL chat template (as on the hub).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ---------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def make_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) with the Qwen special tokens at ids 0..6."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(_bytes_to_unicode().values(), key=lambda c: ord(c))
    vocab = dict(TOKEN_IDS)
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    merges = []  # a few merges so the tokenizer is a real BPE
    for a, b in [("t", "h"), ("i", "n"), ("e", "r"), ("a", "n"), ("Ġ", "t"), ("th", "e"), ("Ġ", "a")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------- configs


def _text_config(arch: str, moe: str = "odd") -> dict:
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=TOKEN_IDS["<|im_end|>"],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
    )
    if arch == MOE:
        common.update(MOE_SIZES[moe])
    if arch in ("qwen3_vl", MOE):
        # head_dim 32 != hidden / heads = 16; interleaved sections like the real [24, 20, 20]
        common.update(
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
        )
    else:
        common.update(
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        )
    return common


def _vision_config(arch: str, moe: str = "odd") -> dict:
    if arch == MOE:  # ViT width 40 (heads of 20), MLP 72
        return dict(
            depth=3,
            hidden_size=40,
            intermediate_size=72,
            num_heads=2,
            out_hidden_size=MOE_SIZES[moe]["hidden_size"],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
            hidden_act="gelu_pytorch_tanh",
        )
    if arch == "qwen2_vl":
        # trap: embed_dim is the ViT width, hidden_size the LLM width
        return dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            mlp_ratio=2,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
    if arch == "qwen2_5_vl":
        # window_size 56 px = 2x2 merged tokens per window, so test images span several windows
        return dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            hidden_act="silu",
        )
    return dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
        hidden_act="gelu_pytorch_tanh",
    )


def _classes(arch: str):
    import transformers as tf

    return {
        "qwen2_vl": (tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration),
        "qwen3_vl": (tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration),
        MOE: (tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration),
    }[arch]


def make_config(arch: str, tie_word_embeddings: bool = False, moe: str = "odd"):
    """The transformers config object of the tiny model."""
    config_cls, _ = _classes(arch)
    return config_cls(
        text_config=_text_config(arch, moe),
        vision_config=_vision_config(arch, moe),
        image_token_id=TOKEN_IDS["<|image_pad|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded random values: no zeros, no ones, order-one activations."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = p.shape[-1] if ".experts." in name else math.prod(p.shape[1:])  # experts: [E, out, in]
                scale = 1.0 if ("embed_tokens" in name or "pos_embed" in name) else fan_in**-0.5
                scale *= 2.0 if name.endswith("mlp.gate.weight") else 1.0  # routers: well-separated top-k
                p.copy_(noise * scale)
            elif "norm" in name or "ln_" in name or name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


# ---------------------------------------------------------------- processor files


def _preprocessor_config(arch: str) -> dict:
    if arch in ("qwen3_vl", MOE):
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen3VLProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "merge_size": 2,
            "patch_size": 16,
            "temporal_patch_size": 2,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 196},
        }
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor" if arch == "qwen2_vl" else "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "merge_size": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "min_pixels": 28 * 28 * 4,
        "max_pixels": 28 * 28 * 256,
    }


def _video_preprocessor_config(arch: str) -> dict:
    cfg = _preprocessor_config(arch)
    cfg.pop("image_processor_type")
    cfg.pop("min_pixels", None)
    cfg.pop("max_pixels", None)
    if arch in ("qwen3_vl", MOE):
        cfg.update(
            video_processor_type="Qwen3VLVideoProcessor",
            fps=2,
            min_frames=4,
            max_frames=768,
            do_sample_frames=True,
            size={"shortest_edge": 32 * 32 * 8, "longest_edge": 32 * 32 * 256},
        )
    else:
        cfg.update(
            video_processor_type="Qwen2VLVideoProcessor",
            do_sample_frames=False,
            size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 128},
        )
    return cfg


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- variants


def _relayout(path: Path, layout: str) -> None:
    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
        f.unlink()
    index = path / "model.safetensors.index.json"
    if index.exists():
        index.unlink()

    def rename(k: str) -> str:
        if k.startswith("visual."):  # legacy -> nested
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model.") :]
        if layout.startswith("legacy"):
            k = k.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        return k

    state = {rename(k): v.contiguous() for k, v in state.items()}
    meta = {"format": "pt"}
    if "sharded" not in layout:
        save_file(state, str(path / "model.safetensors"), metadata=meta)
        return
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    total = 0
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(path / name), metadata=meta)
        for k in part:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    _write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _redialect(path: Path, arch: str, dialect: str) -> None:
    cfg = json.loads((path / "config.json").read_text())
    text = cfg.pop("text_config")
    vision = cfg.pop("vision_config")
    rope = text.pop("rope_parameters")
    section = rope["mrope_section"]
    theta = rope["rope_theta"]
    for k in ("layer_types", "dtype", "use_sliding_window", "sliding_window", "max_window_layers"):
        text.pop(k, None)
    vision.pop("rope_parameters", None)

    if dialect == "v5":
        # 5.x: nested text_config with rope_parameters (mrope_section inside)
        text["rope_parameters"] = rope
        cfg.update(text_config=text, vision_config=vision, transformers_version="5.0.0")
    elif dialect == "flat44":
        if arch == "qwen3_vl":
            raise ValueError("qwen3_vl has no flat 4.4x dialect")
        # Qwen2-VL / 2.5-VL hub: LLM keys at top level, rope_scaling type mrope
        text.pop("model_type", None)
        vision.pop("model_type", None)
        vision["in_chans"] = vision.pop("in_channels")
        vision["spatial_patch_size"] = vision["patch_size"]
        cfg.update(text)
        cfg.update(
            rope_theta=theta,
            rope_scaling={"type": "mrope", "mrope_section": section},
            vision_config=vision,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=text["num_hidden_layers"],
            torch_dtype="float32",
            transformers_version="4.49.0",
        )
        cfg.pop("dtype", None)
    elif dialect in ("nested457", "qwen3_nested"):
        if arch == "qwen3_vl":
            # Qwen3-VL hub (4.57): text_config.rope_scaling with mrope_interleaved, model_type quirk
            text["rope_scaling"] = {"mrope_interleaved": True, "mrope_section": section, "rope_type": "default"}
            text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
            vision["model_type"] = "qwen3_vl"
        else:
            if dialect == "qwen3_nested":
                raise ValueError("qwen3_nested is for qwen3_vl")
            # 4.57 save: type mrope rewritten to default, kept next to rope_type
            text["rope_scaling"] = {"mrope_section": section, "rope_type": "default", "type": "default"}
            text["use_sliding_window"] = False
            text["sliding_window"] = 32768
            text["max_window_layers"] = text["num_hidden_layers"]
        text["rope_theta"] = theta
        text["dtype"] = "float32"
        cfg.update(text_config=text, vision_config=vision, dtype="float32", transformers_version="4.57.1")
    else:
        raise ValueError(f"unknown dialect {dialect!r}; choose from {DIALECTS}")
    _write_json(path / "config.json", cfg)


def _release_experts(path: Path) -> None:
    """Qwen3-VL-MoE experts as the Qwen release stores them: gate_up [E, H, 2I], down [E, I, H]."""
    from safetensors.torch import load_file, save_file

    for f in sorted(path.glob("*.safetensors")):
        state = load_file(str(f))
        state = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in state.items()}
        save_file(state, str(f), metadata={"format": "pt"})


def _release_dialect(path: Path) -> None:
    """A Qwen3-VL-MoE config.json as the releases have it (transformers 4.57): num_experts, rope_scaling and
    rope_theta in text_config, vision model_type "qwen3_vl_moe", no rope_parameters."""
    cfg = json.loads((path / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    rope = text.pop("rope_parameters")
    text["num_experts"] = text.pop("num_local_experts")
    text["rope_scaling"] = {"mrope_interleaved": True, "mrope_section": rope["mrope_section"], "rope_type": "default"}
    text["rope_theta"] = rope["rope_theta"]
    text["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
    text["norm_topk_prob"] = True
    text.pop("sliding_window", None)
    vision.pop("rope_parameters", None)
    vision["model_type"] = MOE
    cfg.update(transformers_version="4.57.0.dev0")
    _write_json(path / "config.json", cfg)


# ---------------------------------------------------------------- public


def make_checkpoint(
    arch: str,
    path,
    *,
    layout: str = "default",
    dialect: str = "default",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    moe: str = "odd",
) -> Path:
    """Write a tiny random checkpoint of `arch` into `path` and return the path.

    layout: "default" (what transformers 5.23 writes: the legacy names for Qwen2/2.5-VL, the nested
    names for Qwen3-VL), "legacy" (model.layers.*, model.embed_tokens, model.norm, visual.*, lm_head),
    "nested" (model.language_model.*, model.visual.*, lm_head), "sharded" / "legacy_sharded" (nested /
    legacy names in two safetensors files with model.safetensors.index.json).
    dialect: "default" (5.23 config.json), "v5" (rope_parameters in text_config), "flat44" (flat 4.4x
    hub config, rope_scaling type mrope), "nested457" (4.57 text_config.rope_scaling), "qwen3_nested"
    (Qwen3-VL hub config with mrope_interleaved).
    Qwen3-VL-MoE (`MOE`): layout "default", "sharded" or "release" (`MOE_LAYOUTS`), dialect "default" or
    "release" (`MOE_DIALECTS`), sizes `MOE_SIZES[moe]`.
    """
    from transformers import GenerationConfig

    if arch == MOE:
        if layout not in MOE_LAYOUTS or dialect not in MOE_DIALECTS or moe not in MOE_SIZES:
            raise ValueError(f"{MOE}: layout in {MOE_LAYOUTS}, dialect in {MOE_DIALECTS}, moe in {tuple(MOE_SIZES)}")
    elif arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS + (MOE,)}")
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if arch == "qwen3_vl" and layout.startswith("legacy"):
        raise ValueError("qwen3_vl has no legacy layout (the hub and transformers use the nested names)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _, model_cls = _classes(arch)
    torch.manual_seed(seed)
    model = model_cls(make_config(arch, tie_word_embeddings, moe)).float().eval()
    _randomize(model, seed)
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
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE  # where 4.x hub checkpoints keep it
    _write_json(path / "tokenizer_config.json", tok_cfg)
    _write_json(path / "preprocessor_config.json", _preprocessor_config(arch))
    _write_json(path / "video_preprocessor_config.json", _video_preprocessor_config(arch))

    if layout == "release":
        _release_experts(path)
    elif layout != "default":
        _relayout(path, layout)
    if dialect == "release":
        _release_dialect(path)
    elif dialect != "default":
        _redialect(path, arch, dialect)
    return path


def load_reference(path):
    """The transformers model of a checkpoint directory, in eval mode, fp32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    arch = config.model_type
    _, model_cls = _classes(arch)
    # MoE: the eager expert loop (the default grouped_mm wants 16-byte aligned strides, which odd sizes lack)
    extra = {"experts_implementation": "eager"} if arch == MOE else {}
    return model_cls.from_pretrained(str(path), dtype=torch.float32, **extra).eval()


def load_reference_processor(path):
    """transformers' processor of a checkpoint directory.

    `AutoProcessor.from_pretrained` needs torchvision for the video processor; without torchvision
    the processor is built from the (PIL) image processor and the tokenizer, with no video processor.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(str(path))
    from unittest import mock

    import transformers as tf
    from transformers.processing_utils import ProcessorMixin

    processor_cls = {
        "qwen2_vl": tf.Qwen2VLProcessor,
        "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
        "qwen3_vl": tf.Qwen3VLProcessor,
        MOE: tf.Qwen3VLProcessor,
    }[AutoConfig.from_pretrained(str(path)).model_type]
    image_processor = AutoImageProcessor.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *a: None):
        return processor_cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=tokenizer.chat_template,
        )
