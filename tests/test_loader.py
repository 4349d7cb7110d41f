"""The loader: raw Hugging Face checkpoints in every layout and config dialect give transformers' logits;
a repo id resolves through the hub cache; every bad input gives its own clear error.

Also holds the small helpers the converter and mlx-vlm tests share (reference inputs and logits).
"""

import json
import shutil
from functools import cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from tiny_checkpoints import load_reference, load_reference_processor

from mlx_compact.loader import LoadError, load, load_model

ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOL = 1e-4  # max |ours - reference| / max |reference| for float32 weights


# ---------------------------------------------------------------- shared helpers


@cache
def reference_inputs(path: str) -> dict:
    """Numpy inputs for one chat prompt with one 90x60 image, made by transformers' processor."""
    from conftest import _noise_image

    proc = load_reference_processor(path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    out = proc(text=[text], images=[_noise_image(60, 90, seed=1)], return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


@cache
def reference_logits(path: str) -> np.ndarray:
    """transformers' logits [L, V] for `reference_inputs(path)`."""
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in reference_inputs(path).items()}
    model = load_reference(path)
    if "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == model.config.image_token_id).long()
    with torch.no_grad():
        return model(**inputs).logits[0].float().numpy()


def our_logits(model, inputs: dict) -> np.ndarray:
    """Our model's logits [L, V] (float32) for numpy `inputs`."""
    out = model(mx.array(inputs["input_ids"]), mx.array(inputs["pixel_values"]), mx.array(inputs["image_grid_thw"]))
    return np.array(out[0].astype(mx.float32))


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- raw checkpoints match transformers

# Qwen3-VL has no legacy key layout and no flat config; Qwen2/2.5-VL have no qwen3_nested config.
QWEN2_DIALECTS = ("default", "flat44", "nested457", "v5")
QWEN2_LAYOUTS = ("default", "legacy", "nested", "sharded", "legacy_sharded")
DIALECTS = {"qwen2_vl": QWEN2_DIALECTS, "qwen2_5_vl": QWEN2_DIALECTS, "qwen3_vl": ("default", "v5", "qwen3_nested")}
LAYOUTS = {"qwen2_vl": QWEN2_LAYOUTS, "qwen2_5_vl": QWEN2_LAYOUTS, "qwen3_vl": ("default", "nested", "sharded")}
VARIANTS = [(arch, layout, dialect) for arch in ARCHS for layout in LAYOUTS[arch] for dialect in DIALECTS[arch]]


@pytest.mark.parametrize("arch,layout,dialect", VARIANTS)
def test_raw_checkpoint_matches_transformers(ckpt, arch, layout, dialect):
    # Every variant holds the same seeded weights, so one transformers run per arch is the reference.
    ref_path = str(ckpt(arch))
    path = ckpt(arch, layout=layout, dialect=dialect)
    model = load_model(path)
    assert rel_err(our_logits(model, reference_inputs(ref_path)), reference_logits(ref_path)) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_embeddings_match_transformers(ckpt, arch):
    path = str(ckpt(arch, tie_word_embeddings=True))
    model = load_model(path)
    assert "lm_head" not in dict(tree_flatten(model.language_model.parameters()))
    assert rel_err(our_logits(model, reference_inputs(path)), reference_logits(path)) < TOL


def test_default_dtype_is_float32_on_cpu_and_dtype_casts_floats(ckpt):
    path = ckpt("qwen2_vl")
    assert {v.dtype for _, v in tree_flatten(load_model(path).parameters())} == {mx.float32}
    assert {v.dtype for _, v in tree_flatten(load_model(path, dtype="bfloat16").parameters())} == {mx.bfloat16}


def test_per_module_quantization_overrides_are_honoured(ckpt, tmp_path):
    """An mlx-vlm style config with a per-module override (lm_head at 8 bits, the rest at 4)."""
    from mlx_compact.convert.convert import save_config, save_weights

    src = ckpt("qwen2_5_vl")
    model = load_model(src)
    nn.quantize(
        model,
        group_size=64,
        bits=4,
        class_predicate=lambda p, m: (
            hasattr(m, "to_quantized")
            and not p.startswith("vision_tower")
            and ({"group_size": 64, "bits": 8} if p == "language_model.lm_head" else True)
        ),
    )
    inputs = reference_inputs(str(src))
    expected = our_logits(model, inputs)
    out = tmp_path / "mixed"
    out.mkdir()
    save_weights(out, model, progress=False)
    config = json.loads((src / "config.json").read_text())
    quant = {"group_size": 64, "bits": 4, "mode": "affine", "language_model.lm_head": {"group_size": 64, "bits": 8}}
    save_config({**config, "quantization": quant, "quantization_config": quant}, out / "config.json")

    loaded = load_model(out)
    assert loaded.language_model.lm_head.bits == 8
    assert loaded.language_model.model.layers[0].mlp.down_proj.bits == 4
    assert isinstance(loaded.vision_tower.blocks[0].mlp.up_proj, nn.Linear)
    assert rel_err(our_logits(loaded, inputs), expected) < 1e-6


# ---------------------------------------------------------------- repo ids through the hub cache


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, ckpt):
    """A local hub cache holding `tiny-org/tiny-qwen2-vl` (refs/main -> one snapshot), offline."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-qwen2-vl"
    shutil.copytree(ckpt("qwen2_vl"), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name, value in (("HF_HOME", str(tmp_path)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / sha


def test_repo_id_resolves_through_offline_hub_cache(offline_hub, ckpt):
    model = load_model("tiny-org/tiny-qwen2-vl")
    ref = str(ckpt("qwen2_vl"))
    assert rel_err(our_logits(model, reference_inputs(ref)), reference_logits(ref)) < TOL
    assert load_model("tiny-org/tiny-qwen2-vl", revision=offline_hub.name) is not None


def test_load_returns_model_and_processor(offline_hub):
    pytest.importorskip("mlx_compact.processor")
    model, processor = load("tiny-org/tiny-qwen2-vl")
    assert model.config.model_type == "qwen2_vl" and processor is not None


def test_repo_id_missing_from_offline_cache(offline_hub):
    with pytest.raises(LoadError, match="not a local directory and could not be fetched"):
        load_model("tiny-org/not-there")


# ---------------------------------------------------------------- bad inputs


def test_path_does_not_exist(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere" / "at" / "all"))


def test_no_config_json(tmp_path):
    with pytest.raises(LoadError, match="no config.json.*qwen2_vl, qwen2_5_vl, qwen3_vl"):
        load_model(tmp_path)


def test_wrong_model_type(ckpt, tmp_path):
    path = copy_checkpoint(ckpt("qwen2_vl"), tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(LoadError, match="'llama' is not a supported Qwen-VL model.*qwen2_vl, qwen2_5_vl, qwen3_vl"):
        load_model(path)


def test_missing_shard(ckpt, tmp_path):
    path = copy_checkpoint(ckpt("qwen2_vl", layout="sharded"), tmp_path / "sharded")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoadError, match="shard model-00002-of-00002.safetensors is listed in .* but missing"):
        load_model(path)


def test_no_weights(ckpt, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    shutil.copy(ckpt("qwen2_vl") / "config.json", path)
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LoadError, match="no weights found.*pytorch_model.bin"):
        load_model(path)


def test_shape_disagrees_with_config(ckpt, tmp_path):
    path = copy_checkpoint(ckpt("qwen2_vl", dialect="flat44"), tmp_path / "wide")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(
        LoadError,
        match=r"tensor language_model\.model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
        r"\((128, 64|64, 128)\) in the checkpoint but config.json implies",
    ):
        load_model(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        ("drop", "lacks 1 tensors the config needs: language_model.model.norm.weight"),
        ("add", "has 1 tensors this model does not use: language_model.model.extra.weight"),
    ],
)
def test_missing_or_unexpected_tensor(ckpt, tmp_path, edit, message):
    path = copy_checkpoint(ckpt("qwen2_vl", layout="legacy"), tmp_path / edit)
    state = load_file(str(path / "model.safetensors"))
    if edit == "drop":
        del state["model.norm.weight"]
    else:
        state["model.extra.weight"] = np.ones((2, 2), np.float32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(LoadError, match=message):
        load_model(path)
