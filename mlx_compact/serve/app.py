"""The HTTP side: OpenAI's routes on Starlette, one worker thread that owns the model, a bounded queue.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``, ``GET /health``.
Every error is OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request,
401 for a wrong API key, 404 for an unknown model, 413 for a body or a run too large (with what would fit),
503 with ``Retry-After`` when the queue is full. The event loop only parses and answers; images are read
in a thread, and the model computes in its worker, one request at a time. A client that goes away cancels
its request, queued or computing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import queue
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..compaction import Compaction
from ..compaction.types import METHOD_HELP
from ..files import InputError
from ..memory import MemoryPlanError
from .conversation import Limits, parse_messages, segments
from .engine import Engine, Request
from .prefix import PrefixCache

log = logging.getLogger("mlx_compact.serve")


@dataclass
class Settings:
    """What `mlx-compact serve` takes (see its --help)."""

    model: str | None = None
    model_id: str = "mlx-compact"
    api_key: str | None = None
    media_dir: str | None = None
    max_pixels: int | None = None
    compaction: Compaction | None = None
    max_kv_size: int | None = None
    kv_bits: int | None = None
    memory_budget: int | None = None
    prefix_cache_size: int = 1 << 30
    max_queue: int = 16
    max_body_size: int = 32 << 20
    max_prompt_tokens: int = 32768
    max_tokens_limit: int = 8192
    limits: Limits = field(default_factory=Limits)


class RequestError(Exception):
    def __init__(self, status: int, message: str, param=None, code=None, headers=None, **extra):
        super().__init__(message)
        self.status, self.param, self.code, self.headers, self.extra = status, param, code, headers, extra

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_error"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        body = {"message": str(self), "type": kind, "param": self.param, "code": self.code, **self.extra}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


@dataclass
class Job:
    req: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    folder: str

    def emit(self, kind: str, payload: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Worker:
    """The thread that loads the model and computes the queued requests, one at a time."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs: queue.Queue = queue.Queue()
        self.waiting = 0  # queued, not yet computing
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.engine: Engine | None = None
        self.processor = None
        self.thread = threading.Thread(target=self._main, name="mlx-compact-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        from ..loader import load

        s = self.settings
        try:  # loaded in this thread: MLX streams belong to the thread that uses them
            model, processor = load(s.model, memory_budget=s.memory_budget)
            self.engine = Engine(
                model,
                processor,
                prefix_cache=PrefixCache(s.prefix_cache_size),
                max_kv_size=s.max_kv_size,
                kv_bits=s.kv_bits,
                memory_budget=s.memory_budget,
            )
            from ..generate import make_cache

            make_cache(model, s.max_kv_size, s.kv_bits)  # refuse bad cache settings now
            self.processor = processor
        except BaseException as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.waiting -= 1
            self._compute(job)

    def _compute(self, job: Job) -> None:
        try:
            if job.req.cancel.is_set():
                return
            self.engine.run(job.req, job.emit)
        except MemoryPlanError as e:
            job.emit("error", {"status": 413, "message": str(e), "code": "request_too_large"})
        except InputError as e:
            job.emit("error", {"status": 400, "message": " ".join(str(e).split()), "param": getattr(e, "param", None)})
        except Exception as e:  # never let one request take the server down
            log.error("request failed:\n%s", traceback.format_exc())
            job.emit("error", {"status": 500, "message": f"the model failed on this request ({type(e).__name__}: {e})"})
        finally:
            shutil.rmtree(job.folder, ignore_errors=True)
            job.emit("end", {})

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full."""
        with self.lock:
            if self.waiting >= self.settings.max_queue:
                return False
            self.waiting += 1
        self.jobs.put(job)
        return True

    def stop(self) -> None:
        self.jobs.put(None)


# ---------------------------------------------------------------- request fields


def _int(body, name, low, high, default):
    v = body.get(name, default)
    if v is None:
        return default
    if type(v) is not int or not low <= v <= high:
        raise RequestError(400, f"{name} must be a whole number from {low} to {high}, got {json.dumps(v)[:40]}", name)
    return v


def _float(body, name, ok, what, default):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise RequestError(400, f"{name} must be {what}, got {json.dumps(v)[:40]}", name)
    return float(v)


def _compaction(body, default: Compaction | None) -> Compaction | None:
    method, keep, prop = body.get("compaction"), body.get("keep"), body.get("proportional")
    if method is None and keep is None and prop is None:
        return default
    if method is not None and method not in METHOD_HELP:
        raise RequestError(
            400, f"compaction must be one of {', '.join(METHOD_HELP)}, got {str(method)[:40]!r}", "compaction"
        )
    keep = _float(body, "keep", lambda v: 0 < v <= 1, "a number in (0, 1]", None)
    if prop is not None and not isinstance(prop, bool):
        raise RequestError(400, "proportional must be true or false", "proportional")
    if method == "none" or keep == 1.0:
        return Compaction.none()
    base = default or Compaction()
    kw = {"method": method or (base.method if base.method != "none" else "diversity"), "where": base.where}
    kw["keep"] = keep if keep is not None else base.keep
    kw["proportional"] = prop
    try:
        return Compaction(**kw)
    except ValueError as e:
        raise RequestError(400, str(e), "compaction") from None


def _stop(body) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    return stop


# ---------------------------------------------------------------- the app


def create_app(settings: Settings, worker: Worker | None = None) -> Starlette:
    """The ASGI app; its worker starts loading the model at once (``GET /health`` says when it is ready)."""
    s = settings
    worker = worker or Worker(s)
    if not worker.thread.is_alive() and not worker.ready.is_set():
        worker.start()

    def check_auth(request: HTTPRequest) -> None:
        if s.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {s.api_key}".encode()):
            raise RequestError(
                401, "invalid API key: send Authorization: Bearer <key> (--api-key)", code="invalid_api_key"
            )

    async def ready() -> Engine:
        if not worker.ready.is_set():
            await asyncio.get_running_loop().run_in_executor(None, worker.ready.wait, 600)
        if worker.error is not None:
            raise RequestError(503, f"the model could not be loaded: {worker.error}", headers={"Retry-After": "60"})
        return worker.engine

    async def read_json(request: HTTPRequest) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > s.max_body_size:
            raise RequestError(
                413,
                f"the request body is {size} bytes, more than this server takes ({s.max_body_size}, --max-body-size)",
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > s.max_body_size:
                raise RequestError(413, f"the request body is more than {s.max_body_size} bytes (--max-body-size)")
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise RequestError(
                400, f"the request body is not valid JSON ({getattr(e, 'msg', type(e).__name__)})"
            ) from None
        if not isinstance(value, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return value

    def build(body: dict, engine: Engine, folder: str) -> Request:
        """Everything about a request that can be refused before it is queued (runs in a thread)."""
        if body.get("model") not in (None, s.model_id, "default"):
            raise RequestError(
                404,
                f"model {str(body.get('model'))[:80]!r} is not served here; GET /v1/models lists {s.model_id!r}",
                "model",
                "model_not_found",
            )
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1: one answer per request", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = _int({name: max_tokens}, name, 1, s.max_tokens_limit, 256)
        temperature = _float(body, "temperature", lambda v: 0 <= v <= 2, "a number from 0 to 2", 0.0)
        top_p = _float(body, "top_p", lambda v: 0 < v <= 1, "a number in (0, 1]", 1.0)
        seed = body.get("seed")
        if seed is not None and type(seed) is not int:
            raise RequestError(400, "seed must be a whole number", "seed")
        max_pixels = _int(body, "max_pixels", 56 * 56, 2**40, s.max_pixels)
        if s.max_pixels is not None and max_pixels is not None:
            max_pixels = min(max_pixels, s.max_pixels)
        compaction = _compaction(body, s.compaction)
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise RequestError(400, "stream_options must be an object", "stream_options")
        proc = engine.processor
        try:
            messages = parse_messages(proc, body.get("messages"), folder, s.media_dir, s.limits)
            settings_key = repr(
                (s.model_id, compaction, max_pixels, s.max_kv_size, s.kv_bits, engine.prefill_step_size)
            )
            segs = segments(proc, messages, settings_key)
        except InputError as e:
            raise RequestError(400, " ".join(str(e).split()), getattr(e, "param", "messages")) from None
        n = sum(len(proc.tokenizer(seg.text)["input_ids"]) for seg in segs)
        if n > s.max_prompt_tokens:
            raise RequestError(
                400,
                f"the conversation is {n} text tokens, more than this server takes ({s.max_prompt_tokens}, --max-prompt-tokens)",
                "messages",
                "context_length_exceeded",
            )
        return Request(segs, max_tokens, temperature, top_p, seed, _stop(body), compaction, max_pixels)

    async def watch(request: HTTPRequest, job: Job) -> None:
        """Cancel the job when the client goes away (the body is read: receive() waits for a disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.req.cancel.set()
                return

    def busy() -> RequestError:
        return RequestError(
            503,
            "the server is busy: too many requests are waiting; retry shortly",
            code="server_busy",
            headers={"Retry-After": "1"},
        )

    async def chat(request: HTTPRequest):
        folder = None
        try:
            check_auth(request)
            body = await read_json(request)
            engine = await ready()
            if worker.waiting >= s.max_queue:  # refused before its images are read
                raise busy()
            folder = tempfile.mkdtemp(prefix="mlx-compact-serve-")
            req = await asyncio.get_running_loop().run_in_executor(None, build, body, engine, folder)
            stream = body.get("stream", False) is True
            include_usage = stream and (body.get("stream_options") or {}).get("include_usage") is True
            job = Job(req, asyncio.get_running_loop(), asyncio.Queue(), folder)
            if not worker.submit(job):
                raise busy()
            folder = None  # the worker removes it
        except RequestError as e:
            return e.response()
        except Exception as e:  # a bug, not the client's fault: this request fails, the server goes on
            log.error("request refused:\n%s", traceback.format_exc())
            return RequestError(500, f"the server failed to read this request ({type(e).__name__}: {e})").response()
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        watcher = asyncio.ensure_future(watch(request, job))
        try:
            kind, start = await job.events.get()
        except asyncio.CancelledError:
            job.req.cancel.set()
            raise
        if kind != "start":  # refused or failed before the first token
            watcher.cancel()
            if kind == "end":
                return RequestError(499, "cancelled").response()
            e = start
            return RequestError(e["status"], e["message"], e.get("param"), e.get("code")).response()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        headers = {
            "x-mlx-compact-cached-tokens": str(start["cached_tokens"]),
            "x-mlx-compact-images-encoded": str(start["images_encoded"]),
        }

        def usage(done: dict) -> dict:
            return {
                "prompt_tokens": start["prompt_tokens"],
                "completion_tokens": done["completion_tokens"],
                "total_tokens": start["prompt_tokens"] + done["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": start["cached_tokens"]},
            }

        if not stream:
            try:
                text, done, error = "", None, None
                while True:
                    kind, payload = await job.events.get()
                    if kind == "text":
                        text += payload["text"]
                    elif kind == "done":
                        done = payload
                    elif kind == "error":
                        error = payload
                    elif kind == "end":
                        break
            except asyncio.CancelledError:
                job.req.cancel.set()
                raise
            finally:
                watcher.cancel()
            if error is not None or done is None:
                error = error or {"status": 499, "message": "cancelled"}
                return RequestError(error["status"], error["message"]).response()
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "finish_reason": done["finish_reason"], "logprobs": None}
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": s.model_id,
                    "choices": [choice],
                    "usage": usage(done),
                },
                headers=headers,
            )

        watcher.cancel()  # from here StreamingResponse listens for the disconnect

        def chunk(delta: dict, finish=None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model_id}
            c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            return f"data: {json.dumps(c)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, payload = await job.events.get()
                    if kind == "text":
                        yield chunk({"content": payload["text"]})
                    elif kind == "done":
                        yield chunk({}, payload["finish_reason"])
                        if include_usage:
                            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.model_id}
                            yield f"data: {json.dumps({**c, 'choices': [], 'usage': usage(payload)})}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': payload['message'], 'type': 'server_error'}})}\n\n"
                    elif kind == "end":
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.req.cancel.set()  # a no-op once done; stops the model when the client left

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers}
        )

    async def models(request: HTTPRequest):
        try:
            check_auth(request)
        except RequestError as e:
            return e.response()
        return JSONResponse(
            {"object": "list", "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": "mlx-compact"}]}
        )

    async def health(request: HTTPRequest):
        if not worker.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        if worker.error is not None:
            return JSONResponse({"status": "error", "error": str(worker.error)}, status_code=503)
        e = worker.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": s.model_id,
                "waiting": worker.waiting,
                **e.stats,
                "prefix_cache": {
                    "entries": len(e.prefix),
                    "bytes": e.prefix.nbytes,
                    "max_bytes": e.prefix.max_bytes,
                    "hits": e.prefix.hits,
                    "misses": e.prefix.misses,
                    "evictions": e.prefix.evictions,
                },
            }
        )

    async def not_found(request: HTTPRequest, exc):
        return RequestError(
            404,
            f"no route {request.method} {request.url.path}; this server has POST /v1/chat/completions, GET /v1/models and GET /health",
        ).response()

    async def bad_method(request: HTTPRequest, exc):
        return RequestError(405, f"{request.method} is not allowed on {request.url.path}").response()

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})
    app.state.worker = worker
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(settings)
    worker = app.state.worker
    worker.ready.wait()
    if worker.error is not None:  # the model did not load: say so once, before listening
        raise worker.error
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        limit_concurrency=4 * settings.max_queue + 16,
        timeout_keep_alive=30,
    )
