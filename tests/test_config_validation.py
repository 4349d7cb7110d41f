"""config.json is validated completely before any module is built.

Mutations of the configs the tiny test checkpoints use (every arch and config.json dialect, written by
transformers as `tiny_checkpoints.py` writes them) and of the bundled qwen3-vl-tiny config: each field set
to a wrong type, a bound's far side or an inconsistent value must give a one-line `ConfigError` naming the
key and the value, never another exception. Controls (the unmodified configs, every dialect alike, accepted
variations, hub configs of large checkpoints) guard against refusing what works. Pure-python parsing except
the one test that checks the tables against mlx.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import tiny_checkpoints as tiny

import mlx_compact
from mlx_compact.models import config as config_module
from mlx_compact.models.config import ConfigError, ModelConfig

BUNDLED = Path(mlx_compact.__file__).parent / "assets" / "qwen3-vl-tiny" / "config.json"
DIALECTS = {
    "qwen2_vl": ("default", "flat44", "nested457", "v5"),
    "qwen2_5_vl": ("default", "flat44", "nested457", "v5"),
    "qwen3_vl": ("default", "nested457", "qwen3_nested", "v5"),
}
VARIANTS = [f"{arch}-{d}" for arch, dialects in DIALECTS.items() for d in dialects] + ["bundled"]

SIZE_BAD = (0, -1, 1.5, "8", True, None, 10**9, [])
NUMBER_BAD = (0, -1, "8", True, None, [], math.inf, math.nan)
FLAG_BAD = ("yes", 1, 0, None, [])
INDEX_BAD = (0, "0", None, [-1], [3], [0, 0], [True], [1.5])
TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "eos_token_id")
NULLABLE = ("num_key_value_heads", "head_dim", "mrope_section", "eos_token_id")  # null counts as absent
ALL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
NOT_QWEN2 = ("qwen2_5_vl", "qwen3_vl")

# (scope, key, bad values, archs). Scopes: "text" (top level and text_config), "rope" (their RoPE dicts),
# "text+rope", "vision" (vision_config), "vision+rope" (and its rope_parameters), "vision+top".
FIELDS = [
    *[
        ("text", k, SIZE_BAD, ALL)
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
        )
    ],
    *[("text", k, SIZE_BAD, ALL) for k in TOKENS],
    ("text", "eos_token_id", ([2, 10**9], [2, "2"]), ALL),
    ("rope", "mrope_section", SIZE_BAD + ([1, 1, 1], [8, 8], [4, 4, 4, 4], [-2, 10, 8]), ALL),
    ("text", "rms_norm_eps", NUMBER_BAD, ALL),
    ("text+rope", "rope_theta", NUMBER_BAD, ALL),
    ("text", "attention_bias", FLAG_BAD, ALL),
    ("text", "tie_word_embeddings", FLAG_BAD, ALL),
    ("rope", "mrope_interleaved", FLAG_BAD, ALL),
    *[
        ("vision", k, SIZE_BAD, ALL)
        for k in (
            "depth",
            "hidden_size",
            "num_heads",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "in_channels",
            "window_size",
            "num_position_embeddings",
        )
    ],
    ("vision", "embed_dim", SIZE_BAD, ("qwen2_vl",)),
    ("vision", "mlp_ratio", NUMBER_BAD + (10**9, 0.01), ("qwen2_vl",)),
    ("vision", "intermediate_size", SIZE_BAD, NOT_QWEN2),
    ("vision", "out_hidden_size", SIZE_BAD, NOT_QWEN2),
    ("vision", "hidden_act", ("relu", "", 1, None, []), ALL),
    ("vision", "fullatt_block_indexes", INDEX_BAD, ALL),
    ("vision", "deepstack_visual_indexes", INDEX_BAD, ALL),
    ("vision+rope", "rope_theta", NUMBER_BAD, ALL),
    ("vision+top", "tokens_per_second", NUMBER_BAD, ALL),
]


def arch_of(variant: str) -> str:
    return "qwen3_vl" if variant == "bundled" else variant.split("-")[0]


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """variant -> config.json dict: the tiny checkpoints' configs in every dialect, and the bundled one."""
    out = {"bundled": json.loads(BUNDLED.read_text())}
    for arch, dialects in DIALECTS.items():
        base = json.loads(tiny.make_config(arch).to_json_string(use_diff=True))
        for dialect in dialects:
            path = tmp_path_factory.mktemp(f"{arch}-{dialect}")
            (path / "config.json").write_text(json.dumps(base))
            if dialect != "default":
                tiny._redialect(path, arch, dialect)
            out[f"{arch}-{dialect}"] = json.loads((path / "config.json").read_text())
    return out


def scope_dicts(cfg: dict, scope: str) -> list:
    """The dicts a scope's key may live in, the one to add it to first."""
    text = [d for d in (cfg.get("text_config"), cfg) if isinstance(d, dict)]
    rope = [d[k] for d in text for k in ("rope_parameters", "rope_scaling") if isinstance(d.get(k), dict)]
    vision = cfg["vision_config"]
    vision_rope = [vision["rope_parameters"]] if isinstance(vision.get("rope_parameters"), dict) else []
    return {
        "text": text,
        "rope": rope,
        "text+rope": rope + text,
        "vision": [vision],
        "vision+rope": vision_rope + [vision],
        "vision+top": [vision, cfg],
    }[scope]


def mutated(cfg: dict, scope: str, key: str, value=None, delete: bool = False) -> dict:
    """A copy with ``key`` set to ``value`` (or deleted) wherever the scope has it, else where it would go."""
    cfg = copy.deepcopy(cfg)
    dicts = scope_dicts(cfg, scope)
    holders = [d for d in dicts if key in d] or dicts[:1]
    for d in holders:
        if delete:
            d.pop(key, None)
        else:
            d[key] = copy.deepcopy(value)
    return cfg


def outcome(cfg) -> tuple:
    """("ok", ModelConfig) or ("error", message); any other exception is reported as ("crash", ...)."""
    try:
        return "ok", ModelConfig.from_dict(cfg)
    except ConfigError as e:
        return "error", str(e)
    except Exception as e:  # noqa: BLE001 - the point: nothing but ConfigError may come out
        return "crash", f"{type(e).__name__}: {e}"


def refused(cfg, *words) -> str:
    """The ConfigError message for ``cfg``, checked to be one line holding ``words``."""
    kind, result = outcome(cfg)
    assert kind == "error", f"expected a ConfigError, got {kind}: {result}"
    assert "\n" not in result and all(w in result for w in words), result
    return result


def accepted(arch: str, key: str, value) -> bool:
    """Values in the mutation lists that are valid for this field."""
    zero = type(value) is int and value == 0
    return (
        (zero and key in TOKENS)
        or (zero and key == "window_size" and arch != "qwen2_5_vl")
        or (zero and key == "num_position_embeddings" and arch != "qwen3_vl")
        or (key == "mlp_ratio" and value == 1.5)
    )


REQUIRED = {
    "text": ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"),
    "vision": ("depth", "num_heads"),
}
WIDTH = {"qwen2_vl": "embed_dim", "qwen2_5_vl": "hidden_size", "qwen3_vl": "hidden_size"}

CASES = [
    pytest.param(variant, scope, key, bad, id=f"{variant}-{scope}-{key}")
    for variant in VARIANTS
    for scope, key, bad, archs in FIELDS
    if arch_of(variant) in archs
]


@pytest.mark.parametrize("variant,scope,key,bad", CASES)
def test_mutated_field_is_refused_naming_it(configs, variant, scope, key, bad):
    arch, cfg = arch_of(variant), configs[variant]
    failures = []
    for value in bad:
        got = outcome(mutated(cfg, scope, key, value))
        if accepted(arch, key, value):
            ok = got[0] == "ok"
        elif value is None and key in NULLABLE:  # the same as leaving it out, whatever that gives
            ok = got[0] != "crash" and got[0] == outcome(mutated(cfg, scope, key, delete=True))[0]
        else:
            words = [key, json.dumps(value)] + (["vision_config."] if scope.startswith("vision") else [])
            ok = got[0] == "error" and "\n" not in got[1] and all(w in got[1] for w in words)
        if not ok:
            failures.append(f"{key}={json.dumps(value)}: {got[0]}: {got[1]}")
    if key in REQUIRED.get(scope, ()) or (scope == "vision" and key == WIDTH[arch]):
        got = outcome(mutated(cfg, scope, key, delete=True))
        if got[0] != "error" or "lacks the" not in got[1] or repr(key) not in got[1]:
            failures.append(f"{key} deleted: {got[0]}: {got[1]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("raw", [None, [], [{"model_type": "qwen2_vl"}], "qwen2_vl", 5, 1.5, True])
def test_config_that_is_not_an_object(raw):
    refused(raw, "config.json holds", "not an object")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("value", [[], "x", 5, True])
def test_sections_that_are_not_objects(configs, variant, value):
    cfg = configs[variant]
    shown = json.dumps(value)
    refused({**cfg, "vision_config": value}, f"vision_config is {shown}", "an object")
    refused({**cfg, "text_config": value}, f"text_config is {shown}", "an object")
    for key in ("rope_parameters", "rope_scaling"):
        refused({**cfg, key: value}, f"{key} is {shown}", "an object")
        if "text_config" in cfg:
            refused({**cfg, "text_config": {**cfg["text_config"], key: value}}, f"text_config.{key} is {shown}")
    refused(mutated(cfg, "vision", "rope_parameters", value), f"vision_config.rope_parameters is {shown}")
    refused({**cfg, "vision_config": None}, "vision_config is null")


@pytest.mark.parametrize(
    "edit,words",
    [
        ({"text": {"num_attention_heads": 6}}, ["num_attention_heads is 6", "divisor of hidden_size 64"]),
        ({"text": {"num_key_value_heads": 3}}, ["num_key_value_heads is 3", "divisor of num_attention_heads 4"]),
        ({"vision": {"num_heads": 3}}, ["vision_config.num_heads is 3", "vision width 32"]),
        ({"vision": {"num_heads": 16}}, ["vision_config.num_heads is 16", "multiple of 4"]),
        ({"vision": {"out_hidden_size": 48}}, ["vision_config.out_hidden_size is 48", "hidden_size 64"]),
        ({"vision": {"window_size": 14}}, ["vision_config.window_size is 14", "= 28"]),
        ({"vision": {"window_size": 0}}, ["vision_config.window_size is 0"]),
        ({"vision": {"fullatt_block_indexes": [1, 3]}}, ["fullatt_block_indexes is [1, 3]", "from 0 to 2"]),
        ({"rope": {"mrope_section": [4, 6, 6]}}, ["mrope_section is [4, 6, 6]", "head_dim / 2 = 8"]),
        ({"text": {"head_dim": 32}}, ["mrope_section is [2, 3, 3]", "head_dim / 2 = 16"]),
    ],
)
def test_inconsistent_sizes_are_refused(configs, edit, words):
    cfg = configs["qwen2_5_vl-default"]
    for scope, values in edit.items():
        for key, value in values.items():
            cfg = mutated(cfg, scope, key, value)
    refused(cfg, *words)


def test_defaults_must_fit_too(configs):
    qwen2 = configs["qwen2_vl-default"]
    refused(mutated(qwen2, "rope", "mrope_section", delete=True), "mrope_section (absent: the default)", "= 8")
    absent = mutated(configs["qwen2_5_vl-default"], "vision", "window_size", delete=True)
    assert ModelConfig.from_dict(absent).vision.window_size == 112  # transformers' default
    refused(
        mutated(configs["qwen3_vl-default"], "vision", "num_position_embeddings", delete=True),
        "num_position_embeddings is 0",
    )


def test_accepted_variations(configs):
    qwen25 = configs["qwen2_5_vl-default"]
    assert ModelConfig.from_dict(mutated(qwen25, "vision", "window_size", 42)).vision.window_size == 42
    assert ModelConfig.from_dict(mutated(qwen25, "text+rope", "rope_theta", 10000)).text.rope_theta == 10000
    assert ModelConfig.from_dict(mutated(qwen25, "text", "eos_token_id", [2, 0])).eos_token_id == [2, 0]
    qwen2 = configs["qwen2_vl-default"]
    assert ModelConfig.from_dict(mutated(qwen2, "vision", "mlp_ratio", 1.5)).vision.intermediate_size == 48
    assert ModelConfig.from_dict(mutated(qwen2, "text", "head_dim", 16)).text.head_dim == 16


QUANT_OK = [
    {"group_size": 64, "bits": 4},
    {"group_size": 32, "bits": 2, "mode": "affine"},
    {"group_size": 128, "bits": 8},
    {"group_size": 32, "bits": 4, "mode": "mxfp4"},
    {"group_size": 32, "bits": 8, "mode": "mxfp8"},
    {"group_size": 16, "bits": 4, "mode": "nvfp4"},
    {
        "group_size": 64,
        "bits": 4,
        "vision_tower.blocks.0.mlp.fc1": False,
        "language_model.lm_head": True,
        "language_model.model.layers.0.mlp.up_proj": {"group_size": 32, "bits": 8},
        "language_model.model.layers.1.mlp.up_proj": {"bits": 6, "mode": "affine"},
    },
]
QUANT_BAD = [
    ({"group_size": 0, "bits": 4}, ["group_size is 0", "32, 64, 128"]),
    ({"group_size": -64, "bits": 4}, ["group_size is -64"]),
    ({"group_size": 256, "bits": 4}, ["group_size is 256"]),
    ({"group_size": "64", "bits": 4}, ['group_size is "64"']),
    ({"group_size": 64.0, "bits": 4}, ["group_size is 64.0"]),
    ({"group_size": None, "bits": 4}, ["group_size is null"]),
    ({"group_size": 64, "bits": 7}, ["bits is 7", "for mode affine"]),
    ({"group_size": 64, "bits": 0}, ["bits is 0"]),
    ({"group_size": 64, "bits": 16}, ["bits is 16"]),
    ({"group_size": 64, "bits": True}, ["bits is true"]),
    ({"group_size": 64, "bits": 4, "mode": "x"}, ['mode is "x"', "affine, mxfp4"]),
    ({"group_size": 64, "bits": 4, "mode": None}, ["mode is null"]),
    ({"group_size": 32, "bits": 4, "mode": "nvfp4"}, ["group_size is 32", "for mode nvfp4"]),
    ({"group_size": 32, "bits": 8, "mode": "mxfp4"}, ["bits is 8", "for mode mxfp4"]),
    ({"group_size": 64}, ["lacks", "'bits'"]),
    ({"bits": 4}, ["lacks", "'group_size'"]),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": {"group_size": 0}}, ["lm_head.group_size is 0"]),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": {"bits": 7}}, ["lm_head.bits is 7"]),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": {"mode": "x"}}, ['lm_head.mode is "x"']),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": {"bits": 4, "size": 1}}, ["lm_head is {"]),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": {"quantize_input": "yes"}}, ["quantize_input is"]),
    ({"group_size": 64, "bits": 4, "language_model.lm_head": {"group_size": 32, "mode": "nvfp4"}}, ["for mode nvfp4"]),
]


@pytest.mark.parametrize("key", ["quantization", "quantization_config"])
def test_quantization_settings(configs, key):
    for variant in ("qwen2_vl-flat44", "qwen3_vl-default", "bundled"):
        cfg = configs[variant]
        for q in QUANT_OK:
            assert ModelConfig.from_dict({**cfg, key: q}).quantization == q
        for q, words in QUANT_BAD:
            refused({**cfg, key: copy.deepcopy(q)}, key, *words)
        for value in (5, [], "4bit", True):
            refused({**cfg, key: value}, key, "an object")


def test_non_mlx_quantization_config_is_left_to_the_loader(configs):
    gptq = {"quant_method": "gptq", "bits": 7, "group_size": 0}
    assert ModelConfig.from_dict({**configs["qwen2_vl-default"], "quantization_config": gptq}).quantization == gptq
    assert ModelConfig.from_dict({**configs["qwen2_vl-default"], "quantization_config": None}).quantization is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_unmodified_configs_parse(configs, variant):
    cfg = ModelConfig.from_dict(copy.deepcopy(configs[variant]))
    assert cfg.model_type == arch_of(variant)
    assert 2 * sum(cfg.text.mrope_section) == cfg.text.head_dim


@pytest.mark.parametrize("arch", DIALECTS)
def test_every_dialect_gives_the_same_config(configs, arch):
    parsed = [ModelConfig.from_dict(configs[f"{arch}-{d}"]) for d in DIALECTS[arch]]
    assert all(p == parsed[0] for p in parsed[1:])


def test_tables_match_mlx():
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_compact.models.vision import ACTIVATIONS

    assert set(config_module.ACTIVATIONS) == set(ACTIVATIONS)
    for mode, (sizes, bits) in config_module.QUANT_MODES.items():
        for group_size in sizes:
            for b in bits:
                layer = nn.Linear(128, 8).to_quantized(group_size=group_size, bits=b, mode=mode)
                mx.eval(layer(mx.ones((1, 128))))


# Hub configs of the largest checkpoints of the two dialect families (sizes as published).
QWEN2_5_VL_72B = {
    "model_type": "qwen2_5_vl",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 80,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3456,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 8192,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}
QWEN3_VL_8B = {
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [8, 16, 24],
        "depth": 27,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "in_channels": 3,
        "intermediate_size": 4304,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def test_real_checkpoint_configs_parse():
    big = ModelConfig.from_dict(QWEN2_5_VL_72B)
    assert (big.text.num_hidden_layers, big.text.head_dim, big.vision.window_size) == (80, 128, 112)
    qwen3 = ModelConfig.from_dict(QWEN3_VL_8B)
    assert qwen3.vision.deepstack_visual_indexes == (8, 16, 24) and qwen3.text.mrope_interleaved
    # the largest sizes published since: Qwen3-VL-235B's 94 layers, Qwen3.5-397B's vocabulary
    grown = copy.deepcopy(QWEN3_VL_8B)
    grown["text_config"].update(num_hidden_layers=94, vocab_size=248320, hidden_size=8192, intermediate_size=29568)
    grown["vision_config"]["out_hidden_size"] = 8192
    assert ModelConfig.from_dict(grown).text.vocab_size == 248320
