"""A multi-turn chat that keeps its KV cache across turns: a thin wrapper over
``stream_generate(prompt_cache=...)``.

A follow-up question costs only its own tokens: images are encoded once, in the turn that brings them,
and the history is never prefilled again. With ``max_kv_size`` the cache has a fixed size; the system
prompt and the images are pinned and old chat text rotates out. A hybrid model (Qwen3.5) keeps, besides, a
fixed linear state per linear layer: what rotates out of its attention layers is still summarised there, and
`save` / `load` store and restore that state too.
"""

import json
from collections.abc import Iterator, Sequence

from .cache import SessionError, load_cache, read_cache_file, save_cache
from .generate import GenerationResponse, GenerationResult, make_cache, make_prompt_cache, stream_generate, turn_text
from .models.language import attention_cache


class ChatSession:
    """A conversation with one model: ``ask`` / ``stream`` a turn, ``reset``, ``save`` / ``load``.

    Args:
        model, processor: from ``mlx_compact.load``.
        system_prompt: the system message (the chat template's default when None).
        compaction: visual-token compaction for every image of the conversation (prompt-free operators
            suit multi-turn chat; a prompt-aware one is applied with the question of the turn that brings
            the image).
        max_kv_size, kv_bits: a fixed-size rotating cache (8/4-bit if ``kv_bits``) with a pinned prefix.
        max_pixels: shrink images to at most this many pixels.
        memory_budget, fit: the memory plan of every turn (see ``check_memory``).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        system_prompt: str | None = None,
        compaction=None,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        max_pixels: int | None = None,
        prefill_step_size: int = 512,
        memory_budget: int | None = None,
        fit: str = "refuse",
    ):
        self.model, self.processor = model, processor
        self.system_prompt = system_prompt
        self.compaction = compaction
        self.max_kv_size, self.kv_bits = max_kv_size, kv_bits
        self.max_pixels, self.prefill_step_size = max_pixels, prefill_step_size
        self.memory_budget, self.fit = memory_budget, fit
        make_cache(model, max_kv_size, kv_bits)  # refuse bad cache settings now, not at the first turn
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and free its cache)."""
        self.cache = make_prompt_cache(self.model, self.max_kv_size, self.kv_bits)
        self.last_stats: dict = {}

    @property
    def turns(self) -> int:
        return self.cache.turns

    def turn_text(self, prompt: str, n_images: int = 0, n_videos: int = 0) -> str:
        """The text the next turn adds to the conversation (before images and videos are expanded)."""
        return turn_text(self.processor, self.cache, prompt, n_images, self.system_prompt, n_videos)

    def stream(
        self, prompt: str, images: Sequence = (), *, videos: Sequence = (), max_tokens: int = 256, **kwargs
    ) -> Iterator[GenerationResponse]:
        """Yield the reply as ``GenerationResponse``s (see ``stream_generate``; ``sampler``, ``temperature``,
        ``top_p``, ``seed``, ``logits_processors``, ``progress`` pass through). ``videos``: video files, folders
        of frames or lists of images, encoded once in this turn (``fps`` / ``max_frames``: their sampling, see
        `mlx_compact.video`). Stopping early (closing the generator, Ctrl-C) keeps the part of the reply
        produced so far."""
        kwargs = {"max_pixels": self.max_pixels, "memory_budget": self.memory_budget, "fit": self.fit, **kwargs}
        for r in stream_generate(
            self.model,
            self.processor,
            prompt,
            images,
            videos=videos,
            max_tokens=max_tokens,
            compaction=self.compaction,
            prompt_cache=self.cache,
            system_prompt=self.system_prompt,
            prefill_step_size=self.prefill_step_size,
            **kwargs,
        ):
            if r.stats is not None:
                self.last_stats = r.stats
            yield r

    def ask(self, prompt: str, images: Sequence = (), *, videos: Sequence = (), **kwargs) -> GenerationResult:
        """One turn: the reply as a ``GenerationResult`` (``.text``, ``.tokens``, ``.stats``)."""
        tokens, text = [], ""
        for r in self.stream(prompt, images, videos=videos, **kwargs):
            text += r.text
            if r.finish_reason != "stop" and r.token is not None:
                tokens.append(r.token)
        return GenerationResult(text=text, tokens=tokens, stats=r.stats)

    def save(self, path: str) -> None:
        """Save the conversation (KV cache and position state) to a .safetensors file.

        Written atomically. `SessionError` (nothing written) when `path` is a folder, a pipe or a file
        that is not a session file: only a previous session file is overwritten.
        """
        _local(self.model, "save")
        c = self.cache
        meta = {
            "next_pos": c.position,
            "turns": c.turns,
            "closed": c.closed,
            "text": c.text,
            "messages": c.messages,
            "model_type": self.model.model_type,
            "model": _fingerprint(self.model),
        }
        save_cache(path, self.cache, {"chat": json.dumps(meta)})

    def load(self, path: str) -> None:
        """Restore a conversation saved by ``save`` with the same model and cache settings.

        The file is checked completely before anything is loaded; on any error (`SessionError` naming
        the problem) the conversation is left as it was.
        """
        _local(self.model, "load")
        info = read_cache_file(path)
        state = _chat_state(path, info["metadata"], self.model)
        self._check_settings(path, info)
        t = self.model.config.text
        caches, _ = load_cache(path, len(self.model.layers), t.num_key_value_heads, t.head_dim, _linear_state(t))
        cache = type(self.cache)(caches, state["next_pos"], state["turns"], state["closed"])
        cache.text, cache.messages = state.get("text", ""), state.get("messages", [])
        self.cache = cache

    def _check_settings(self, path: str, info: dict) -> None:
        """Refuse a session whose cache is not the kind this chat makes (growing, or its fixed size and bits)."""
        mine = attention_cache(make_cache(self.model, self.max_kv_size, self.kv_bits))
        ours = (type(mine).__name__, tuple(map(int, mine.meta_state)))
        theirs = (info["class"], info["meta"])
        if ours[0] == theirs[0] and ours[1][:1] + ours[1][2:5] == theirs[1][:1] + theirs[1][2:5]:
            return  # pinned and offset are the conversation's, not settings
        a, b = _cache_flags(*theirs), _cache_flags(*ours)
        if a == b:  # same flags, other internals: a session written by a program, not by `mlx-compact chat`
            raise SessionError(
                f"{path} was saved with a cache of max_chunk {theirs[1][2]} and group size "
                f"{theirs[1][4]}; this chat's has {ours[1][2]} and {ours[1][4]}: it cannot be loaded here"
            )
        fix = "restart chat without them" if theirs[0] == "KVCache" else f"restart chat with {a}"
        raise SessionError(f"{path} was saved with {a}; this chat has {b}: {fix} to load it")


def _local(model, what: str) -> None:
    from .pipeline import pipeline_of

    if pipeline_of(model) is not None:
        raise SessionError(
            f"a conversation across several ranks (--pipeline) cannot be {what}ed yet: its cache is on every rank"
        )


def _fingerprint(model) -> dict:
    """What a session's cache depends on: the model's type and the sizes of its language model."""
    t = model.config.text
    return {
        "model_type": model.model_type,
        "layers": t.num_hidden_layers,
        "kv_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_size": t.hidden_size,
        "vocab_size": t.vocab_size,
        **({"layer_types": list(t.layer_types)} if t.layer_types else {}),
    }


def _linear_state(t) -> tuple:
    """A hybrid model's linear layers and the shapes of their state (batch 1): what its session files hold."""
    layers = [i for i in range(t.num_hidden_layers) if t.is_linear(i)]
    if not layers:
        return [], None
    channels = 2 * t.linear_num_key_heads * t.linear_key_head_dim + t.linear_num_value_heads * t.linear_value_head_dim
    conv = (1, t.linear_conv_kernel_dim - 1, channels)
    return layers, (conv, (1, t.linear_num_value_heads, t.linear_value_head_dim, t.linear_key_head_dim))


def _cache_flags(cls: str, meta: tuple) -> str:
    """A cache's kind as the chat options that make it."""
    if cls == "KVCache":
        return "a growing cache"
    return f"--max-kv-tokens {meta[0]}" + (f" --kv-bits {meta[3]}" if meta[3] else "")


def _chat_state(path: str, metadata: dict, model) -> dict:
    """The chat state (next_pos, turns, closed) a session file holds, checked to be for `model`."""
    try:
        state = json.loads(metadata["chat"])
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError):
        state = None
    if not (
        isinstance(state, dict)
        and isinstance(state.get("model_type"), str)
        and all(type(state.get(k)) is int and 0 <= state[k] < 2**31 for k in ("next_pos", "turns"))
        and type(state.get("closed")) is bool
        and isinstance(state.get("text", ""), str)
        and isinstance(state.get("messages", []), list)
        and all(isinstance(m, dict) and set(m) == {"role", "content"} for m in state.get("messages", []))
    ):
        raise SessionError(f"session file {path} has no valid chat state: it was not saved by a chat, or it is corrupt")
    fingerprint = state.get("model", {})  # files saved before it have only model_type: their shapes are checked
    if not isinstance(fingerprint, dict):
        raise SessionError(f"session file {path} has a corrupt model fingerprint")
    theirs = {"model_type": state["model_type"], **fingerprint}
    diff = [
        f"{k} {str(theirs[k])[:40]}, this model's {v}"
        for k, v in _fingerprint(model).items()
        if k in theirs and theirs[k] != v
    ]
    if diff:
        raise SessionError(f"session file {path} was saved with another model ({'; '.join(diff)})")
    return state
