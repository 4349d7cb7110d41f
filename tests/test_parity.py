"""Stage-by-stage parity of our MLX models with transformers (torch CPU, fp32) on tiny random checkpoints.

A failure names the stage: vision features, DeepStack features, position ids, or logits.
"""

import glob
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from tiny_checkpoints import ARCHS, load_reference, make_checkpoint

import mlx_compact  # noqa: F401  (preloads BLAS before mlx)
from mlx_compact.models import build_model

TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    path = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    raw = json.loads((path / "config.json").read_text())
    model = build_model(raw)
    weights = {}
    for f in glob.glob(str(path / "*.safetensors")):
        weights.update(mx.load(f))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model, load_reference(path), raw


def pixel_rows(rng, grid, cfg, frames_differ=True):
    """Random pixel rows for merged-unit-major patches of the given (t, h, w) grids."""
    vc = cfg["vision_config"]
    width = 3 * vc.get("temporal_patch_size", 2) * vc["patch_size"] ** 2
    n = sum(t * h * w for t, h, w in grid)
    return rng.standard_normal((n, width)).astype(np.float32)


def prompt_ids(cfg, blocks, rng, text=5):
    """Token ids: text, then for each (token_id, count) a vision block, then text."""
    ids = list(rng.integers(10, 200, text))
    for tok, count in blocks:
        ids += [cfg["vision_start_token_id"]] + [tok] * count + [cfg["vision_end_token_id"]]
        ids += list(rng.integers(10, 200, text))
    return [int(i) for i in ids]


def run_reference(ref, ids, cfg, positions, **visual):
    kinds = np.zeros(len(ids), dtype=np.int64)
    kinds[np.array(ids) == cfg["image_token_id"]] = 1
    kinds[np.array(ids) == cfg["video_token_id"]] = 2
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor([ids]),
            mm_token_type_ids=torch.tensor(kinds[None]),
            position_ids=torch.tensor(np.asarray(positions, dtype=np.int64)[:, None, :]),
            **{k: torch.tensor(np.asarray(v)) for k, v in visual.items()},
        )
    return out.logits.numpy()


def test_vision_features_match_on_two_images_of_different_sizes(pair):
    model, ref, cfg = pair
    grid = [(1, 6, 10), (1, 8, 4)]  # patches; non-square, different sizes
    pv = pixel_rows(np.random.default_rng(0), grid, cfg)
    ours = model.encode(mx.array(pv), grid)
    with torch.no_grad():
        theirs = ref.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grid))
    assert rel_err(ours.features, theirs.pooler_output) < TOL, "vision features"
    ds = getattr(theirs, "deepstack_features", None) or []
    assert len(ours.deepstack) == len(ds)
    for i, d in enumerate(ds):
        assert rel_err(ours.deepstack[i], d) < TOL, f"DeepStack feature {i}"


def test_position_ids_match_reference_for_images(pair):
    model, ref, cfg = pair
    grid = [(1, 6, 10), (1, 8, 4)]
    ids = prompt_ids(cfg, [(cfg["image_token_id"], 15), (cfg["image_token_id"], 8)], np.random.default_rng(1))
    ours, delta = model.positions(ids, grid)
    kinds = (torch.tensor([ids]) == cfg["image_token_id"]).long()
    theirs, their_delta = ref.model.get_rope_index(torch.tensor([ids]), kinds, torch.tensor(grid), None)
    np.testing.assert_array_equal(np.array(ours), theirs[:, 0].numpy(), err_msg="position ids")
    assert delta == int(their_delta.reshape(-1)[0])


def test_logits_match_with_two_images(pair):
    model, ref, cfg = pair
    grid = [(1, 6, 10), (1, 8, 4)]
    rng = np.random.default_rng(2)
    pv = pixel_rows(rng, grid, cfg)
    ids = prompt_ids(cfg, [(cfg["image_token_id"], 15), (cfg["image_token_id"], 8)], rng)
    ours = np.array(model(mx.array([ids]), mx.array(pv), grid))
    positions, _ = model.positions(ids, grid)
    theirs = run_reference(ref, ids, cfg, positions, pixel_values=pv, image_grid_thw=grid)
    assert rel_err(ours, theirs) < TOL, "logits"


def test_logits_match_with_a_short_video_and_an_image(pair):
    model, ref, cfg = pair
    rng = np.random.default_rng(3)
    vgrid, igrid = [(2, 4, 6)], [(1, 4, 4)]
    pvv, pvi = pixel_rows(rng, vgrid, cfg), pixel_rows(rng, igrid, cfg)
    if model.model_type == "qwen3_vl":  # each temporal patch is its own block (timestamps are text)
        blocks = [(cfg["video_token_id"], 6), (cfg["video_token_id"], 6), (cfg["image_token_id"], 4)]
    else:
        blocks = [(cfg["video_token_id"], 12), (cfg["image_token_id"], 4)]
    ids = prompt_ids(cfg, blocks, rng)
    ours = np.array(
        model(mx.array([ids]), mx.array(pvi), igrid, pixel_values_videos=mx.array(pvv), video_grid_thw=vgrid)
    )
    positions, _ = model.positions(ids, igrid, vgrid)
    visual = dict(pixel_values=pvi, image_grid_thw=igrid, pixel_values_videos=pvv, video_grid_thw=vgrid)
    theirs = run_reference(ref, ids, cfg, positions, **visual)
    assert rel_err(ours, theirs) < TOL, "logits with video"


def test_text_only_logits_match(pair):
    model, ref, cfg = pair
    ids = [int(i) for i in np.random.default_rng(4).integers(10, 200, 17)]
    ours = np.array(model(mx.array([ids])))
    positions = [list(range(len(ids)))] * 3
    assert rel_err(ours, run_reference(ref, ids, cfg, positions)) < TOL
