"""Generation: preprocess, encode images, prefill in chunks, decode; with honest stats.

A stack of generators, as in mlx-lm: ``generate_step`` yields token ids, ``stream_generate`` yields
text chunks and finally the stats, ``generate`` collects everything into a ``GenerationResult``.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx

from .cache import KVCache


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    stats: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A prompt ready for prefill: embeddings, positions, DeepStack rows, and timings."""

    input_ids: List[int]
    embeds: mx.array  # [1, L, D]
    positions: mx.array  # [3, 1, L]
    rope_delta: int
    deepstack: Optional[List[mx.array]]  # each [1, L, D]
    visual_tokens: List[dict]
    preprocess_s: float
    vision_s: float


def _sampler(temperature: float, top_p: float = 1.0) -> Callable[[mx.array], mx.array]:
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p)


def prepare(model, processor, prompt: str, images: Sequence = (), *, max_pixels=None, chat_template=True) -> Prepared:
    """Tokenize the prompt, run the vision tower, splice visual tokens and compute positions."""
    t0 = time.perf_counter()
    images = list(images or [])
    text = processor.build_prompt(prompt, n_images=len(images)) if chat_template else prompt
    inputs = processor(text=text, images=images or None, max_pixels=max_pixels)
    ids = [int(i) for i in inputs["input_ids"][0]]
    t1 = time.perf_counter()
    grid = [tuple(int(v) for v in g) for g in inputs["grid_thw"]] if images else []
    visual, ds = [], None
    if images:
        out = model.encode(mx.array(inputs["pixel_values"]), grid)
        mx.eval(out.features, out.deepstack)
        visual, ds = model.split_visual(out, grid)
    t2 = time.perf_counter()
    embeds, deepstack = model.splice(ids, visual, ds if ds and ds[0] else None)
    positions, delta = model.positions(ids, grid)
    merge = model.config.vision.spatial_merge_size ** 2
    counts = [{"before": t * h * w // merge, "after": t * h * w // merge} for t, h, w in grid]
    return Prepared(ids, embeds, mx.array(positions)[:, None, :], delta, deepstack, counts, t1 - t0, t2 - t1)


def make_cache(model) -> list:
    """A plain growing KV cache, one per LLM layer."""
    return [KVCache() for _ in model.layers]


def prefill(model, prep: Prepared, cache: list, step: int = 512) -> mx.array:
    """Run the prompt through the LLM in chunks of ``step`` tokens; return the last logits [1, V]."""
    L = prep.embeds.shape[1]
    for i in range(0, L, step):
        j = min(i + step, L)
        ds = [d[:, i:j] for d in prep.deepstack] if prep.deepstack else None
        logits = model.language_model(
            prep.embeds[:, i:j], prep.positions[:, :, i:j], cache=cache, deepstack=ds, last_only=True
        )
        if j < L:
            mx.eval([c.state for c in cache])
    return logits[:, -1, :]


def generate_step(model, prep: Prepared, cache: list, sampler, prefill_step: int = 512) -> Iterator[int]:
    """Yield generated token ids forever (the caller stops). Decode position = offset + rope delta."""
    logits = prefill(model, prep, cache, prefill_step)
    embed = model.language_model.model.embed_tokens
    L = prep.embeds.shape[1]
    n = 0
    token = sampler(logits)
    mx.async_eval(token)
    while True:
        pos = mx.full((3, 1, 1), L + n + prep.rope_delta, dtype=mx.int32)
        next_logits = model.language_model(embed(token.reshape(1, 1)), pos, cache=cache)
        next_token = sampler(next_logits[:, -1, :])
        mx.async_eval(next_token)
        yield int(token.item())
        token = next_token
        n += 1


def stream_generate(
    model,
    processor,
    prompt: str,
    images: Sequence = (),
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_pixels: Optional[int] = None,
    prefill_step: int = 512,
    seed: Optional[int] = None,
) -> Iterator:
    """Yield text chunks as they are generated, then (last) the stats dict."""
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    prep = prepare(model, processor, prompt, images, max_pixels=max_pixels)
    cache = make_cache(model)
    eos = set(processor.eos_token_ids)
    t_prefill = time.perf_counter()
    tokens, text, t_first = [], "", None
    for tok in generate_step(model, prep, cache, _sampler(temperature, top_p), prefill_step):
        if t_first is None:
            t_first = time.perf_counter()
        if tok in eos or len(tokens) >= max_tokens:
            break
        tokens.append(tok)
        new_text = processor.decode(tokens)
        if len(new_text) > len(text) and not new_text.endswith("\ufffd"):
            yield new_text[len(text) :]
            text = new_text
    t_end = time.perf_counter()
    decoded = max(len(tokens) - 1, 0)
    yield {
        "text": processor.decode(tokens),
        "tokens": tokens,
        "prompt_tokens": len(prep.input_ids),
        "generation_tokens": len(tokens),
        "visual_tokens": prep.visual_tokens,
        "kv_bytes_allocated": sum(c.nbytes for c in cache),
        "kv_bytes_used": sum(getattr(c, "used_bytes", c.nbytes) for c in cache),
        "ttft_s": {"preprocess": prep.preprocess_s, "vision": prep.vision_s, "prefill": (t_first or t_end) - t_prefill},
        "decode_tokens_per_s": decoded / (t_end - t_first) if decoded and t_first else 0.0,
        "peak_memory_bytes": mx.get_peak_memory(),
    }


def generate(model, processor, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
    """Generate a reply to ``prompt`` about ``images``; see ``stream_generate`` for the options.

    Returns a ``GenerationResult`` with ``.text``, ``.tokens`` and ``.stats`` (prompt and generated
    token counts, visual tokens before/after per image, KV bytes allocated and used, TTFT split into
    preprocess / vision / prefill seconds, decode tokens/s, peak memory since the call began).
    """
    stats = None
    for item in stream_generate(model, processor, prompt, images, **kwargs):
        if isinstance(item, dict):
            stats = item
    text, tokens = stats.pop("text"), stats.pop("tokens")
    return GenerationResult(text=text, tokens=tokens, stats=stats)
