"""Generation: preprocess, encode images, prefill in chunks, decode; with honest stats.

A stack of generators, as in mlx-lm: ``generate_step`` yields token ids, ``stream_generate`` yields
text chunks and finally the stats, ``generate`` collects everything into a ``GenerationResult``.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .cache import KVCache
from .compaction import Compaction, as_compaction, assemble, tower_hooks


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    stats: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A prompt ready for prefill: embeddings, positions, DeepStack rows, and timings.

    With compaction, everything here is already compact: ``input_ids`` / ``embeds`` / ``positions`` hold
    L_compact rows and ``kept`` maps each row to its row in the uncompacted prompt.
    """

    input_ids: List[int]
    embeds: mx.array  # [1, L, D]
    positions: mx.array  # [3, 1, L]
    rope_delta: int
    deepstack: Optional[List[mx.array]]  # each [1, L, D]
    visual_tokens: List[dict]
    preprocess_s: float
    vision_s: float
    compaction_s: float = 0.0
    kept: Optional[np.ndarray] = None  # [L] row of the uncompacted prompt behind each row
    compaction: Optional[Compaction] = None  # the compaction applied (None: uncompacted)


def _sampler(temperature: float, top_p: float = 1.0) -> Callable[[mx.array], mx.array]:
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p)


def set_default_compaction(model, compaction) -> None:
    """Make ``compaction`` (a Compaction, a dict, a "method[:keep[:where]]" string, or None) the model's default:
    ``generate`` / ``stream_generate`` / ``prepare`` use it when they are not given one."""
    model.default_compaction = as_compaction(compaction)


def _active(model, compaction) -> Optional[Compaction]:
    return as_compaction(compaction) if compaction is not None else getattr(model, "default_compaction", None)


def prepare_ids(model, input_ids: Sequence[int], pixel_values=None, grid=(), *, compaction=None,
                prompt_ids=None, preprocess_s: float = 0.0) -> Prepared:
    """Run the vision tower on token ids + patchified images, compact, splice and compute positions.

    ``grid``: the processor's (t, h, w) per image. ``compaction``: a Compaction (or spec; see
    ``set_default_compaction``); None uses the model's default, and without one nothing is compacted.
    ``prompt_ids``: the question's token ids for prompt-aware operators.
    """
    c = _active(model, compaction)
    ids = [int(i) for i in input_ids]
    grid = [tuple(int(v) for v in g) for g in grid]
    t1 = time.perf_counter()
    visual, ds, attention, units = [], None, None, None
    if grid:
        out = model.encode(mx.array(pixel_values), grid, **tower_hooks(model, c))
        mx.eval(out.features, out.deepstack)
        visual, ds = model.split_visual(out, grid)
        units = out.units
        if out.attention is not None:
            sizes = np.cumsum([t * h * w // model.config.vision.spatial_merge_size**2 for t, h, w in grid])[:-1]
            attention = mx.split(out.attention, sizes.tolist())
    t2 = time.perf_counter()
    positions, _ = model.positions(ids, grid)
    m = model.config.vision.spatial_merge_size
    merged = [(t, h // m, w // m) for t, h, w in grid]
    a = assemble(model, ids, visual, positions, merged, c, deepstack=ds if ds and ds[0] else None,
                 attention=attention, kept=units, prompt_ids=prompt_ids)
    if c is not None:
        mx.eval(a.embeds, a.deepstack)
    t3 = time.perf_counter()
    return Prepared(a.input_ids, a.embeds, a.positions, a.rope_delta, a.deepstack, a.visual_tokens,
                    preprocess_s, t2 - t1, t3 - t2, a.kept, c)


def prepare(model, processor, prompt: str, images: Sequence = (), *, max_pixels=None, chat_template=True,
            compaction=None) -> Prepared:
    """Tokenize the prompt, run the vision tower, compact (optional), splice visual tokens and compute positions."""
    t0 = time.perf_counter()
    images = list(images or [])
    text = processor.build_prompt(prompt, n_images=len(images)) if chat_template else prompt
    inputs = processor(text=text, images=images or None, max_pixels=max_pixels)
    ids = [int(i) for i in inputs["input_ids"][0]]
    grid = inputs["grid_thw"] if images else ()
    prompt_ids = None
    if _active(model, compaction) is not None and _active(model, compaction).single_turn:
        prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prepare_ids(model, ids, inputs.get("pixel_values"), grid, compaction=compaction, prompt_ids=prompt_ids,
                       preprocess_s=time.perf_counter() - t0)


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
    compaction=None,
) -> Iterator:
    """Yield text chunks as they are generated, then (last) the stats dict.

    ``compaction``: a ``Compaction`` (or spec) for the visual tokens; None uses the model's default
    (``set_default_compaction``). With one, the LLM prefill and the KV cache only see the compact sequence,
    ``visual_tokens`` reports before/after per image and ``ttft_s`` gains a "compaction" entry.
    """
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    prep = prepare(model, processor, prompt, images, max_pixels=max_pixels, compaction=compaction)
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
    ttft = {"preprocess": prep.preprocess_s, "vision": prep.vision_s, "prefill": (t_first or t_end) - t_prefill}
    if prep.compaction is not None:
        ttft["compaction"] = prep.compaction_s
    yield {
        "text": processor.decode(tokens),
        "tokens": tokens,
        "prompt_tokens": len(prep.input_ids),
        "generation_tokens": len(tokens),
        "visual_tokens": prep.visual_tokens,
        "kv_bytes_allocated": sum(c.nbytes for c in cache),
        "kv_bytes_used": sum(getattr(c, "used_bytes", c.nbytes) for c in cache),
        "ttft_s": ttft,
        "decode_tokens_per_s": decoded / (t_end - t_first) if decoded and t_first else 0.0,
        "peak_memory_bytes": mx.get_peak_memory(),
    }


def generate(model, processor, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
    """Generate a reply to ``prompt`` about ``images``; see ``stream_generate`` for the options.

    Returns a ``GenerationResult`` with ``.text``, ``.tokens`` and ``.stats`` (prompt and generated
    token counts, visual tokens before/after per image, KV bytes allocated and used, TTFT split into
    preprocess / vision / prefill seconds (and compaction, when compacting), decode tokens/s, peak memory
    since the call began). ``compaction=Compaction(...)`` compacts the visual tokens end to end.
    """
    stats = None
    for item in stream_generate(model, processor, prompt, images, **kwargs):
        if isinstance(item, dict):
            stats = item
    text, tokens = stats.pop("text"), stats.pop("tokens")
    return GenerationResult(text=text, tokens=tokens, stats=stats)
