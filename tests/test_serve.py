"""`mlx-compact serve`: a live server on 127.0.0.1 (a free port, in a thread) answered through the official
`openai` client, and the prefix reuse it rests on.

References: the answers of `mlx_compact.generate` for the same conversation, and for a continued
conversation the same request computed from an empty prefix cache (every segment fed again): the reused
state must hold exactly the arrays a fresh run computes, and give the same tokens.
"""

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_compact
from mlx_compact.cache import KVCache
from mlx_compact.compaction import Compaction

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from mlx_compact.serve.app import Settings, create_app  # noqa: E402
from mlx_compact.serve.conversation import Limits, parse_messages, segments  # noqa: E402
from mlx_compact.serve.engine import Engine, Request  # noqa: E402
from mlx_compact.serve.prefix import PrefixCache  # noqa: E402

EXAMPLE = Path(mlx_compact.__file__).parent / "assets" / "qwen3-vl-tiny" / "example.png"
KEY = "test-key"


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _user(text, *urls):
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}],
    }


class Live:
    """A server on a free port of 127.0.0.1, in a thread."""

    def __init__(self, settings: Settings):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not (self.server.started and self.app.state.worker.ready.is_set()):
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=settings.api_key or "none", max_retries=0)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health") as r:
            return json.load(r)

    def post(self, body: bytes, key=KEY, path="/v1/chat/completions") -> tuple:
        req = urllib.request.Request(
            self.url + path, data=body, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.load(r), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.app.state.worker.stop()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "example.png").write_bytes(EXAMPLE.read_bytes())
    return folder


@pytest.fixture(scope="module")
def live(media):
    server = Live(Settings(api_key=KEY, media_dir=str(media), max_queue=4))
    yield server
    server.close()


@pytest.fixture(scope="module")
def bundled():
    return mlx_compact.load()


QUESTION = "how many shapes are there?"


def test_answers_equal_generate_streaming_or_not(live, bundled):
    model, proc = bundled
    want = mlx_compact.generate(model, proc, QUESTION, [str(EXAMPLE)], max_tokens=16)
    messages = [_user(QUESTION, _data_uri(EXAMPLE))]
    r = live.client.chat.completions.create(model="mlx-compact", messages=messages, max_tokens=16)
    assert r.choices[0].message.content == want.text and want.text
    assert r.choices[0].finish_reason == want.stats["finish_reason"]
    assert r.usage.prompt_tokens == want.stats["prompt_tokens"] and r.usage.completion_tokens == len(want.tokens)
    chunks = list(
        live.client.chat.completions.create(
            model="mlx-compact", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.prompt_tokens == want.stats["prompt_tokens"]
    # the same with compaction asked for in the request (one of ours)
    c = Compaction(keep=0.5)
    want = mlx_compact.generate(model, proc, QUESTION, [str(EXAMPLE)], max_tokens=16, compaction=c)
    r = live.client.chat.completions.create(
        model="mlx-compact", messages=messages, max_tokens=16, extra_body={"keep": 0.5}
    )
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.stats["prompt_tokens"]


def test_a_continued_conversation_reuses_its_prefix(live, media):
    first = [_user("what colour is the shape?", "example.png")]  # a file under --media-dir
    r1 = live.client.chat.completions.create(model="mlx-compact", messages=first, max_tokens=8)
    before = live.health()
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content}, _user(QUESTION)]
    raw = live.client.chat.completions.with_raw_response.create(model="mlx-compact", messages=second, max_tokens=8)
    r2 = raw.parse()
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens  # the whole previous prompt
    assert raw.headers["x-mlx-compact-images-encoded"] == "0"
    assert live.health()["images_encoded"] == before["images_encoded"]
    # the same request computed from nothing (max_pixels changes the key, not what this image becomes)
    fresh = live.client.chat.completions.with_raw_response.create(
        model="mlx-compact", messages=second, max_tokens=8, extra_body={"max_pixels": 10**7}
    )
    assert fresh.headers["x-mlx-compact-images-encoded"] == "1"
    assert fresh.parse().choices[0].message.content == r2.choices[0].message.content
    assert fresh.parse().usage.prompt_tokens == r2.usage.prompt_tokens


def test_bad_requests_get_4xx_and_the_server_goes_on(live, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(EXAMPLE.read_bytes())
    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()

    def body(**kw):
        return json.dumps({"model": "mlx-compact", "messages": [_user(QUESTION)], **kw}).encode()

    cases = {
        "malformed JSON": (b'{"model": "mlx-compact", "messages": [', 400),
        "broken base64": (body(messages=[_user(QUESTION, "data:image/png;base64,@@@")]), 400),
        "broken image": (body(messages=[_user(QUESTION, broken)]), 400),
        "outside --media-dir": (body(messages=[_user(QUESTION, str(outside))]), 400),
        "file URL outside": (body(messages=[_user(QUESTION, "file://" + str(outside))]), 400),
        "remote URL": (body(messages=[_user(QUESTION, "https://example.com/a.png")]), 400),
        "unknown model": (body(model="gpt-4o"), 404),
        "max_tokens -1": (body(max_tokens=-1), 400),
        "special token": (body(messages=[_user("<|im_start|>system")]), 400),
        "last not user": (body(messages=[{"role": "assistant", "content": "hi"}]), 400),
        "too many images": (body(messages=[_user(QUESTION, *["example.png"] * 9)]), 400),
        "too many messages": (body(messages=[_user("a")] * 513), 400),
        "n 2": (body(n=2), 400),
        "temperature 9": (body(temperature=9), 400),
        "unknown part": (body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400),
    }
    for name, (data, status) in cases.items():
        code, err, _ = live.post(data)
        assert code == status, (name, err)
        assert set(err["error"]) >= {"message", "type", "param", "code"} and err["error"]["message"], name
    assert "outside" in live.post(cases["outside --media-dir"][0])[1]["error"]["message"]
    assert (
        "cannot read image messages[0].content[0] (data URI)"
        in live.post(cases["broken image"][0])[1]["error"]["message"]
    )
    with socket.create_connection(("127.0.0.1", live.port)) as s:  # a body too large: refused from its length
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: 40000000\r\n\r\n"
        )
        head = b""
        while not head.endswith(b"}}"):
            head += s.recv(65536) or b"}}"
        head = head.decode()
    assert head.startswith("HTTP/1.1 413") and "--max-body-size" in head
    code, err, _ = live.post(body(), key="wrong")
    assert code == 401 and err["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        live.client.chat.completions.create(model="gpt-4o", messages=[_user(QUESTION)])
    r = live.client.chat.completions.create(
        model="mlx-compact", messages=[_user(QUESTION, "example.png")], max_tokens=4
    )
    assert r.choices[0].message.content  # and it still answers


def test_a_request_that_does_not_fit_is_413_and_a_full_queue_503(live, monkeypatch):
    engine = live.app.state.worker.engine
    monkeypatch.setattr(engine, "memory_budget", engine.prefix.max_bytes + (1 << 20))  # 1 MiB for the request
    code, err, _ = live.post(json.dumps({"messages": [_user(QUESTION, "example.png")]}).encode())
    assert code == 413 and "would fit" in err["error"]["message"], err
    monkeypatch.undo()
    monkeypatch.setattr(live.app.state.worker, "waiting", live.app.state.worker.settings.max_queue)
    code, err, headers = live.post(json.dumps({"messages": [_user(QUESTION)]}).encode())
    assert code == 503 and headers["Retry-After"] and err["error"]["code"] == "server_busy"
    monkeypatch.undo()
    assert live.client.models.list().data[0].id == "mlx-compact"


@pytest.fixture(scope="module")
def random_model(tiny_checkpoint):
    """A random tiny Qwen3-VL: it rarely stops, so answers are long and any difference shows."""
    return mlx_compact.load(str(tiny_checkpoint("qwen3_vl")))


def test_a_client_that_leaves_mid_stream_stops_its_generation(tiny_checkpoint, random_model):
    server = Live(Settings(model=str(tiny_checkpoint("qwen3_vl"))))
    try:
        stream = server.client.chat.completions.create(
            model="mlx-compact", messages=[_user("go on")], max_tokens=4000, stream=True
        )
        next(iter(stream))
        stream.close()
        deadline = time.time() + 30
        while server.health()["cancelled"] < 1:
            assert time.time() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
        r = server.client.chat.completions.create(model="mlx-compact", messages=[_user("again")], max_tokens=3)
        assert r.usage.completion_tokens <= 3
    finally:
        server.close()


class Recording(PrefixCache):
    """A prefix cache that also records every state it is given (as stored copies)."""

    def __init__(self, max_bytes):
        super().__init__(max_bytes)
        self.seen = []

    def put(self, key, state):
        from mlx_compact.serve.prefix import copy_state

        self.seen.append(copy_state(state))
        return super().put(key, state)


def _run(engine, proc, messages, folder, compaction, max_tokens=12) -> str:
    segs = segments(proc, parse_messages(proc, messages, str(folder), str(folder), Limits()), repr(compaction))
    out = []
    engine.run(Request(segs, max_tokens=max_tokens, compaction=compaction), lambda kind, p: out.append((kind, p)))
    return "".join(p["text"] for k, p in out if k == "text"), out[0][1]


class Untrimmable(KVCache):
    """A layer cache that, like a hybrid model's recurrent state, cannot be trimmed."""

    def is_trimmable(self):
        return False

    def trim(self, n):
        raise AssertionError("a state that cannot be trimmed was trimmed")


@pytest.mark.parametrize(
    "compaction,max_kv_size,untrimmable",
    [(None, None, False), (Compaction(keep=0.5), None, False), (Compaction(keep=0.5), 256, False), (None, None, True)],
)
def test_a_reused_prefix_gives_exactly_what_a_fresh_run_gives(
    random_model, media, compaction, max_kv_size, untrimmable, monkeypatch
):
    model, proc = random_model
    if untrimmable:  # the model makes its own caches (as hybrid models do): the prefix cache only ever continues them
        monkeypatch.setattr(model, "make_cache", lambda **kw: [Untrimmable() for _ in model.layers], raising=False)
    reused, fresh = (
        Engine(model, proc, prefix_cache=Recording(size), max_kv_size=max_kv_size) for size in (1 << 30, 0)
    )
    convo = [_user("describe it", "example.png")]
    a1, start1 = _run(reused, proc, convo, media, compaction)
    convo += [{"role": "assistant", "content": a1}, _user("and then?", "example.png")]
    a2, start2 = _run(reused, proc, convo, media, compaction)
    assert start2["cached_tokens"] == start1["prompt_tokens"] and start2["images_encoded"] == 1
    convo += [{"role": "assistant", "content": a2}, _user("last one")]
    (a, sa), (b, sb) = (_run(engine, proc, convo, media, compaction) for engine in (reused, fresh))
    assert sa["cached_tokens"] == start2["prompt_tokens"] and sa["images_encoded"] == 0
    assert sb["cached_tokens"] == 0 and sb["images_encoded"] == 2 and sa["prompt_tokens"] == sb["prompt_tokens"]
    assert a == b and len(a) >= 5
    x, y = reused.prefix.seen[-1], fresh.prefix.seen[-1]  # the states after the last prompt, both ways
    assert all(type(c) is (Untrimmable if untrimmable else type(c)) for c in list(x) + list(y))
    assert (x.position, x.offset) == (y.position, y.offset)
    for cx, cy in zip(x, y):  # bit for bit, every layer
        for u, v in zip(cx.state, cy.state):
            u, v = (u if isinstance(u, tuple) else (u,)), (v if isinstance(v, tuple) else (v,))
            assert all(mx.array_equal(p, q).item() for p, q in zip(u, v))


def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, capsys):
    from mlx_compact import cli

    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'mlx-compact[serve]'" in err


def test_serve_options_parse_into_settings():
    from mlx_compact import cli

    args = cli.build_parser().parse_args(
        ["serve", "--port", "9000", "--api-key", "k", "--keep", "0.5", "--max-kv-size", "4096", "--kv-bits", "8"]
    )
    assert (args.host, args.port, args.api_key, args.max_kv_tokens, args.kv_bits) == ("127.0.0.1", 9000, "k", 4096, 8)
    assert args.prefix_cache_size == 1 << 30 and cli._compaction(args).keep == 0.5
