"""Compute one chat request on the model: plan, reuse a stored prefix, feed the new segments, decode.

`Engine.run` is called by one worker thread at a time (the model computes one request at a time); it
reports through ``emit(kind, payload)``: ``"start"`` once the prompt is in the cache (prompt and cached
token counts, images encoded), ``"text"`` for each piece of the answer, ``"done"`` with the finish reason
and usage. Errors are raised: `InputError` (bad request), `MemoryPlanError` (does not fit).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..generate import check_memory, make_prompt_cache, stream_generate
from ..memory import MemoryPlanError, run_budget
from .conversation import Segment
from .prefix import PrefixCache


@dataclass
class Request:
    segments: list[Segment]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    compaction: object = None
    max_pixels: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model, its processor, the server's cache settings and the prefix cache."""

    def __init__(
        self,
        model,
        processor,
        *,
        prefix_cache: PrefixCache,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        memory_budget: int | None = None,
        prefill_step_size: int = 512,
    ):
        self.model, self.processor, self.prefix = model, processor, prefix_cache
        self.max_kv_size, self.kv_bits = max_kv_size, kv_bits
        self.memory_budget, self.prefill_step_size = memory_budget, prefill_step_size
        self.stats = {"requests": 0, "cancelled": 0, "images_encoded": 0, "prefill_tokens": 0, "cached_tokens": 0}

    def budget(self) -> int:
        """What a request may plan with: the memory budget less what the prefix cache may hold."""
        base = self.memory_budget if self.memory_budget is not None else run_budget()
        return max(base - self.prefix.max_bytes, 0)

    def plan(self, req: Request, new: list[Segment], held: int) -> None:
        """Plan the request's new segments on top of ``held`` cached tokens (`check_memory`, the CLI's plan);
        `MemoryPlanError` names what would fit."""
        check_memory(
            self.model,
            self.processor,
            "".join(s.text for s in new),
            [im.file for s in new for im in s.images],
            max_pixels=req.max_pixels,
            compaction=req.compaction,
            max_kv_tokens=self.max_kv_size,
            kv_bits=self.kv_bits,
            max_tokens=req.max_tokens,
            prefill_step=self.prefill_step_size,
            budget=self.budget(),
            held=held,
        )

    def run(self, req: Request, emit: Callable[[str, dict], None]) -> None:
        segs = req.segments
        reused, state = self.prefix.longest([s.key for s in segs[:-1]])
        cached = state.offset if state is not None else 0
        if state is None:
            state = make_prompt_cache(self.model, self.max_kv_size, self.kv_bits)
        new = segs[reused:]
        self.plan(req, new, state.offset)
        self.stats["requests"] += 1
        common = dict(
            prompt_cache=state,
            compaction=req.compaction,
            max_pixels=req.max_pixels,
            memory_budget=self.budget(),
            prefill_step_size=self.prefill_step_size,
            fit="off",  # planned above, the whole request at once
        )
        for seg in new[:-1]:  # earlier turns of the conversation: prefilled only
            if req.cancel.is_set():
                self.stats["cancelled"] += 1
                return
            for _ in stream_generate(
                self.model,
                self.processor,
                seg.question,
                [im.file for im in seg.images],
                turn=seg.text,
                max_tokens=0,
                **common,
            ):
                pass
            self.stats["images_encoded"] += len(seg.images)
        last = new[-1]

        def prefilled(at):
            self.prefix.put(last.key, at)
            self.stats["images_encoded"] += len(last.images)
            self.stats["prefill_tokens"] += at.offset - cached
            self.stats["cached_tokens"] += cached
            emit(
                "start",
                {
                    "prompt_tokens": at.offset,
                    "cached_tokens": cached,
                    "images_encoded": sum(len(s.images) for s in new),
                },
            )

        stop, held, text, finish, r = req.stop, 0, "", "length", None
        hold = max((len(s) for s in stop), default=1) - 1  # text kept back: it may begin a stop string
        stream = stream_generate(
            self.model,
            self.processor,
            last.question,
            [im.file for im in last.images],
            turn=last.text,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            on_prefill=prefilled,
            **common,
        )
        try:
            for r in stream:
                if req.cancel.is_set():
                    self.stats["cancelled"] += 1
                    return
                text += r.text
                cut = min((i for i in (text.find(s, max(held - hold, 0)) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
                upto = len(text) if r.finish_reason is not None else max(len(text) - hold, held)
                if upto > held:
                    emit("text", {"text": text[held:upto]})
                    held = upto
                if r.finish_reason is not None:
                    finish = r.finish_reason
        finally:
            stream.close()
        if len(text) > held:
            emit("text", {"text": text[held:]})
        generated = r.generation_tokens if r is not None else 0
        emit("done", {"finish_reason": finish, "completion_tokens": generated})


__all__ = ["Engine", "Request", "MemoryPlanError"]
