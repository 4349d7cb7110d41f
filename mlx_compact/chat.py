"""A multi-turn chat that keeps its KV cache across turns.

A follow-up question costs only its own tokens: images are encoded once, in the turn that brings them,
and the history is never prefilled again. With ``max_kv_tokens`` the cache has a fixed size; the system
prompt and the images are pinned and old chat text rotates out.
"""

import json
import time
from typing import Iterator, Optional, Sequence

import mlx.core as mx

from .cache import FixedKVCache, SessionError, load_cache, read_cache_file, save_cache
from .generate import GenerationResult, _sampler, generate_step, make_cache, prepare_ids, run_stats, set_seed
from .memory import MemoryPlanError, wired_limit


class ChatSession:
    """A conversation with one model: ``ask`` / ``stream`` a turn, ``reset``, ``save`` / ``load``.

    Args:
        model, processor: from ``mlx_compact.load``.
        system_prompt: the system message (the chat template's default when None).
        compaction: visual-token compaction for every image of the conversation (prompt-free operators
            suit multi-turn chat; a prompt-aware one is applied with the question of the turn that brings
            the image).
        max_kv_tokens, kv_bits: a fixed-size rotating cache (8/4-bit if ``kv_bits``) with a pinned prefix.
        max_pixels: shrink images to at most this many pixels.
    """

    def __init__(self, model, processor, *, system_prompt: Optional[str] = None, compaction=None,
                 max_kv_tokens: Optional[int] = None, kv_bits: Optional[int] = None,
                 max_pixels: Optional[int] = None, prefill_step: int = 512):
        self.model, self.processor = model, processor
        self.system_prompt = system_prompt
        self.compaction = compaction
        self.max_kv_tokens, self.kv_bits = max_kv_tokens, kv_bits
        self.max_pixels, self.prefill_step = max_pixels, prefill_step
        self.im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (and free its cache)."""
        self.cache = make_cache(self.model, self.max_kv_tokens, self.kv_bits)
        self.next_pos = 0  # M-RoPE position of the next token
        self.turns = 0
        self.closed = True  # the last assistant turn ended with <|im_end|> in the cache
        self.last_stats: dict = {}

    def turn_text(self, prompt: str, n_images: int = 0) -> str:
        """The text the next turn adds to the conversation (before images are expanded)."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        if self.turns == 0:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return self.processor.apply_chat_template(messages + [{"role": "user", "content": content}])
        vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
        head = "\n" if self.closed else "<|im_end|>\n"
        return f"{head}<|im_start|>user\n{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def stream(self, prompt: str, images: Sequence = (), *, max_tokens: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: Optional[int] = None, progress=None) -> Iterator:
        """Yield the reply's text chunks, then the turn's stats dict (as ``generate``).

        Stopping early (closing the generator, Ctrl-C) keeps the part of the reply produced so far.
        """
        if seed is not None:
            set_seed(seed)
        images = list(images or [])
        t0 = time.perf_counter()
        text = self.turn_text(prompt, len(images))
        inputs = self.processor(text=text, images=images or None, max_pixels=self.max_pixels)
        ids = [int(i) for i in inputs["input_ids"][0]]
        grid = inputs["grid_thw"] if images else ()
        prompt_ids = self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        mx.reset_peak_memory()
        prep = prepare_ids(self.model, ids, inputs.get("pixel_values"), grid, compaction=self.compaction,
                           prompt_ids=prompt_ids, preprocess_s=time.perf_counter() - t0)
        prep.positions = prep.positions + self.next_pos  # this turn continues the conversation's positions
        pin = self._pin_point(prep.input_ids, bool(images))
        eos = set(self.processor.eos_token_ids)
        sampler = _sampler(temperature, top_p)
        t_prefill = time.perf_counter()
        tokens, out, t_first, fed = [], "", None, 0
        tok = None
        try:
            with wired_limit():
                for tok in generate_step(self.model, prep, self.cache, sampler, self.prefill_step, pin, progress):
                    fed += 1  # generate_step has written `tok` into the cache before yielding it
                    if t_first is None:
                        t_first = time.perf_counter()
                    if tok in eos or len(tokens) >= max_tokens:
                        break
                    tokens.append(tok)
                    new = self.processor.decode(tokens)
                    if len(new) > len(out) and not new.endswith("\ufffd"):
                        yield new[len(out):]
                        out = new
        finally:  # commit the turn, complete or not, so the conversation stays consistent
            t_end = time.perf_counter()
            self.closed = fed > len(tokens) and tok == self.im_end
            if fed > len(tokens) and not self.closed and self._trim(1):
                fed -= 1
            self.next_pos = int(prep.positions.max().item()) + 1 + fed
            self.turns += 1
            self.last_stats = run_stats(prep, self.cache, len(tokens), t_prefill, t_first, t_end)
        yield {"text": self.processor.decode(tokens), "tokens": tokens, **self.last_stats}

    def ask(self, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
        """One turn: the reply as a ``GenerationResult`` (``.text``, ``.tokens``, ``.stats``)."""
        stats = None
        for item in self.stream(prompt, images, **kwargs):
            if isinstance(item, dict):
                stats = item
        text, tokens = stats.pop("text"), stats.pop("tokens")
        return GenerationResult(text=text, tokens=tokens, stats=stats)

    def _pin_point(self, ids, has_images: bool) -> Optional[int]:
        """Rows of this turn to pin: through its last image (or the system prompt on the first turn)."""
        c0 = self.cache[0]
        if not isinstance(c0, FixedKVCache):
            return None
        if has_images:
            end = self.model.config.vision_end_token_id
            n = max(i for i, t in enumerate(ids) if t == end) + 1
        elif self.turns == 0 and self.im_end in ids:
            n = ids.index(self.im_end) + 1
        else:
            return None
        if c0.offset + n > c0.max_tokens - c0.max_chunk:  # a pin is a prefix: it must fit before the ring
            if has_images:
                raise MemoryPlanError(
                    f"pinning this image needs {c0.offset + n} KV slots but the cache keeps only "
                    f"{c0.max_tokens - c0.max_chunk} for its pinned prefix: start a new chat (/reset), "
                    f"raise max_kv_tokens, or use fewer visual tokens (lower keep or max_pixels)"
                )
            return None
        return n

    def _trim(self, n: int) -> bool:
        if all(c.is_trimmable() for c in self.cache):
            for c in self.cache:
                c.trim(n)
            return True
        return False

    def save(self, path: str) -> None:
        """Save the conversation (KV cache and position state) to a .safetensors file.

        Written atomically. `SessionError` (nothing written) when `path` is a folder, a pipe or a file
        that is not a session file: only a previous session file is overwritten.
        """
        meta = {"next_pos": self.next_pos, "turns": self.turns, "closed": self.closed,
                "model_type": self.model.model_type, "model": _fingerprint(self.model)}
        save_cache(path, self.cache, {"chat": json.dumps(meta)})

    def load(self, path: str) -> None:
        """Restore a conversation saved by ``save`` with the same model and cache settings.

        The file is checked completely before anything is loaded; on any error (`SessionError` naming
        the problem) the conversation is left as it was.
        """
        info = read_cache_file(path)
        state = _chat_state(path, info["metadata"], self.model)
        self._check_settings(path, info)
        t = self.model.config.text
        cache, _ = load_cache(path, len(self.model.layers), t.num_key_value_heads, t.head_dim)
        self.cache, self.next_pos = cache, state["next_pos"]
        self.turns, self.closed = state["turns"], state["closed"]

    def _check_settings(self, path: str, info: dict) -> None:
        """Refuse a session whose cache is not the kind this chat makes (growing, or its fixed size and bits)."""
        mine = make_cache(self.model, self.max_kv_tokens, self.kv_bits)[0]
        ours = (type(mine).__name__, tuple(map(int, mine.meta_state)))
        theirs = (info["class"], info["meta"])
        if ours[0] == theirs[0] and ours[1][:1] + ours[1][2:5] == theirs[1][:1] + theirs[1][2:5]:
            return  # pinned and offset are the conversation's, not settings
        a, b = _cache_flags(*theirs), _cache_flags(*ours)
        if a == b:  # same flags, other internals: a session written by a program, not by `mlx-compact chat`
            raise SessionError(f"{path} was saved with a cache of max_chunk {theirs[1][2]} and group size "
                               f"{theirs[1][4]}; this chat's has {ours[1][2]} and {ours[1][4]}: it cannot be loaded here")
        fix = "restart chat without them" if theirs[0] == "KVCache" else f"restart chat with {a}"
        raise SessionError(f"{path} was saved with {a}; this chat has {b}: {fix} to load it")


def _fingerprint(model) -> dict:
    """What a session's cache depends on: the model's type and the sizes of its language model."""
    t = model.config.text
    return {"model_type": model.model_type, "layers": t.num_hidden_layers, "kv_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "hidden_size": t.hidden_size, "vocab_size": t.vocab_size}


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
    if not (isinstance(state, dict) and isinstance(state.get("model_type"), str)
            and all(type(state.get(k)) is int and 0 <= state[k] < 2**31 for k in ("next_pos", "turns"))
            and type(state.get("closed")) is bool):
        raise SessionError(f"session file {path} has no valid chat state: it was not saved by a chat, or it is corrupt")
    fingerprint = state.get("model", {})  # files saved before it have only model_type: their shapes are checked
    if not isinstance(fingerprint, dict):
        raise SessionError(f"session file {path} has a corrupt model fingerprint")
    theirs = {"model_type": state["model_type"], **fingerprint}
    diff = [f"{k} {str(theirs[k])[:40]}, this model's {v}" for k, v in _fingerprint(model).items()
            if k in theirs and theirs[k] != v]
    if diff:
        raise SessionError(f"session file {path} was saved with another model ({'; '.join(diff)})")
    return state
