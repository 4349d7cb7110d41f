"""A conversation through `prompt_cache=`, and the CLI and the Python API agreeing on the same files.

Reference for the cached conversation: the whole conversation's token ids (the checkpoint's own template for
each turn, the first answer as generated) recomputed from scratch by the model's plain forward pass.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import ARCHS

import mlx_compact  # noqa: F401  (before mlx.core)
from mlx_compact import cli, generate, make_prompt_cache
from mlx_compact.loader import load
from mlx_compact.processor import Processor


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load(str(tiny_checkpoint(arch)))
        return cache[arch]

    return get


def _ids(proc, text):
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_two_calls_on_one_prompt_cache_equal_the_whole_conversation_recomputed(arch, loaded, image_wide):
    model, proc = loaded(arch)
    cache = make_prompt_cache(model)
    first = generate(model, proc, "what is this", [image_wide], max_tokens=6, prompt_cache=cache)
    held = cache.offset
    second = generate(model, proc, "and the colour?", max_tokens=6, prompt_cache=cache)
    assert second.stats["visual_tokens"] == []  # nothing encoded again
    assert cache.offset - held in (second.stats["prompt_tokens"] + len(second.tokens) + d for d in (0, 1))

    user1 = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}
    turn1 = proc.apply_chat_template([user1])
    answer = proc.decode(first.tokens)
    conversation = proc.apply_chat_template(
        [
            user1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": [{"type": "text", "text": "and the colour?"}]},
        ]
    )
    done = turn1 + proc.decode(first.tokens, skip_special_tokens=False)
    ended = first.stats["finish_reason"] == "stop"
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    done += "<|im_end|>" if ended else ""
    assert conversation.startswith(done)
    inputs = proc(text=turn1, images=[image_wide])
    history = [int(i) for i in inputs["input_ids"][0]] + first.tokens + ([im_end] if ended else [])
    turn2 = _ids(proc, conversation[len(done) :])
    assert second.stats["prompt_tokens"] == len(turn2)  # only the new turn is prefilled
    history += turn2
    pv, grid = mx.array(inputs["pixel_values"]), inputs["grid_thw"].tolist()
    expected = []
    for _ in range(len(second.tokens)):
        expected.append(int(mx.argmax(model(mx.array([history + expected]), pv, grid)[0, -1]).item()))
    assert second.tokens == expected


def test_cli_chat_answers_as_the_prompt_cache_does(tiny_checkpoint, loaded, image_wide, tmp_path, capsys, monkeypatch):
    import io

    path = tmp_path / "img.png"
    image_wide.save(path)
    model, proc = loaded("qwen2_vl")
    cache = make_prompt_cache(model)
    want = [
        generate(model, proc, q, imgs, max_tokens=5, prompt_cache=cache).text
        for q, imgs in (("what is this", [str(path)]), ("and the colour?", []))
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("what is this\nand the colour?\n"))
    code = cli.main(
        [
            "chat",
            "--model",
            str(tiny_checkpoint("qwen2_vl")),
            "--image",
            str(path),
            "--max-tokens",
            "5",
            "--stats",
            "json",
        ]
    )
    out = capsys.readouterr().out
    turns = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [t["text"] for t in turns] == want
    assert turns[1]["visual_tokens"] == []


def _exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    y, x = np.mgrid[0:60, 0:90]
    Image.fromarray(np.stack([x * 2, y * 4, (x + y)], -1).astype(np.uint8)).save(path, exif=exif)


def _gray16(path):
    y, x = np.mgrid[0:60, 0:90]
    Image.fromarray((x * 700 + y * 50).astype(np.uint16)).save(path)


def _cmyk(path):
    y, x = np.mgrid[0:60, 0:90]
    Image.fromarray(np.stack([x * 2, y * 4, (x + y)], -1).astype(np.uint8)).convert("CMYK").save(path)


@pytest.mark.parametrize("name,make", [("rotated.jpg", _exif_rotated), ("gray16.png", _gray16), ("cmyk.jpg", _cmyk)])
def test_cli_and_python_api_give_the_same_inputs(name, make, tiny_checkpoint, loaded, tmp_path, capsys, monkeypatch):
    """Both surfaces go through one image reader: same input ids, grid and pixels for the same file."""
    path = tmp_path / name
    make(path)
    model, proc = loaded("qwen2_vl")
    seen = []
    real = Processor.__call__

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(Processor, "__call__", spy)
    generate(model, proc, "what is this", [str(path)], max_tokens=1)
    assert (
        cli.main(
            [
                "generate",
                "--model",
                str(tiny_checkpoint("qwen2_vl")),
                "--image",
                str(path),
                "--prompt",
                "what is this",
                "--max-tokens",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    api, command = seen
    assert np.array_equal(api["input_ids"], command["input_ids"])
    assert np.array_equal(api["grid_thw"], command["grid_thw"])
    assert np.array_equal(api["pixel_values"], command["pixel_values"])
    if name == "rotated.jpg":  # stored 90 wide x 60 high, shown (and seen) 60 wide x 90 high
        t, h, w = api["grid_thw"][0]
        assert h > w
