"""The `mlx-compact` command and the examples on tiny checkpoints.

The main flows (a piped chat, generate with every option, plan --json) and the bad inputs that fail before
the model loads run the real console script in subprocesses, all started at once by the `runs` fixture (a
process costs seconds of imports, so they overlap); each test waits for the ones it checks. The other
cases call `cli.main(argv)` (and the examples' `main(argv)`) in this process, which has those imports.
"""

import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_generate import STATS_KEYS

from mlx_compact import cli
from mlx_compact.compaction import METHODS, Compaction
from mlx_compact.generate import image_grids
from mlx_compact.loader import load
from mlx_compact.memory import fmt_bytes, plan

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "mlx-compact"
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mlx_compact.cli"]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
CHAT_SCRIPT = """what is in the picture
and the colour?
/stats
/keep 1
/image {img}
and this one?
/save {session}
/reset
/load {session}
one more question

/help
/bogus
/quit
never asked
"""


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height but whose pixel data is cut short (decoding fails)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(999))[:40]))


def _tiff_float64(path: Path) -> None:
    """A valid little TIFF of 64-bit float pixels: a pixel mode Pillow cannot read."""
    tags = [
        (256, 3, 1, 4),
        (257, 3, 1, 4),
        (258, 3, 1, 64),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 0),
        (277, 3, 1, 1),
        (278, 3, 1, 4),
        (279, 4, 1, 128),
        (339, 3, 1, 3),
    ]
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(
        struct.pack("<HHIHH", t, k, n, v, 0) if k == 3 else struct.pack("<HHII", t, k, n, data_at if t == 273 else v)
        for t, k, n, v in tags
    )
    path.write_bytes(b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + bytes(128))


@pytest.fixture(scope="module")
def files(tmp_path_factory, image_wide):
    d = tmp_path_factory.mktemp("cli")
    image_wide.save(d / "img.png")
    y, x = np.mgrid[0:120, 0:160]
    photo = np.stack([x * 255 / 160, y * 255 / 120, (x + y) * 0.9], -1).astype(np.uint8)  # [120, 160, 3]
    Image.fromarray(photo).save(d / "photo.jpg")
    Image.fromarray(photo).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(photo[..., 0].astype(np.uint16) * 257).save(d / "gray16.png")  # 16-bit greyscale
    Image.fromarray(photo).convert("LA").save(d / "la.png")  # greyscale + alpha
    _png_header_only(d / "big.png", 8000, 6000)
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    _tiff_float64(d / "float64.tif")
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _run(args, stdin=None, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        CLI + [str(a) for a in args], input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _main(argv, capsys, monkeypatch, stdin=""):
    """cli.main in this process, stdin a pipe: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(files, tiny_checkpoint):
    """name -> Future of a CompletedProcess, for every command line the tests check."""
    q2, q25, q3 = (tiny_checkpoint(a) for a in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
    f = files
    img = f / "img.png"
    every = [
        "--model",
        q3,
        "--image",
        img,
        "--image",
        f / "cmyk.jpg",
        "--image",
        f / "gray16.png",
        "--image",
        f / "la.png",
        "--compaction",
        "diversity",
        "--keep",
        "0.5",
        "--where",
        "encoder",
        "--max-kv-tokens",
        "512",
        "--kv-bits",
        "8",
        "--max-pixels",
        "20000",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "3",
        "--fit",
        "auto",
        "--memory-budget",
        "64GB",
    ]
    bad = ["generate", "--model", q2, "--prompt", "hi"]
    cases = {
        "chat": (
            [
                "chat",
                "--model",
                q2,
                "--image",
                img,
                "--keep",
                "0.5",
                "--max-tokens",
                "4",
                "--system",
                "Be brief.",
                "--stats",
                "json",
            ],
            CHAT_SCRIPT.format(img=img, session=f / "session"),
        ),
        "generate_json": (["generate", "--prompt", "describe", *every, "--stats", "json"], None),
        "plan_json": (
            [
                "plan",
                "--model",
                q2,
                "--image",
                f / "big.png",
                "--image",
                img,
                "--keep",
                "0.5",
                "--max-kv-tokens",
                "4096",
                "--max-pixels",
                "200000",
                "--max-tokens",
                "64",
                "--memory-budget",
                "4MB",
                "--json",
            ],
            None,
        ),
        # bad input: one line on stderr, exit 2
        "keep_above_1": (bad + ["--keep", "1.5"], None),
        "keep_zero": (["chat", "--keep", "0"], None),
        "missing_image": (bad + ["--image", f / "nope.jpg"], None),
        "corrupt_image": (bad + ["--image", f / "corrupt.jpg"], None),
        "truncated_image": (bad + ["--image", f / "big.png"], None),
        "unsupported_mode": (bad + ["--image", f / "float64.tif"], None),
        "not_qwen_vl": (["generate", "--model", f / "llama", "--prompt", "hi"], None),
        "no_such_model": (["plan", "--model", f / "nothing", "--image", img], None),
        "kv_bits_alone": (bad + ["--kv-bits", "4"], None),
    }
    pool = ThreadPoolExecutor(max_workers=4)
    futures = {name: pool.submit(_run, a, stdin, f) for name, (a, stdin) in cases.items()}
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return {a: load(str(tiny_checkpoint(a))) for a in ("qwen2_vl", "qwen3_vl")}


def _ok(runs, name):
    r = runs[name].result()
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def _turn_tokens(proc, text):
    return len(proc.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_chat_from_a_pipe_keeps_its_cache_across_turns(runs, loaded, files):
    r = runs["chat"].result()
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    turns = [x for x in lines if "text" in x]
    assert len(turns) == 4 and len(lines) == 5  # four answers and one /stats, as JSON lines; no prompts
    assert all(set(t) == STATS_KEYS | {"text"} for t in turns)
    first, second, third, fourth = turns
    before = first["visual_tokens"][0]["before"]
    assert first["visual_tokens"] == [{"before": before, "after": Compaction(keep=0.5).budget(before)}]
    _, proc = loaded["qwen2_vl"]
    # the follow-up re-encodes nothing and its prompt is only its own new tokens
    assert second["visual_tokens"] == []
    own = "<|im_start|>user\nand the colour?<|im_end|>\n<|im_start|>assistant\n"
    assert second["prompt_tokens"] in {_turn_tokens(proc, head + own) for head in ("\n", "<|im_end|>\n")}
    assert lines[2] == {k: v for k, v in second.items() if k != "text"}  # /stats: the last answer's stats
    assert third["visual_tokens"] == [{"before": before, "after": before}]  # /keep 1 for the new image
    # after /reset and /load the conversation continues: a follow-up turn, not a first one
    assert fourth["visual_tokens"] == [] and fourth["prompt_tokens"] < first["prompt_tokens"] - before // 2
    assert (files / "session.safetensors").exists()
    # the unknown command is the only error: one line; the chat goes on and /quit ends it
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert errors == ["mlx-compact chat: error: unknown command /bogus; /help lists the commands"]
    assert "/keep R" in r.stderr and r.returncode == 2 and "Traceback" not in r.stderr


def test_chat_text_mode_streams_replies_and_prints_stats_on_stderr(tiny_checkpoint, capsys, monkeypatch):
    argv = [
        "chat",
        "--model",
        tiny_checkpoint("qwen3_vl"),
        "--max-kv-tokens",
        "256",
        "--kv-bits",
        "8",
        "--max-tokens",
        "3",
    ]
    code, out, err = _main(argv, capsys, monkeypatch, "hello\nagain\n")
    assert code == 0
    stats = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2 and all("TTFT" in s and "KV" in s for s in stats)
    assert "> " not in out and out.endswith("\n")  # no prompts from a pipe


def test_generate_with_every_option_prints_one_json_object(runs):
    r = _ok(runs, "generate_json")
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert set(s) == STATS_KEYS | {"text"}
    assert 0 < s["generation_tokens"] <= 6
    assert len(s["visual_tokens"]) == 4  # RGB, CMYK, 16-bit greyscale and greyscale+alpha all converted
    assert all(v["after"] == Compaction(keep=0.5).budget(v["before"]) for v in s["visual_tokens"])
    assert "compaction" in s["ttft_s"] and s["kv_bytes_allocated"] > s["kv_bytes_used"] > 0


def test_generate_text_mode_streams_the_answer_and_stats_go_to_stderr(tiny_checkpoint, files, capsys, monkeypatch):
    argv = [
        "generate",
        "--model",
        tiny_checkpoint("qwen2_5_vl"),
        "--prompt",
        "hi",
        "--image",
        files / "photo.jpg",
        "--compaction",
        "floor",
        "--tokens",
        "5",
        "--max-tokens",
        "4",
    ]
    code, out, err = _main(argv, capsys, monkeypatch)
    assert code == 0 and out.endswith("\n")
    [stats] = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert "->5)" in stats and "compaction" in stats  # --tokens 5


def test_plan_json_equals_memory_plan_in_process(runs, loaded, files, tiny_checkpoint):
    r = _ok(runs, "plan_json")
    got = json.loads(r.stdout)
    model, proc = loaded["qwen2_vl"]
    paths = [str(files / "big.png"), str(files / "img.png")]
    kw = dict(keep=0.5, max_kv_tokens=4096, max_tokens=64, budget=4 * 2**20)
    text = len(proc.tokenizer("")["input_ids"]) + 32
    decode = 8000 * 6000 * 4  # the largest decode: big.png's RGB pixels, 4 bytes each in Pillow
    p = plan(model, image_grids(proc, paths, 200000), text, **kw, decode_bytes=decode)
    for key in ("weights", "kv", "vision", "prefill", "decode", "peak", "budget", "tokens", "visual_tokens", "fits"):
        assert got[key] == getattr(p, key), key
    assert [(i["width"], i["height"]) for i in got["images"]] == [(8000, 6000), Image.open(paths[1]).size]
    assert not got["fits"] and got["what_would_fit"] == []  # no setting shrinks a PNG's decode

    # without the big PNG, the same budget is missed by the vision and KV peaks, which settings can shrink
    paths = paths[1:]
    kw["budget"] = plan(model, image_grids(proc, paths, 200000), text, **kw).peak - 1
    got = json.loads(
        _run(
            [
                "plan",
                "--model",
                tiny_checkpoint("qwen2_vl"),
                "--image",
                paths[0],
                "--keep",
                "0.5",
                "--max-kv-tokens",
                "4096",
                "--max-pixels",
                "200000",
                "--max-tokens",
                "64",
                "--memory-budget",
                str(kw["budget"]),
                "--json",
            ]
        ).stdout
    )
    assert not got["fits"] and got["what_would_fit"]
    for advice in got["what_would_fit"]:  # every suggestion really fits
        opts = advice.split()
        change = {
            "--max-pixels": ("mp", int),
            "--keep": ("keep", float),
            "--max-kv-tokens": ("max_kv_tokens", int),
            "--kv-bits": ("kv_bits", int),
        }
        new = dict(kw, mp=200000)
        for flag, value in zip(opts[::2], opts[1::2]):
            name, cast = change[flag]
            new[name] = cast(value)
        mp = new.pop("mp")
        assert plan(model, image_grids(proc, paths, mp), text, **new).fits, advice


def test_plan_text_reads_headers_only_and_names_each_figure(tiny_checkpoint, loaded, files, capsys, monkeypatch):
    argv = ["plan", "--model", tiny_checkpoint("qwen2_vl"), "--image", files / "big.png", "--memory-budget", "8GB"]
    code, out, _ = _main(argv, capsys, monkeypatch)  # big.png's pixel data is cut short: plan never decodes it
    assert code == 0
    model, proc = loaded["qwen2_vl"]
    p = plan(
        model, image_grids(proc, [str(files / "big.png")]), len(proc.tokenizer("")["input_ids"]) + 32, budget=8 * 2**30
    )
    for name, value in (
        ("weights", p.weights),
        ("KV cache", p.kv),
        ("vision peak", p.vision),
        ("prefill peak", p.prefill),
        ("device budget", p.budget),
    ):
        assert f"{name}: {fmt_bytes(value):>12}" in out
    assert "fits: yes" in out and "8000x6000 px" in out


@pytest.mark.parametrize(
    "name,message",
    [
        ("keep_above_1", "keep must be a number in (0, 1]"),
        ("keep_zero", "keep must be a number in (0, 1]"),
        ("missing_image", "image not found"),
        ("corrupt_image", "cannot read image"),
        ("truncated_image", "corrupt or truncated"),
        ("unsupported_mode", "unsupported format or pixel mode"),
        ("not_qwen_vl", "not a supported Qwen-VL model"),
        ("no_such_model", "does not exist"),
        ("kv_bits_alone", "--kv-bits needs --max-kv-tokens"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs, name, message):
    r = runs[name].result()
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and " error: " in lines[0] and message in lines[0], r.stderr


@pytest.mark.parametrize(
    "arch,argv,message",
    [
        ("qwen2_vl", ["--prompt", LONG, "--max-kv-tokens", "64"], "but the cache holds 64"),
        ("qwen2_vl", ["--prompt", "hi", "--memory-budget", "1MB"], "would need about"),
        ("qwen2_5_vl", ["--prompt", "hi", "--keep", "0.5", "--where", "encoder"], "use --where post"),
        ("qwen2_vl", ["--prompt", "hi", "--max-kv-tokens", "256", "--kv-bits", "8"], "head size"),
    ],
)
def test_bad_run_settings_are_one_line_and_exit_2(arch, argv, message, tiny_checkpoint, files, capsys, monkeypatch):
    argv = ["generate", "--model", tiny_checkpoint(arch), "--image", files / "img.png", *argv]
    code, out, err = _main(argv, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and message in lines[0], err


def test_example_chat_about_image_runs(tiny_checkpoint, files, capsys):
    _example("chat_about_image").main(
        ["--model", str(tiny_checkpoint("qwen3_vl")), "--image", str(files / "img.png"), "--max-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert "[turn 1]" in out and "[turn 2]" in out and "visual: none encoded" in out


def test_example_compare_operators_prints_a_table_and_draws_kept_patches(tiny_checkpoint, files, capsys):
    png = files / "kept.png"
    _example("compare_operators").main(
        [
            "--model",
            str(tiny_checkpoint("qwen2_vl")),
            "--image",
            str(files / "photo.jpg"),
            "--max-tokens",
            "2",
            "--out",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    for name in METHODS:
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name
    with Image.open(png) as im:
        assert im.width > 320 and im.height > 0  # a sheet of panels


def test_example_plan_memory_prints_a_row_per_size_and_keep(tiny_checkpoint, capsys):
    _example("plan_memory").main(
        ["--model", str(tiny_checkpoint("qwen2_5_vl")), "--sizes", "1024x768", "4032x3024", "--keep", "1", "0.25"]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] in (["1024x768"], ["4032x3024"])]
    assert len(rows) == 4 and "16 GB Mac" in out


def test_the_pytorch_notice_of_transformers_never_reaches_stderr(capsys):
    """On a Mac without PyTorch, importing transformers logs this notice; the CLI filters exactly it."""
    import logging

    log = logging.getLogger("transformers")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    level = log.level  # importing mlx_vlm (test_mlx_vlm_compat, collected first) sets transformers' to ERROR
    log.setLevel(logging.WARNING)
    try:
        log.warning(
            "PyTorch was not found. Models won't be available and only tokenizers, configuration and "
            "file/data utilities can be used."
        )
        log.warning("another transformers warning")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    err = capsys.readouterr().err
    assert "PyTorch was not found" not in err and "another transformers warning" in err


def test_a_one_token_answer_reports_decode_as_not_applicable():
    stats = {
        "prompt_tokens": 5,
        "generation_tokens": 1,
        "visual_tokens": [],
        "ttft_s": {"prefill": 0.1},
        "decode_tokens_per_s": None,
        "kv_bytes_used": 0,
        "kv_bytes_allocated": 0,
        "peak_memory_bytes": 0,
    }
    assert "decode n/a" in cli._stats_text(stats)
