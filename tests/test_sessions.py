"""Chat session files: a round trip works; hostile or careless files and paths are one `InputError`.

Bad files are refused from their header, before anything is allocated (`mx.load` and `mx.zeros` fail the
test if called), and a failed `load` leaves the conversation as it was. `/save` never overwrites a file that
is not a session, and a chat survives bad `/load` and `/save` commands and failing turns.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time
from contextlib import contextmanager

import mlx.core as mx
import pytest

from mlx_compact import cli, memory
from mlx_compact.cache import MARKER, SessionError, load_cache, read_cache_file
from mlx_compact.chat import ChatSession
from mlx_compact.loader import load

FIXED = dict(max_kv_size=64)
Q8 = dict(max_kv_size=64, kv_bits=8)
SETTINGS = {"float": {}, "fixed": FIXED, "fixed8": Q8}


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    return {a: load(str(tiny_checkpoint(a))) for a in ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")}


def chat(models, arch="qwen3_vl", turns=1, **settings):
    s = ChatSession(*models[arch], **settings)
    for _ in range(turns):
        s.ask("hello there", max_tokens=3)
    return s


@pytest.fixture(scope="module")
def sessions(models, tmp_path_factory):
    """kind -> a session file saved after one turn: qwen3_vl with each SETTINGS, and qwen2_vl (growing)."""
    d = tmp_path_factory.mktemp("sessions")
    out = {}
    for kind, settings in SETTINGS.items():
        chat(models, **settings).save(d / f"{kind}.safetensors")
        out[kind] = d / f"{kind}.safetensors"
    chat(models, "qwen2_vl").save(d / "qwen2_vl.safetensors")
    out["qwen2_vl"] = d / "qwen2_vl.safetensors"
    return out


def tamper(src, dst, arrays=None, caches=None, state=None, raw=None):
    """Copy session `src` to `dst` with its arrays, cache descriptions or chat state edited in place."""
    tensors, meta = mx.load(str(src), return_metadata=True)
    entries, user = json.loads(meta[MARKER]), json.loads(meta["metadata"])
    chat_state = json.loads(user["chat"])
    for edit, value in ((arrays, tensors), (caches, entries), (state, chat_state)):
        if edit:
            edit(value)
    user["chat"] = json.dumps(chat_state)
    meta = {MARKER: json.dumps(entries), "metadata": json.dumps(user), **(raw or {})}
    mx.save_safetensors(str(dst), tensors, meta)
    return dst


def allocates(*args, **kwargs):
    raise AssertionError("a refused session file was loaded or allocated")


def snapshot(s):
    return [id(c) for c in s.cache], [c.offset for c in s.cache], s.cache.position, s.cache.turns, s.cache.closed


def refused(s, path, match, monkeypatch):
    """`s.load(path)` raises a SessionError matching `match`, allocating nothing and changing nothing."""
    before = snapshot(s)
    with monkeypatch.context() as m:
        m.setattr(mx, "load", allocates)
        m.setattr(mx, "zeros", allocates)
        with pytest.raises(SessionError, match=match) as e:
            s.load(path)
    assert snapshot(s) == before
    assert "\n" not in str(e.value)
    return str(e.value)


def each_layer(fn):
    def edit(entries):
        for e in entries:
            fn(e)

    return edit


def set_meta(i, value):
    return each_layer(lambda e: e["meta"].__setitem__(i, value))


def keys_values(fn):
    def edit(arrays):
        for name in arrays:
            arrays[name] = fn(arrays[name])

    return edit


def drop_layer_1(arrays):
    for name in [n for n in arrays if n.startswith("1.")]:
        del arrays[name]


@contextmanager
def unblocked(fifo, after_s=10):
    """A process that opens both ends of `fifo` after `after_s`, so that code blocked in opening it (even
    in C++ holding the GIL, where a thread's join timeout cannot help) wakes and the test fails instead of hanging."""
    code = (
        "import os, sys, time; time.sleep(float(sys.argv[2])); fd = os.open(sys.argv[1], os.O_RDWR); "
        "time.sleep(0.5); os.close(fd)"
    )
    watchdog = subprocess.Popen([sys.executable, "-c", code, str(fifo), str(after_s)])
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", SETTINGS)
def test_round_trip_continues_the_conversation(models, kind, tmp_path):
    settings = SETTINGS[kind]
    a = chat(models, **settings)
    a.save(tmp_path / "s.safetensors")
    b = ChatSession(*models["qwen3_vl"], **settings)
    b.load(tmp_path / "s.safetensors")
    assert (b.cache.position, b.turns, b.cache.closed) == (a.cache.position, a.turns, a.cache.closed)
    assert [c.offset for c in b.cache] == [c.offset for c in a.cache]
    assert b.ask("and then?", max_tokens=4).tokens == a.ask("and then?", max_tokens=4).tokens
    state = json.loads(read_cache_file(tmp_path / "s.safetensors")["metadata"]["chat"])
    t = models["qwen3_vl"][0].config.text
    assert state["model"] == {
        "model_type": "qwen3_vl",
        "layers": 2,
        "kv_heads": 2,
        "head_dim": 32,
        "hidden_size": t.hidden_size,
        "vocab_size": t.vocab_size,
    }
    assert not [p for p in os.listdir(tmp_path) if p != "s.safetensors"]  # no temporary file left


def test_a_session_saved_before_the_fingerprint_still_loads(models, sessions, tmp_path):
    old = tamper(sessions["fixed8"], tmp_path / "old.safetensors", state=lambda s: s.pop("model"))
    s = ChatSession(*models["qwen3_vl"], **Q8)
    s.load(old)
    assert s.cache.turns == 1 and s.cache[0].offset > 0


# ---------------------------------------------------------------- hostile files

HOSTILE = {
    "corrupt json": (dict(raw={MARKER: '[{"class": "KVCa'}), "description is not JSON"),
    "not a list": (dict(raw={MARKER: '{"class": "FixedKVCache"}'}), "one cache per layer"),
    "unknown class": (dict(caches=each_layer(lambda e: e.update({"class": "EvilCache"}))), "unknown cache class"),
    "layers differ": (dict(caches=lambda es: es[1]["meta"].__setitem__(1, "0")), "all of the same kind"),
    "short meta": (dict(caches=each_layer(lambda e: e["meta"].pop())), "six integers"),
    "meta not strings": (dict(caches=set_meta(0, 64)), "six integers"),
    "meta not digits": (dict(caches=set_meta(0, "6.4e1")), "six integers"),
    "negative meta": (dict(caches=set_meta(5, "-59")), "six integers"),
    "huge offset": (dict(caches=set_meta(5, "50000000000")), "six integers"),
    "offset out of int32": (dict(caches=set_meta(5, "3000000000")), "out of range"),
    "unknown bits": (dict(caches=set_meta(3, "3")), "out of range"),
    "pinned past the ring": (dict(caches=set_meta(1, "60")), "out of range"),
    "tokens disagree with offset": (dict(caches=set_meta(5, "40")), r"holds \d+ tokens .* settings say 40"),
    "parts not int": (dict(caches=each_layer(lambda e: e.update({"parts": "1"}))), "parts '1' is not an integer"),
    "wrong parts": (dict(caches=each_layer(lambda e: e.update({"parts": 3}))), "cannot have 3 parts"),
    "extra key": (dict(caches=each_layer(lambda e: e.update({"code": "rm -rf"}))), r"not \{class, meta, parts\}"),
    "missing tensor": (dict(arrays=lambda a: a.pop("1.values.0")), "3 tensors where its description says 4"),
    "renamed tensor": (dict(arrays=lambda a: a.update({"1.values.7": a.pop("1.values.0")})), "'1.values.0' is missing"),
    "wrong dtype": (dict(arrays=keys_values(lambda x: x.astype(mx.int32))), "dtype I32"),
    "3d keys": (dict(arrays=keys_values(lambda x: x[0])), r"not \[batch, kv_heads, tokens, head_dim\]"),
    "wrong layer count": (dict(arrays=drop_layer_1, caches=lambda es: es.pop()), "1 cache layers; this model has 2"),
    "wrong head_dim": (
        dict(arrays=keys_values(lambda x: x[..., :16]), state=lambda s: s.pop("model")),
        "head_dim 16; this model's are 1, 2 and 32",
    ),
    "wrong kv heads": (dict(arrays=keys_values(lambda x: x[:, :1]), state=lambda s: s.pop("model")), "1 kv heads"),
    "other fingerprint": (
        dict(state=lambda s: s["model"].update({"vocab_size": 151936})),
        "another model .*vocab_size 151936, this model's",
    ),
    "no chat state": (dict(raw={"metadata": "{}"}), "no valid chat state"),
    "chat state not json": (dict(raw={"metadata": '{"chat": "{"}'}), "no valid chat state"),
    "negative next_pos": (dict(state=lambda s: s.update({"next_pos": -1})), "no valid chat state"),
    "turns a float": (dict(state=lambda s: s.update({"turns": 1.5})), "no valid chat state"),
    "closed a string": (dict(state=lambda s: s.update({"closed": "yes"})), "no valid chat state"),
    "fingerprint not a dict": (dict(state=lambda s: s.update({"model": "qwen"})), "corrupt model fingerprint"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_session_files_are_refused_before_anything_is_allocated(models, sessions, case, tmp_path, monkeypatch):
    edits, match = HOSTILE[case]
    path = tamper(sessions["fixed"], tmp_path / "bad.safetensors", **edits)
    refused(chat(models, **FIXED), path, match, monkeypatch)


def _write_safetensors(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_a_cache_claiming_50_million_slots_is_refused_before_anything_is_allocated(
    models, sessions, tmp_path, monkeypatch
):
    huge = tamper(
        sessions["fixed"],
        tmp_path / "huge.safetensors",
        caches=each_layer(lambda e: e.update(meta=["50000000", e["meta"][1], "512", "0", e["meta"][4], e["meta"][5]])),
    )
    # into the chat it was saved from: the settings differ
    refused(
        chat(models, **FIXED),
        huge,
        "saved with --max-kv-tokens 50000000; this chat has --max-kv-tokens 64",
        monkeypatch,
    )
    # into a chat of those settings, or as bare caches: its 2 x 2 x 50M slots of 2 x 32 floats do not fit
    monkeypatch.setattr(memory, "device_budget", lambda: {"total": 8 << 30, "available": 8 << 30, "source": "test"})
    big = ChatSession(*models["qwen3_vl"], max_kv_size=50_000_000)
    refused(big, huge, r"needs 47\.68 GiB, more than the 8\.00 GiB this device has available", monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(mx, "load", allocates)
        with pytest.raises(SessionError, match="47.68 GiB"):
            load_cache(huge)


def test_files_that_are_not_sessions_are_refused(models, sessions, tmp_path, monkeypatch):
    s = chat(models, **FIXED)
    weights = tmp_path / "model.safetensors"
    mx.save_safetensors(str(weights), {"w": mx.zeros((4, 4))})
    refused(s, weights, "is not a session file of mlx-compact", monkeypatch)
    (tmp_path / "notes.safetensors").write_text("dear diary\n" * 10)
    refused(s, tmp_path / "notes.safetensors", "not a safetensors file, or it is truncated or corrupt", monkeypatch)
    data = sessions["fixed"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    refused(s, tmp_path / "cut.safetensors", "truncated or corrupt", monkeypatch)
    # a header that claims 50M slots of data the file does not have
    claim = {
        "__metadata__": {MARKER: "[]"},
        "0.keys.0": {"dtype": "F32", "shape": [1, 2, 50_000_000, 32], "data_offsets": [0, 400_000_000 * 32]},
    }
    refused(
        s, _write_safetensors(tmp_path / "claim.safetensors", claim, bytes(64)), "truncated or corrupt", monkeypatch
    )
    refused(s, tmp_path / "nothing.safetensors", "no session file", monkeypatch)
    (tmp_path / "dir.safetensors").mkdir()
    refused(s, tmp_path / "dir.safetensors", "is a directory", monkeypatch)
    empty = _write_safetensors(tmp_path / "empty.safetensors", {"__metadata__": {MARKER: "[]", "metadata": "{}"}})
    refused(s, empty, "one cache per layer", monkeypatch)


def test_a_fifo_is_refused_without_blocking(models, tmp_path):
    s = chat(models)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    before = snapshot(s)
    for method in (s.load, s.save):
        t0 = time.monotonic()
        with unblocked(fifo), pytest.raises(SessionError, match="not a regular file"):
            method(fifo)
        assert time.monotonic() - t0 < 5, f"{method.__name__} blocked on the FIFO"
    assert snapshot(s) == before


def test_a_session_of_another_model_is_refused(models, sessions, monkeypatch):
    s = chat(models, "qwen2_5_vl")
    refused(s, sessions["qwen2_vl"], "another model .*model_type qwen2_vl, this model's qwen2_5_vl", monkeypatch)
    refused(chat(models, "qwen2_vl"), sessions["float"], "model_type qwen3_vl", monkeypatch)


@pytest.mark.parametrize(
    "saved, settings, message",
    [
        (
            "float",
            Q8,
            "was saved with a growing cache; this chat has --max-kv-tokens 64 --kv-bits 8: "
            "restart chat without them to load it",
        ),
        (
            "fixed8",
            {},
            "was saved with --max-kv-tokens 64 --kv-bits 8; this chat has a growing cache: "
            "restart chat with --max-kv-tokens 64 --kv-bits 8 to load it",
        ),
        (
            "fixed",
            Q8,
            "was saved with --max-kv-tokens 64; this chat has --max-kv-tokens 64 --kv-bits 8: "
            "restart chat with --max-kv-tokens 64 to load it",
        ),
        (
            "fixed8",
            dict(max_kv_size=128, kv_bits=8),
            "this chat has --max-kv-tokens 128 --kv-bits 8: restart chat with --max-kv-tokens 64 --kv-bits 8",
        ),
    ],
)
def test_a_session_of_other_cache_settings_is_refused_naming_them(
    models, sessions, saved, settings, message, monkeypatch
):
    refused(chat(models, **settings), sessions[saved], message, monkeypatch)


# ---------------------------------------------------------------- save


def test_save_never_overwrites_a_file_that_is_not_a_session(models, tmp_path):
    s = chat(models, **FIXED)
    weights = tmp_path / "model.safetensors"
    mx.save_safetensors(str(weights), {"w": mx.ones((4, 4))})
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for target, match in [
        (weights, "not a session file of mlx-compact; refusing to overwrite it"),
        (tmp_path / "notes.txt", "refusing to overwrite"),
        (tmp_path / "empty", "refusing"),
        (tmp_path / "folder.safetensors", "it is a folder"),
        (tmp_path / "no" / "s.safetensors", "does not exist"),
        (tmp_path / "file" / "s.safetensors", "is not a folder"),
    ]:
        with pytest.raises(SessionError, match=match):
            s.save(target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "folder.safetensors"])


def test_save_replaces_its_own_previous_session_atomically(models, tmp_path, monkeypatch):
    s = chat(models, **FIXED)
    path = tmp_path / "s.safetensors"
    s.save(path)
    s.ask("more", max_tokens=2)
    s.save(path)
    t = ChatSession(*models["qwen3_vl"], **FIXED)
    t.load(path)
    assert t.turns == 2 and t.cache.position == s.cache.position
    saved = path.read_bytes()

    def disk_full(file, *args, **kwargs):  # writes a part of the file, then fails
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else file as f:
            f.write(b"half a session")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    s.ask("and more", max_tokens=2)
    with pytest.raises(OSError, match="No space"):
        s.save(path)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["s.safetensors"]


# ---------------------------------------------------------------- the chat command


def test_chat_survives_bad_load_save_and_failing_turns(
    tiny_checkpoint, models, sessions, tmp_path, capsys, monkeypatch
):
    weights = tmp_path / "model.safetensors"
    mx.save_safetensors(str(weights), {"w": mx.ones((2,))})
    original = weights.read_bytes()
    (tmp_path / "notes.safetensors").write_text("not a session")
    (tmp_path / "dir.safetensors").mkdir()
    real_stream = ChatSession.stream

    def stream(self, prompt, *args, **kwargs):
        if prompt == "explode":
            raise RuntimeError("the model fell over")
        return real_stream(self, prompt, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "stream", stream)
    script = "\n".join(
        [
            "hello",
            f"/load {tmp_path / 'missing'}",
            f"/load {tmp_path / 'notes'}",
            f"/load {sessions['float']}",
            f"/load {sessions['fixed']}",
            f"/save {tmp_path / 'dir'}",
            f"/save {weights}",
            f"/save {tmp_path / 'no/s'}",
            "explode",
            "again",
            f"/save {tmp_path / 'good'}",
            "",
        ]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    argv = [
        "chat",
        "--model",
        str(tiny_checkpoint("qwen3_vl")),
        "--max-kv-tokens",
        "64",
        "--kv-bits",
        "8",
        "--max-tokens",
        "3",
        "--stats",
        "json",
    ]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("mlx-compact chat: error: ")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 8, err
    assert "no session file" in errors[0] and "not a safetensors file" in errors[1]
    assert "restart chat without them to load it" in errors[2]
    assert "restart chat with --max-kv-tokens 64 to load it" in errors[3]
    assert "is a folder" in errors[4] and "refusing to overwrite" in errors[5] and "does not exist" in errors[6]
    assert errors[7] == "mlx-compact chat: error: RuntimeError: the model fell over"
    first, second = [json.loads(line) for line in out.splitlines()]
    assert second["prompt_tokens"] < first["prompt_tokens"]  # a follow-up: the conversation is intact
    assert weights.read_bytes() == original
    s = ChatSession(*models["qwen3_vl"], **Q8)
    s.load(tmp_path / "good.safetensors")
    assert s.cache.turns == 2
