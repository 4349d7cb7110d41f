"""Videos through the runtime: `mlx_compact.video` (lists, folders of frames, PyAV files), generate / chat / the
CLI with videos against the model's own forward pass (and transformers'), per-slice compaction, the memory plan,
and the refusals (missing PyAV, FIFOs, folders with subfolders, corrupt files, absurd sizes)."""

import json
import os
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoints import ARCHS, load_reference

from mlx_compact import cli
from mlx_compact.chat import ChatSession
from mlx_compact.compaction import Compaction
from mlx_compact.files import InputError
from mlx_compact.generate import generate, plan_run, prepare_ids, video_patches
from mlx_compact.loader import load
from mlx_compact.memory import MemoryPlanError
from mlx_compact.video import MISSING_PYAV, even_indices, load_video, open_video, sample_count

try:
    import av
except ImportError:  # the [video] extra is not installed: the file cases are skipped, the rest still run
    av = None

needs_av = pytest.mark.skipif(av is None, reason="PyAV (the [video] extra) is not installed")
PROMPT = "what happens?"


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load(str(tiny_checkpoint(arch)))
        return cache[arch]

    return get


@pytest.fixture
def folder(tmp_path, video_frames):
    """The 4 test frames as PNG files (lossless: the model sees exactly `video_frames`)."""
    d = tmp_path / "frames"
    d.mkdir()
    for i, f in enumerate(video_frames):
        f.save(d / f"frame{i + 1}.png")
    return d


def write_mp4(path, frames, rate=4, rotation=None):
    """Frames (HWC uint8 arrays) as an MPEG-4 file written by PyAV."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=rate)
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def decode_all(path):
    """Every frame of a file, decoded by PyAV directly (the reference for the sampling)."""
    with av.open(str(path)) as c:
        return [f.to_image() for f in c.decode(c.streams.video[0])]


def visual_free(proc, tokens) -> list:
    """``tokens`` up to and including the first image / video pad token (the tiny random models do generate
    them): beyond it a full forward pass would read the prompt as holding one more visual block."""
    pads = {proc.image_token_id, proc.video_token_id}
    cut = next((i + 1 for i, t in enumerate(tokens) if t in pads), len(tokens))
    return list(tokens[:cut])


def reference_tokens(model, proc, text, frames, fps, n, images=(), ids=None):
    """Greedy tokens from the model's own full forward pass (no cache, no prepare_ids) on the processor's output
    (``ids``: these token ids instead of the text's), up to the first visual pad token generated (`visual_free`)."""
    inputs = proc(text=text, images=list(images) or None, videos=[frames], video_fps=fps)
    ids = [int(i) for i in inputs["input_ids"][0]] if ids is None else list(ids)
    extra = {}
    if images:
        extra = dict(pixel_values=mx.array(inputs["pixel_values"]), grid_thw=inputs["grid_thw"].tolist())
    out = []
    for _ in range(n):
        logits = model(
            mx.array([ids + out]),
            pixel_values_videos=mx.array(inputs["pixel_values_videos"]),
            video_grid_thw=inputs["video_grid_thw"].tolist(),
            second_per_grid_ts=inputs["second_per_grid_ts"],
            **extra,
        )
        tok = int(mx.argmax(logits[0, -1]).item())
        if tok in proc.eos_token_ids:
            break
        out.append(tok)
        if tok in (proc.image_token_id, proc.video_token_id):
            break
    return out, inputs


def slices(model, inputs) -> int:
    """Visual blocks of the (one) video: its temporal slices on Qwen3-VL, one block otherwise."""
    t = int(inputs["video_grid_thw"][0][0])
    return t if model.model_type.startswith("qwen3") else 1


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "total, rate, fps, max_frames, want",
    [
        (8, 4, 2.0, 768, 4),  # 2 s at 2 fps
        (300, 30, 2.0, 768, 20),  # 10 s at 2 fps
        (300, 30, 0.5, 768, 4),  # 5 frames asked for: rounded down to the temporal patch, at least MIN_FRAMES
        (30, 30, 2.0, 768, 4),  # 1 s: 2 frames asked for, MIN_FRAMES given
        (3, 30, 2.0, 768, 2),  # fewer frames than MIN_FRAMES: all it has, rounded down to the patch
        (1, 30, 2.0, 768, 1),  # a single frame (repeated to the temporal patch at decode)
        (100_000, 30, 2.0, 768, 768),  # the cap
        (100_000, 30, 2.0, 7, 6),  # a cap rounded down to the patch
    ],
)
def test_frame_count_is_qwen_vl_utils_smart_nframes(total, rate, fps, max_frames, want):
    assert sample_count(total, rate, fps, max_frames) == want


def test_a_list_is_used_as_given_and_subsampled_evenly_beyond_max_frames(video_frames):
    frames, fps = load_video(video_frames)
    assert [np.asarray(f).tobytes() for f in frames] == [np.asarray(f).tobytes() for f in video_frames]
    assert fps == 2.0
    ten = [np.full((8, 8, 3), i, np.uint8) for i in range(10)]
    frames, fps = load_video(ten, fps=5.0, max_frames=4)
    assert [int(np.asarray(f)[0, 0, 0]) for f in frames] == even_indices(10, 4) == [0, 3, 6, 9]
    assert fps == pytest.approx(5.0 * 4 / 10)  # the rate the kept frames stand for


def test_a_folder_is_read_in_natural_name_order_without_pyav(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # folders need nothing extra
    for i in (1, 2, 10):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"f{i}.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames, fps = load_video(tmp_path)
    assert [f.getpixel((0, 0))[0] for f in frames] == [1, 2, 10] and fps == 2.0


@needs_av
def test_a_video_file_is_sampled_at_fps_from_its_stream_metadata(tmp_path):
    src = [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(8)]
    path = write_mp4(tmp_path / "clip.mp4", src, rate=4)
    v = open_video(path)
    assert (v.total, v.rate, v.height, v.width) == (8, 4.0, 48, 64)
    assert v.indices == [0, 2, 5, 7] and v.fps == 2.0  # 2 s at 2 fps; 4 of 8 frames stand for 2 per second
    frames, fps = load_video(path)
    every = decode_all(path)
    assert [np.asarray(f).tobytes() for f in frames] == [np.asarray(every[i]).tobytes() for i in (0, 2, 5, 7)]
    frames, fps = load_video(path, fps=4.0, max_frames=6)
    assert len(frames) == 6 and fps == pytest.approx(3.0)


@needs_av
def test_a_rotated_video_is_turned_upright(tmp_path):
    a = np.zeros((48, 64, 3), np.uint8)
    a[:8, :16] = 255  # a white block top left
    path = write_mp4(tmp_path / "phone.mp4", [a] * 4, rotation=90)
    v = open_video(path)
    assert (v.width, v.height, v.rotation) == (48, 64, 90)
    frame = np.asarray(load_video(path)[0][0])[..., 0]
    assert frame.shape == (64, 48)
    assert frame[-6:, :6].mean() > 200 and frame[:6, :6].mean() < 50  # counterclockwise: top left -> bottom left


# ---------------------------------------------------------------- generate equals the model's own forward


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", ["frames", "folder", "mp4"])
def test_generate_on_a_video_equals_the_models_forward(arch, source, loaded, video_frames, folder, tmp_path):
    model, proc = loaded(arch)
    fps = 2.0
    if source == "frames":
        video, frames, fps = video_frames, video_frames, 1.0  # Qwen2.5-VL positions and Qwen3-VL timestamps move
    elif source == "folder":
        video, frames = folder, video_frames
    else:
        if av is None:
            pytest.skip("PyAV (the [video] extra) is not installed")
        video = write_mp4(tmp_path / "clip.mp4", [np.asarray(f) for f in video_frames * 2], rate=4)
        frames = [decode_all(video)[i] for i in (0, 2, 5, 7)]  # 8 frames at 4 fps, sampled at 2 fps
    result = generate(model, proc, PROMPT, videos=[video], fps=fps if source == "frames" else None, max_tokens=6)
    text = proc.build_prompt(PROMPT, n_videos=1)
    expected, inputs = reference_tokens(model, proc, text, frames, fps, 6)
    assert len(expected) >= 3 and result.tokens[: len(expected)] == expected == visual_free(proc, result.tokens)
    s = result.stats
    n = int(np.prod(inputs["video_grid_thw"][0])) // 4
    assert len(s["visual_tokens"]) == slices(model, inputs) and sum(v["before"] for v in s["visual_tokens"]) == n
    assert s["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert s["image_decode_bytes"] == 4 * 48 * 64 * 3  # the decoded frames


@pytest.mark.parametrize("arch", ARCHS)
def test_an_image_and_a_video_together_equal_the_models_forward(arch, loaded, image_wide, video_frames):
    model, proc = loaded(arch)
    result = generate(model, proc, PROMPT, [image_wide], videos=[video_frames], max_tokens=5)
    text = proc.build_prompt(PROMPT, n_images=1, n_videos=1)
    expected, _ = reference_tokens(model, proc, text, video_frames, 2.0, 5, images=[image_wide])
    assert len(expected) >= 3 and result.tokens[: len(expected)] == expected == visual_free(proc, result.tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_one_frame_video_repeats_its_frame_to_the_temporal_patch(arch, loaded, video_frames):
    model, proc = loaded(arch)
    frames, fps = load_video(video_frames[:1])
    assert len(frames) == 2 and frames[0] is frames[1]  # Qwen3-VL's video resize refuses fewer than 2
    result = generate(model, proc, PROMPT, videos=[video_frames[:1]], max_tokens=3)
    expected, inputs = reference_tokens(model, proc, proc.build_prompt(PROMPT, n_videos=1), frames, fps, 3)
    assert int(inputs["video_grid_thw"][0][0]) == 1 and len(result.stats["visual_tokens"]) == 1
    assert result.tokens[: len(expected)] == expected == visual_free(proc, result.tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_on_a_video_matches_transformers(arch, loaded, tiny_checkpoint, video_frames):
    """Teacher-forced: transformers' logits over the prompt and our greedy answer pick our tokens."""
    model, proc = loaded(arch)
    result = generate(model, proc, PROMPT, videos=[video_frames], max_tokens=5)
    inputs = proc(text=proc.build_prompt(PROMPT, n_videos=1), videos=[video_frames])
    ids = [int(i) for i in inputs["input_ids"][0]]
    answer = visual_free(proc, result.tokens)
    seq = ids + answer[:-1]
    grid = inputs["video_grid_thw"].tolist()
    positions, _ = model.positions(seq, [], grid, inputs["second_per_grid_ts"])
    kinds = (np.array(seq) == proc.video_token_id).astype(np.int64) * 2
    ref = load_reference(tiny_checkpoint(arch))
    with torch.no_grad():
        logits = (
            ref(
                input_ids=torch.tensor([seq]),
                mm_token_type_ids=torch.tensor(kinds[None]),
                position_ids=torch.tensor(np.asarray(positions, np.int64)[:, None, :]),
                pixel_values_videos=torch.tensor(inputs["pixel_values_videos"]),
                video_grid_thw=torch.tensor(grid),
            )
            .logits[0]
            .numpy()
        )
    assert len(answer) >= 3 and logits[len(ids) - 1 :].argmax(-1).tolist() == answer


# ---------------------------------------------------------------- compaction per temporal slice


@pytest.mark.parametrize("arch", ARCHS)
def test_compaction_on_a_video_counts_each_temporal_slice(arch, loaded, video_frames):
    model, proc = loaded(arch)
    full = generate(model, proc, PROMPT, videos=[video_frames], max_tokens=2).stats
    comp = generate(
        model, proc, PROMPT, videos=[video_frames], max_tokens=2, compaction=Compaction("diversity", keep=0.5)
    ).stats
    before = [v["before"] for v in full["visual_tokens"]]
    assert [v["before"] for v in comp["visual_tokens"]] == before
    assert len(before) == (2 if arch == "qwen3_vl" else 1)  # Qwen3-VL: one entry (own budget) per slice
    assert [v["after"] for v in comp["visual_tokens"]] == [round(b / 2) for b in before]
    assert comp["prompt_tokens"] == full["prompt_tokens"] - sum(b - round(b / 2) for b in before)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_fixed_size_cache_takes_a_video_that_fits_once_compacted(arch, loaded):
    """The cache-size check counts the compacted video (per slice on Qwen3-VL): a cache one slot shorter than
    the full prompt refuses the full video and takes the compacted one."""
    model, proc = loaded(arch)
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (192, 256, 3), np.uint8)) for i in range(4)]
    keep = Compaction("diversity", keep=0.25)
    full = generate(model, proc, PROMPT, videos=[frames], max_tokens=1).stats["prompt_tokens"]
    small = generate(model, proc, PROMPT, videos=[frames], max_tokens=1, compaction=keep).stats["prompt_tokens"]
    assert small < full - 16
    with pytest.raises(InputError, match=f"the prompt is {full} tokens but the cache holds {full - 1}"):
        generate(model, proc, PROMPT, videos=[frames], max_tokens=1, max_kv_size=full - 1)
    stats = generate(model, proc, PROMPT, videos=[frames], max_tokens=2, max_kv_size=full - 1, compaction=keep).stats
    assert stats["prompt_tokens"] == small and stats["kv_evicted_tokens"] == 0


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("where", ["post", "encoder"])
def test_kept_video_rows_stay_inside_their_own_slice(arch, where, loaded, video_frames):
    """Each kept row of the compact prompt is a video token of its own block in the full prompt, in order, and
    its position is that row's full position (the in-encoder units of a Qwen3-VL video split per slice)."""
    model, proc = loaded(arch)
    inputs = proc(text=proc.build_prompt(PROMPT, n_videos=1), videos=[video_frames])
    ids = [int(i) for i in inputs["input_ids"][0]]
    args = dict(
        pixel_values_videos=inputs["pixel_values_videos"],
        video_grid=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
    )
    full = prepare_ids(model, ids, **args)
    comp = prepare_ids(model, ids, compaction=Compaction("diversity", keep=0.5, where=where), **args)
    runs = model.visual_runs(ids)
    kept = np.asarray(comp.kept)
    video_rows = [r for r in kept if ids[r] == proc.video_token_id]
    assert len(video_rows) == sum(v["after"] for v in comp.visual_tokens) < len(full.input_ids)
    for (start, n, _), v in zip(runs, comp.visual_tokens):
        inside = [r for r in video_rows if start <= r < start + n]
        assert len(inside) == v["after"] > 0
    assert (np.diff(kept) > 0).all()
    np.testing.assert_array_equal(np.array(comp.positions), np.array(full.positions)[:, :, kept])


# ---------------------------------------------------------------- chat and the memory plan


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_with_a_video_then_a_follow_up_equals_the_whole_conversation(arch, loaded, video_frames):
    """The follow-up's tokens equal the full forward over the whole conversation's token ids (the first turn's,
    its answer as generated, the second turn's): positions continue after the video."""
    model, proc = loaded(arch)
    chat = ChatSession(model, proc)
    text1 = chat.turn_text(PROMPT, n_videos=1)
    first = chat.ask(PROMPT, videos=[video_frames], max_tokens=4)
    assert len(first.stats["visual_tokens"]) == (2 if arch == "qwen3_vl" else 1)
    assert visual_free(proc, first.tokens) == first.tokens  # else the full forward would misread the history
    closed = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")] if chat.cache.closed else []
    text2 = chat.turn_text("and then?")
    second = chat.ask("and then?", max_tokens=4)
    assert second.stats["visual_tokens"] == []  # the video is encoded once, in its own turn
    ids1 = [int(i) for i in proc(text=text1, videos=[video_frames])["input_ids"][0]]
    ids = ids1 + first.tokens + closed + proc.tokenizer(text2, add_special_tokens=False)["input_ids"]
    expected, _ = reference_tokens(model, proc, text1, video_frames, 2.0, 4, ids=ids)
    assert len(expected) >= 2 and second.tokens[: len(expected)] == expected == visual_free(proc, second.tokens)
    assert chat.cache.messages[0]["content"][0] == {"type": "video"}


def test_the_plan_counts_the_video_tokens_and_refuses_what_does_not_fit(loaded, video_frames):
    model, proc = loaded("qwen2_vl")
    video = open_video(video_frames)
    stats = generate(model, proc, PROMPT, videos=[video], max_tokens=2).stats
    assert [p // 4 for p in video_patches(proc, [video])] == [v["before"] for v in stats["visual_tokens"]]
    with_video = plan_run(model, proc, PROMPT, [], videos=[video])
    assert with_video.visual_tokens == [stats["visual_tokens"][0]["before"]]
    assert with_video.decode >= 4 * 48 * 64 * 3 and with_video.tokens > plan_run(model, proc, PROMPT, []).tokens
    budget = with_video.weights + with_video.kv  # far too little for the run
    with pytest.raises(MemoryPlanError, match="fewer video frames"):
        generate(model, proc, PROMPT, videos=[video_frames], max_tokens=2, memory_budget=budget)


def test_a_decode_beyond_the_budget_is_refused_before_decoding(folder, monkeypatch):
    from mlx_compact import images

    def never(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(images.ImageFile, "decode", never)
    with pytest.raises(InputError, match=r"decoding 4 frames of 64x48 pixels takes about .* --fps / --max-frames"):
        open_video(folder, budget=4 * 64 * 48 * 3 - 1)


# ---------------------------------------------------------------- the CLI


def _main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_with_a_folder_of_frames(tiny_checkpoint, loaded, folder, video_frames, capsys):
    path = tiny_checkpoint("qwen3_vl")
    code, out, err = _main(
        ["generate", "--model", path, "--prompt", PROMPT, "--video", folder, "--max-tokens", 4, "--stats", "json"],
        capsys,
    )
    assert code == 0, err
    got = json.loads(out)
    model, proc = loaded("qwen3_vl")
    want = generate(model, proc, PROMPT, videos=[video_frames], max_tokens=4)
    assert got["text"] == want.text and got["visual_tokens"] == want.stats["visual_tokens"]
    assert len(got["visual_tokens"]) == 2  # two temporal slices


def test_cli_chat_attaches_a_video_with_a_command(tiny_checkpoint, folder, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {folder}\n{PROMPT}\nand then?\n"))
    code, out, err = _main(
        ["chat", "--model", tiny_checkpoint("qwen2_vl"), "--max-tokens", 3, "--stats", "json"], capsys
    )
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert "attached to the next question" in err
    assert [len(a["visual_tokens"]) for a in answers] == [1, 0]


def test_cli_plan_with_a_video_equals_the_plan_and_what_generate_uses(tiny_checkpoint, loaded, folder, capsys):
    path = tiny_checkpoint("qwen2_vl")
    code, out, err = _main(["plan", "--model", path, "--prompt", PROMPT, "--video", folder, "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    model, proc = loaded("qwen2_vl")
    want = plan_run(model, proc, PROMPT, [], videos=[open_video(folder)])
    assert (got["peak"], got["kv"], got["decode"], got["tokens"]) == (want.peak, want.kv, want.decode, want.tokens)
    used = generate(model, proc, PROMPT, videos=[folder], max_tokens=2).stats["visual_tokens"]
    assert got["images"] == [] and len(got["videos"]) == 1
    v = got["videos"][0]
    assert (v["frames"], v["width"], v["height"]) == (4, 64, 48)
    assert v["visual_tokens"] == v["kept"] == used[0]["before"]
    code, out, err = _main(["plan", "--model", path, "--video", folder, "--keep", "0.5"], capsys)
    assert code == 0, err
    assert f"4 frames of 64x48 px -> {used[0]['before']} visual tokens, " in out


@pytest.mark.parametrize("flag, value", [("--fps", "0"), ("--fps", "nan"), ("--max-frames", "0")])
def test_cli_bad_video_options_are_one_line_and_exit_2(flag, value, folder, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--prompt", "x", "--video", str(folder), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and flag in err


# ---------------------------------------------------------------- refusals


def test_missing_pyav_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 64)
    with pytest.raises(InputError) as e:
        open_video(clip)
    assert str(e.value) == MISSING_PYAV and "pip install 'mlx-compact[video]'" in MISSING_PYAV
    code, _, err = _main(["generate", "--prompt", "x", "--video", clip], capsys)
    assert code == 2 and err.strip().splitlines() == [f"mlx-compact generate: error: {MISSING_PYAV}"]


def _fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    path = tmp_path / "clip.mp4"
    os.mkfifo(path)
    return path


def _subfolder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "more").mkdir()
    return tmp_path


def _fifo_inside(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _fifo(tmp_path)
    return tmp_path


def _mixed_sizes(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "b.png")
    return tmp_path


def _empty(tmp_path):
    (tmp_path / "notes.txt").write_text("no frames")
    return tmp_path


def _corrupt_frame(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path


@pytest.mark.parametrize(
    "make, message",
    [
        (_fifo, "is not a regular file"),
        (_subfolder, "holds a subfolder more"),
        (_fifo_inside, "clip.mp4 is not a regular file"),
        (_mixed_sizes, "b.png is 8x6 pixels"),
        (_empty, "holds no image files"),
        (_corrupt_frame, "cannot read image"),
        (lambda p: p / "nope.mp4", "video not found"),
    ],
)
def test_hostile_videos_are_refused_in_one_line(make, message, tmp_path, capsys):
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as e:
        open_video(path)
    assert "\n" not in str(e.value) and (str(path) in str(e.value) or path.name in str(e.value))
    code, _, err = _main(["generate", "--prompt", "x", "--video", path], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


@needs_av
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_video_file_is_refused_in_one_line(damage, tmp_path, video_frames):
    good = write_mp4(tmp_path / "good.mp4", [np.asarray(f) for f in video_frames], rate=4)
    bad = tmp_path / "bad.mp4"
    data = good.read_bytes()
    bad.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read video .*bad.mp4") as e:
        load_video(bad)
    assert "\n" not in str(e.value)


@needs_av
def test_a_frame_larger_than_the_stream_says_is_refused(tmp_path, monkeypatch, video_frames):
    path = write_mp4(tmp_path / "clip.mp4", [np.asarray(f) for f in video_frames], rate=4)
    video = open_video(path)
    video.height, video.width = 24, 32  # what a lying header would have said
    with pytest.raises(InputError, match="frame 0 is 64x48 pixels but the stream says 32x24"):
        video.decode()
