"""`mlx-compact batch` on the bundled model: a folder of 50 small images, 2 of them broken, interrupted and resumed.

Reference for the answers: `mlx_compact.generate` on the same image and prompt."""

import json

import numpy as np
import pytest
from PIL import Image

import mlx_compact
from mlx_compact import cli
from mlx_compact.batch import run_batch

PROMPT = "what colour is the shape?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """50 images: 48 small scenes (a coloured square on white, in several sizes and formats) and 2 broken files."""
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 200, 20)]
    for i in range(48):
        size = int(rng.integers(64, 160))
        a = np.full((size, size, 3), 255, np.uint8)
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        s = size // 4
        a[y : y + s, x : x + s] = colours[i % 4]
        Image.fromarray(a).save(d / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (d / "img48.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")  # unreadable header
    good = (d / "img00.jpg").read_bytes()
    (d / "img49.jpg").write_bytes(good[: len(good) // 3])  # header reads, pixels truncated
    (d / "notes.txt").write_text("not an image file: ignored by suffix")
    return d


def test_batch_answers_48_skips_2_and_resumes_without_redoing(folder, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    argv = ["batch", "--images", str(folder), "--prompt", PROMPT, "--out", str(out), "--max-tokens", "8"]
    assert cli.main(argv) == 2  # finished, with skipped images
    err = capsys.readouterr().err.strip().splitlines()
    skipped = [line for line in err if line.startswith("mlx-compact batch: skipped")]
    assert len(skipped) == 2 and {"img48.png", "img49.jpg"} == {line.split()[3].split("/")[-1][:-1] for line in skipped}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 48 and len({r["file"] for r in records}) == 48
    assert all(r["answer"] and r["visual_tokens"] and r["total_s"] > 0 for r in records)
    model, proc = mlx_compact.load()
    for r in records[:3]:
        assert r["answer"] == mlx_compact.generate(model, proc, PROMPT, [r["file"]], max_tokens=8).text

    # an interrupt after 10 images (the line being written is cut short), then --resume
    cut = tmp_path / "cut.jsonl"
    cut.write_text(
        "".join(line + "\n" for line in out.read_text().splitlines()[:10]) + '{"file": "' + records[10]["file"]
    )
    assert cli.main(argv[:-4] + ["--out", str(cut), "--resume", "--max-tokens", "8"]) == 2
    assert "38 answered, 2 skipped, 10 already in" in capsys.readouterr().err
    again = [
        json.loads(line) for line in cut.read_text().splitlines() if line.endswith("}") and line.startswith('{"file"')
    ]
    assert len(again) == 48 and {r["file"] for r in again} == {r["file"] for r in records}
    assert [r["answer"] for r in sorted(again, key=lambda r: r["file"])] == [r["answer"] for r in records]


def test_an_existing_output_is_never_overwritten(folder, tmp_path, capsys):
    out = tmp_path / "mine.jsonl"
    out.write_text("my own notes\n")
    assert cli.main(["batch", "--images", str(folder / "*.png"), "--prompt", PROMPT, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err and out.read_text() == "my own notes\n"


def test_the_batch_is_planned_once_before_anything_runs(folder, tmp_path):
    model, proc = mlx_compact.load()
    files = sorted(str(p) for p in folder.glob("img0*.png"))
    with pytest.raises(mlx_compact.MemoryPlanError, match="would fit"):
        run_batch(
            model, proc, files, [PROMPT] * len(files), str(tmp_path / "o.jsonl"), progress=False, memory_budget=1 << 20
        )
    assert not (tmp_path / "o.jsonl").exists()
