"""get_rope_index / visual_spans against transformers (images, Qwen3-VL video) and hand-derived cases."""

import ast
import inspect

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_checkpoints import ARCHS, TOKEN_IDS, load_reference

from mlx_compact.models import rope_index
from mlx_compact.models.rope_index import get_rope_index, visual_spans

IMG, VID = TOKEN_IDS["<|image_pad|>"], TOKEN_IDS["<|video_pad|>"]
VS, VE = TOKEN_IDS["<|vision_start|>"], TOKEN_IDS["<|vision_end|>"]
IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, spatial_merge_size=2)


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    return {arch: load_reference(tiny_checkpoint(arch)) for arch in ARCHS}


def _block(token, grid, merge=2):
    t, h, w = grid
    return [VS] + [token] * (t * h * w // merge**2) + [VE]


def _transformers_rope(model, ids, image_grids, video_grids):
    input_ids = torch.tensor([ids])
    types = torch.tensor([[1 if i == IMG else 2 if i == VID else 0 for i in ids]])
    pos, delta = model.model.get_rope_index(
        input_ids=input_ids,
        mm_token_type_ids=types,
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None,
        attention_mask=torch.ones_like(input_ids),
    )
    return pos[:, 0].tolist(), int(delta.reshape(-1)[0])


def test_pure_python():
    from mlx_compact.models import config

    def imports(module):
        tree = ast.parse(inspect.getsource(module))
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        return found | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert imports(rope_index) <= {"typing", "collections.abc", "config"}  # model types: models.config, pure Python
    assert imports(config) <= {"json", "math", "dataclasses", "typing", "collections.abc"}


def test_text_only():
    pos, delta = get_rope_index(
        [7, 8, 9],
        [],
        [],
        model_type="qwen2_vl",
        video_token_id=VID,
        image_token_id=IMG,
        vision_start_token_id=VS,
        spatial_merge_size=2,
    )
    assert pos == [[0, 1, 2]] * 3 and delta == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_images_match_transformers(arch, references):
    grids = [[1, 4, 6], [1, 8, 2]]  # non-square, different sizes
    ids = [1, 20, 21] + _block(IMG, grids[0]) + [30, 31] + _block(IMG, grids[1]) + [40, 41, 42, 2]
    want = _transformers_rope(references[arch], ids, grids, None)
    got = get_rope_index(ids, [tuple(g) for g in grids], [], model_type=arch, **IDS)
    assert got == want


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arch=st.sampled_from(ARCHS),
    texts=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    grids=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3),
)
def test_images_random_match_transformers(references, arch, texts, grids):
    grids = [[1, 2 * h, 2 * w] for h, w in grids]
    ids = list(range(100, 100 + texts[0]))
    for i, g in enumerate(grids):
        ids += _block(IMG, g) + list(range(110, 110 + texts[(i + 1) % len(texts)]))
    want = _transformers_rope(references[arch], ids, grids, None)
    assert get_rope_index(ids, grids, [], model_type=arch, **IDS) == want


def test_qwen3_video_matches_transformers(references):
    # Qwen3-VL: every temporal patch is its own block, separated by timestamp text
    grid = [3, 4, 6]
    ids = [1, 20]
    for t in range(grid[0]):
        ids += [50 + t, 51] + _block(VID, [1, 4, 6])
    ids += [60, 2]
    want = _transformers_rope(references["qwen3_vl"], ids, None, [grid])
    assert get_rope_index(ids, [], [grid], model_type="qwen3_vl", **IDS) == want


def _hand_video(t_index):
    """Text 'a b' <vs> video merged (3, 2, 3) <ve> 'c': text after the block starts at max(block) + 1."""
    ids = [10, 11] + _block(VID, (3, 4, 6)) + [12]
    cur = 3  # a=0, b=1, <vs>=2
    rows = [[0, 1, 2], [0, 1, 2], [0, 1, 2]]
    for ti in range(3):
        for hi in range(2):
            for wi in range(3):
                rows[0].append(cur + t_index[ti])
                rows[1].append(cur + hi)
                rows[2].append(cur + wi)
    nxt = cur + max(t_index[-1], 1, 2) + 1
    rows = [r + [nxt, nxt + 1] for r in rows]  # <ve>, c
    return ids, rows, nxt + 2 - len(ids)


@pytest.mark.parametrize(
    "arch, second_per_grid_t, t_index",
    [
        ("qwen2_vl", None, [0, 1, 2]),
        ("qwen2_5_vl", 1.0, [0, 2, 4]),  # 2 tokens per second
        ("qwen2_5_vl", 0.5, [0, 1, 2]),
        ("qwen2_5_vl", 0.75, [0, 1, 3]),  # int(1.5) = 1
        ("qwen2_5_vl", 2.0, [0, 4, 8]),
    ],
)
def test_qwen2_video_hand_derived(arch, second_per_grid_t, t_index):
    ids, rows, delta = _hand_video(t_index)
    spg = None if second_per_grid_t is None else [second_per_grid_t]
    got = get_rope_index(ids, [], [(3, 4, 6)], model_type=arch, tokens_per_second=2, second_per_grid_ts=spg, **IDS)
    assert got == (rows, delta)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_short_video_matches_transformers(arch, references):
    # where max(h, w) covers the temporal extent, transformers 5.23 agrees with the 4.57 rule
    grid = [2, 4, 8]
    ids = [1, 20] + _block(VID, grid) + [30, 2]
    want = _transformers_rope(references[arch], ids, None, [grid])
    assert get_rope_index(ids, [], [grid], model_type=arch, second_per_grid_ts=[1.0], **IDS) == want


def test_image_then_video_then_text():
    ids = [9] + _block(IMG, (1, 2, 4)) + _block(VID, (2, 2, 2)) + [9]
    pos, delta = get_rope_index(ids, [(1, 2, 4)], [(2, 2, 2)], model_type="qwen2_vl", **IDS)
    # 9 <vs>=1 | image at 2: (2,2,2),(2,2,3) | <ve>=4 <vs>=5 | video at 6: t 6,7 | <ve>=8 9
    assert pos == [
        [0, 1, 2, 2, 4, 5, 6, 7, 8, 9],
        [0, 1, 2, 2, 4, 5, 6, 6, 8, 9],
        [0, 1, 2, 3, 4, 5, 6, 6, 8, 9],
    ]
    assert delta == 0


def test_numpy_grids_from_processor(tiny_checkpoint, image_wide, video_frames):
    from mlx_compact.processor import Processor

    proc = Processor.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    out = proc(proc.build_prompt("x", 1, 1), [image_wide], videos=[video_frames])
    pos, delta = get_rope_index(
        out["input_ids"][0].tolist(),
        out["grid_thw"],
        out["video_grid_thw"],
        model_type="qwen2_5_vl",
        second_per_grid_ts=out["second_per_grid_ts"],
        **IDS,
    )
    assert len(pos[0]) == out["input_ids"].shape[1] and delta < 0


def test_visual_spans():
    ids = [9] + _block(IMG, (1, 2, 4)) + [9, 9] + _block(VID, (2, 4, 2))
    spans = visual_spans(
        ids, [(1, 2, 4)], [(2, 4, 2)], model_type="qwen2_5_vl", tokens_per_second=2, second_per_grid_ts=[0.5], **IDS
    )
    assert [(s.kind, s.item, s.start, s.length, s.grid, s.t_index) for s in spans] == [
        ("image", 0, 2, 2, (1, 1, 2), (0,)),
        ("video", 0, 8, 4, (2, 2, 1), (0, 1)),
    ]
    q3 = visual_spans([VS, VID, VID, VE, 7, VS, VID, VID, VE], [], [(2, 2, 4)], model_type="qwen3_vl", **IDS)
    assert [(s.kind, s.item, s.start, s.length) for s in q3] == [("video", 0, 1, 2), ("video", 0, 6, 2)]


@pytest.mark.parametrize(
    "ids, images",
    [
        ([VS, IMG, IMG, VE], []),  # tokens without a grid
        ([VS, IMG, VE], [(1, 2, 4)]),  # too few tokens
        ([1, 2], [(1, 2, 2)]),  # grid without tokens
        ([IMG, VE], [(1, 2, 2)]),  # no vision_start
    ],
)
def test_mismatch_raises(ids, images):
    with pytest.raises(ValueError):
        get_rope_index(ids, images, [], model_type="qwen2_vl", **IDS)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="model_type"):
        get_rope_index([1], [], [], model_type="llava", **IDS)
