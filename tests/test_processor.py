"""Processor parity with transformers (images), hand-derived video expectations, smart_resize, bad input."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny_checkpoints import ARCHS, TOKEN_IDS, load_reference_processor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as tf_smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as tf_smart_resize_video
from transformers.utils import is_torchvision_available

from mlx_compact.processor import Processor, smart_resize, smart_resize_video


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """arch -> (our Processor, transformers' processor)."""
    out = {}
    for arch in ARCHS:
        path = tiny_checkpoint(arch)
        out[arch] = (Processor.from_pretrained(path), load_reference_processor(path))
    return out


def _messages(n_images, n_videos=0, text="Describe."):
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _check_images(ours, ref, images, **kw):
    text = ours.build_prompt("Describe them.", len(images))
    assert text == ref.apply_chat_template(
        _messages(len(images), text="Describe them."), add_generation_prompt=True, tokenize=False
    )
    ref_kw = {}
    if kw:
        ref_kw["size"] = {
            "shortest_edge": kw.get("min_pixels") or ours.image.min_pixels,
            "longest_edge": kw.get("max_pixels") or ours.image.max_pixels,
        }
    want = ref(text=[text], images=images, return_tensors="np", **ref_kw)
    got = ours(text, images, **kw)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    assert got["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(got["grid_thw"], want["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("arch", ARCHS)
def test_single_images_match_transformers(arch, pair, image_wide, image_tall):
    ours, ref = pair[arch]
    for image in (image_wide, image_tall):
        got = _check_images(ours, ref, [image])
        n = int(np.prod(got["grid_thw"][0])) // 4
        assert (got["input_ids"] == ours.image_token_id).sum() == n
        assert ours.image_size_tokens(image.height, image.width) == n


@pytest.mark.parametrize("arch", ARCHS)
def test_two_images_match_transformers(arch, pair, images):
    got = _check_images(*pair[arch], images)
    assert got["grid_thw"].tolist()[0] != got["grid_thw"].tolist()[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_pixel_budget_override_matches_transformers(arch, pair):
    big = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    small = pair[arch][0].image.factor ** 2 * 12
    got = _check_images(*pair[arch], [big], max_pixels=small)
    assert int(np.prod(got["grid_thw"][0])) * pair[arch][0].image.patch_size ** 2 <= small


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "I;16"])
def test_modes_converted_like_transformers(pair, image_wide, mode):
    ours, ref = pair["qwen2_vl"]
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image_wide.convert("L")).astype(np.uint16) * 200)
    elif mode in ("RGBA", "LA"):
        image = image_wide.convert(mode)
        alpha = Image.fromarray(np.linspace(0, 255, 60 * 90).reshape(60, 90).astype(np.uint8))
        image.putalpha(alpha)
    else:
        image = image_wide.convert(mode)
    _check_images(ours, ref, [image])


def test_numpy_and_path_inputs(pair, image_wide, tmp_path):
    ours, _ = pair["qwen2_5_vl"]
    text = ours.build_prompt("x", 1)
    want = ours(text, [image_wide])
    path = tmp_path / "img.png"
    image_wide.save(path)
    for image in (np.asarray(image_wide), str(path), path):
        got = ours(text, [image])
        np.testing.assert_array_equal(got["pixel_values"], want["pixel_values"])
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def _video_expectation(ours, ref, frames, fps):
    """pixel_values_videos / video_grid_thw / prompt built from transformers' image processor on each frame."""
    arch = ours.model_type
    size = json.loads((ours.path / "video_preprocessor_config.json").read_text())["size"]
    lo, hi = size["shortest_edge"], size["longest_edge"]
    P = 16 if arch == "qwen3_vl" else 14
    if arch == "qwen3_vl":
        h, w = tf_smart_resize_video(
            len(frames),
            frames[0].height,
            frames[0].width,
            temporal_factor=2,
            factor=2 * P,
            min_pixels=lo,
            max_pixels=hi,
        )
    else:
        h, w = tf_smart_resize(frames[0].height, frames[0].width, 2 * P, lo, hi)
    resized = [f.resize((w, h), Image.Resampling.BICUBIC) for f in frames]
    resized += resized[-1:] * (len(resized) % 2)
    video_cfg = json.loads((ours.path / "video_preprocessor_config.json").read_text())
    per_frame = [
        ref.image_processor(
            images=[f],
            do_resize=False,
            image_mean=video_cfg["image_mean"],
            image_std=video_cfg["image_std"],
            return_tensors="np",
        )
        for f in resized
    ]
    grid = per_frame[0]["image_grid_thw"][0]
    n, C = int(np.prod(grid)), 3
    rows = []
    for t in range(len(resized) // 2):
        a = per_frame[2 * t]["pixel_values"].reshape(n, C, 2, P, P)[:, :, 0]  # [n, C, P, P]
        b = per_frame[2 * t + 1]["pixel_values"].reshape(n, C, 2, P, P)[:, :, 0]  # [n, C, P, P]
        rows.append(np.stack([a, b], axis=2).reshape(n, -1))  # [n, C*2*P*P]
    grid_thw = [len(resized) // 2, int(grid[1]), int(grid[2])]
    tokens_per_frame = grid_thw[1] * grid_thw[2] // 4
    if arch == "qwen3_vl":
        from transformers import Qwen3VLProcessor

        stamps = Qwen3VLProcessor._calculate_timestamps(None, list(range(len(frames))), fps, 2)
        pad = "".join(
            f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * tokens_per_frame + "<|vision_end|>" for s in stamps
        )
    else:
        pad = "<|video_pad|>" * (tokens_per_frame * grid_thw[0])
    return np.concatenate(rows), grid_thw, pad


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_frames", [4, 5])
def test_video_hand_derived(arch, n_frames, pair, video_frames):
    ours, ref = pair[arch]
    frames = (video_frames * 2)[:n_frames]
    text = ours.build_prompt("What happens?", 0, 1)
    assert text == ref.apply_chat_template(_messages(0, 1, "What happens?"), add_generation_prompt=True, tokenize=False)
    got = ours(text, videos=[frames], video_fps=2.0)
    pixels, grid, pad = _video_expectation(ours, ref, frames, fps=2.0)
    assert got["video_grid_thw"].tolist() == [grid]
    np.testing.assert_allclose(got["pixel_values_videos"], pixels, atol=1e-5, rtol=0)
    ids = ref.tokenizer(text.replace("<|video_pad|>", pad), add_special_tokens=False)["input_ids"]
    assert got["input_ids"][0].tolist() == ids
    assert got["second_per_grid_ts"] == [1.0]


@pytest.mark.skipif(not is_torchvision_available(), reason="transformers' video processors need torchvision")
@pytest.mark.parametrize("arch", ARCHS)
def test_video_matches_transformers(arch, pair, video_frames):
    ours, ref = pair[arch]
    text = ours.build_prompt("What happens?", 0, 1)
    want = ref(text=[text], videos=[video_frames], return_tensors="np", do_sample_frames=False)
    got = ours(text, videos=[video_frames], video_fps=24.0)
    np.testing.assert_array_equal(got["video_grid_thw"], want["video_grid_thw"])
    np.testing.assert_allclose(got["pixel_values_videos"], want["pixel_values_videos"], atol=2 / 255 / 0.26)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"])


def test_images_and_video_together(pair, images, video_frames):
    ours, _ = pair["qwen2_5_vl"]
    text = ours.build_prompt("Both.", 2, 1)
    got = ours(text, images, videos=[video_frames])
    ids = got["input_ids"][0]
    assert (ids == ours.image_token_id).sum() == got["grid_thw"].prod(axis=1).sum() // 4
    assert (ids == ours.video_token_id).sum() == got["video_grid_thw"].prod(axis=1).sum() // 4


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 5000),
    w=st.integers(1, 5000),
    factor=st.sampled_from([28, 32]),
    min_pixels=st.integers(1, 200_000),
    max_pixels=st.integers(1, 20_000_000),
)
def test_smart_resize_matches_transformers(h, w, factor, min_pixels, max_pixels):
    try:
        want = tf_smart_resize(h, w, factor, min_pixels, max_pixels)
    except ValueError:
        with pytest.raises(ValueError):
            smart_resize(h, w, factor, min_pixels, max_pixels)
        return
    assert smart_resize(h, w, factor, min_pixels, max_pixels) == want


@settings(max_examples=200, deadline=None)
@given(
    t=st.integers(2, 64),
    h=st.integers(1, 3000),
    w=st.integers(1, 3000),
    min_pixels=st.integers(1, 500_000),
    max_pixels=st.integers(1, 50_000_000),
)
def test_smart_resize_video_matches_transformers(t, h, w, min_pixels, max_pixels):
    args = dict(temporal_factor=2, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
    try:
        want = tf_smart_resize_video(t, h, w, **args)
    except ValueError:
        with pytest.raises(ValueError):
            smart_resize_video(t, h, w, **args)
        return
    assert smart_resize_video(t, h, w, **args) == want


@pytest.mark.parametrize("arch", ARCHS)
def test_image_size_tokens_matches_transformers(arch, pair):
    ours, ref = pair[arch]
    for h, w in [(60, 90), (1080, 1920), (3024, 4032), (10, 1000), (28, 28)]:
        want = ref.image_processor.get_number_of_image_patches(h, w) // 4
        assert ours.image_size_tokens(h, w) == want
    assert ours.image_size_tokens(1080, 1920, max_pixels=28 * 28 * 16) <= 16


def test_placeholder_count_mismatch(pair, images):
    ours, _ = pair["qwen2_vl"]
    with pytest.raises(ValueError, match="placeholder"):
        ours(ours.build_prompt("x", 1), images)
    with pytest.raises(ValueError, match="placeholder"):
        ours(ours.build_prompt("x", 2), images[:1])
    with pytest.raises(ValueError, match="placeholder"):
        ours(ours.build_prompt("x", 0), videos=[images])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.uint8), np.zeros((2, 8, 8, 3), np.uint8), 3.0],
)
def test_bad_images_raise(pair, bad):
    ours, _ = pair["qwen2_vl"]
    with pytest.raises(ValueError):
        ours(ours.build_prompt("x", 1), [bad])


def test_batch_of_texts_refused(pair):
    ours, _ = pair["qwen2_vl"]
    with pytest.raises(ValueError, match="one prompt"):
        ours(["a", "b"])
    assert ours(["a"])["input_ids"].shape == (1, 1)


def test_config_values(pair):
    for arch in ARCHS:
        ours, ref = pair[arch]
        assert ours.image_token_id == TOKEN_IDS["<|image_pad|>"] == ref.image_token_id
        assert ours.video_token_id == TOKEN_IDS["<|video_pad|>"]
        assert ours.vision_start_token_id == TOKEN_IDS["<|vision_start|>"]
        assert ours.vision_end_token_id == TOKEN_IDS["<|vision_end|>"]
        assert ours.eos_token_ids == sorted({TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]})
        assert ours.spatial_merge_size == 2
        assert ours.tokens_per_second == 2.0
        assert ours.image.patch_size == (16 if arch == "qwen3_vl" else 14)


def test_ids_are_read_from_config(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2_5_vl", dialect="flat44")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" in cfg
    cfg["image_token_id"] = 250
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Processor.from_pretrained(tmp_path).image_token_id == 250


def test_decode_and_templates(pair):
    ours, ref = pair["qwen3_vl"]
    text = ours.apply_chat_template([{"role": "user", "content": "hello there"}])
    assert text == ref.apply_chat_template(
        [{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=False
    )
    ids = ours(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert "hello there" in ours.decode(ids)
    assert "<|im_start|>" not in ours.decode(ids)
