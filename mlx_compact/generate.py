"""Generation: preprocess, encode images, prefill in chunks, decode; with honest stats.

A stack of generators, as in mlx-lm: ``generate_step`` yields token ids, ``stream_generate`` yields
text chunks and finally the stats, ``generate`` collects everything into a ``GenerationResult``.
"""

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

from .cache import FixedKVCache, LinearCache, kv_cache
from .compaction import Compaction, as_compaction, assemble, tower_hooks
from .files import InputError
from .images import ImageFile, open_image
from .memory import MemoryPlanError, fmt_bytes, plan, planned_compaction, weights_bytes, wired_limit
from .models.language import attention_cache
from .models.rope_index import PER_FRAME_VIDEO
from .pipeline import RemoteCaches, pipeline_of
from .video import open_videos


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """A prompt ready for prefill: embeddings, positions, DeepStack rows, and timings.

    With compaction, everything here is already compact: ``input_ids`` / ``embeds`` / ``positions`` hold
    L_compact rows and ``kept`` maps each row to its row in the uncompacted prompt.
    """

    input_ids: list[int]
    embeds: mx.array  # [1, L, D]
    positions: mx.array  # [3, 1, L]
    deepstack: list[mx.array] | None  # each [1, L, D]
    visual_tokens: list[dict]
    preprocess_s: float
    vision_s: float
    compaction_s: float = 0.0
    kept: np.ndarray | None = None  # [L] row of the uncompacted prompt behind each row
    compaction: Compaction | None = None  # the compaction applied (None: uncompacted)
    key_bias: mx.array | None = None  # [1, L] log(mass) of each row (proportional attention); None: all 0
    decode_bytes: int = 0  # the largest image file's decoded pixels


def _sampler(
    temperature: float, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> Callable[[mx.array], mx.array]:
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p)


def set_seed(value: int) -> None:
    """Seed MLX's generator with any integer (taken modulo 2**64, as MLX takes 64-bit seeds)."""
    mx.random.seed(int(value) % 2**64)


def check_prompt(processor, prompt: str) -> None:
    """Refuse a prompt that is not valid text or that holds one of the model's special tokens (such as
    ``<|image_pad|>`` or ``<|im_start|>``): the tokenizer would read them as structure, not as text."""
    if not isinstance(prompt, str):
        raise InputError(f"the prompt must be text, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the prompt is not valid UTF-8 text; re-encode it as UTF-8") from None
    special = getattr(processor, "special_texts", None)
    if special is None:
        decoder = getattr(processor.tokenizer, "added_tokens_decoder", {}) or {}
        special = sorted(
            {t.content for t in decoder.values() if getattr(t, "special", False)}
            | set(getattr(processor.tokenizer, "all_special_tokens", [])),
            key=len,
            reverse=True,
        )
        processor.special_texts = special
    hit = next((t for t in special if t and t in prompt), None)
    if hit is not None:
        raise InputError(
            f"the prompt contains the model's special token {hit}, which would be read as prompt "
            "structure rather than text; remove it (images are given separately)"
        )


def _active(model, compaction) -> Compaction | None:
    """The compaction a call runs with: its own ``compaction`` (a Compaction or spec), else the model's explicit
    default ``model.default_compaction`` (declared by `models.base.VLModel`, None unless ``load(compaction=...)``
    or the caller set it), else None: nothing is compacted. The one place the runtime reads the default."""
    return as_compaction(compaction) if compaction is not None else model.default_compaction


def prepare_ids(
    model,
    input_ids: Sequence[int],
    pixel_values=None,
    grid=(),
    *,
    compaction=None,
    prompt_ids=None,
    preprocess_s: float = 0.0,
    pixel_values_videos=None,
    video_grid=(),
    second_per_grid_ts=None,
) -> Prepared:
    """Run the vision tower on token ids + patchified images / videos, compact, splice and compute positions.

    ``grid``: the processor's (t, h, w) per image; ``pixel_values_videos`` / ``video_grid`` /
    ``second_per_grid_ts``: the processor's for videos (a Qwen3-VL video is one block per temporal slice,
    each compacted with its own budget; a Qwen2/2.5-VL video is one block). ``compaction``: a Compaction (or
    spec); None uses the model's ``default_compaction``, and without one nothing is compacted.
    ``prompt_ids``: the question's token ids for prompt-aware operators.
    """
    c = _active(model, compaction)
    ids = [int(i) for i in input_ids]
    grid = [tuple(int(v) for v in g) for g in grid]
    video_grid = [tuple(int(v) for v in g) for g in video_grid]
    t1 = time.perf_counter()
    encoded = {
        kind: iter(_encode_blocks(model, pv, g, c, kind == "video" and model.model_type in PER_FRAME_VIDEO))
        for kind, pv, g in (("image", pixel_values, grid), ("video", pixel_values_videos, video_grid))
        if g
    }
    kinds = model.visual_kinds(ids)
    if any(kinds.count(k) and k not in encoded for k in ("image", "video")):
        raise ValueError(f"the prompt has {len(kinds)} visual blocks but their pixels were not given")
    blocks = [next(encoded[k], None) for k in kinds]
    if None in blocks or any(next(it, None) is not None for it in encoded.values()):
        raise ValueError(f"the prompt has {len(kinds)} visual blocks, which do not match the images / videos encoded")
    visual, ds, attention, units, unit_mass, merged = (list(x) for x in zip(*blocks)) if blocks else ([],) * 6
    attention = None if all(a is None for a in attention) else attention
    if not units or units[0] is None:
        units = unit_mass = None
    t2 = time.perf_counter()
    positions, _ = model.positions(ids, grid, video_grid, second_per_grid_ts)
    a = assemble(
        model,
        ids,
        visual,
        positions,
        merged,
        c,
        deepstack=ds if ds and ds[0] else None,
        attention=attention,
        kept=units,
        unit_mass=unit_mass,
        prompt_ids=prompt_ids,
    )
    if c is not None:
        mx.eval(a.embeds, a.deepstack)
    t3 = time.perf_counter()
    bias = None
    if a.mass is not None and (a.mass != 1).any():  # all masses 1: the unbiased computation, bit for bit
        bias = mx.log(mx.array(a.mass))[None]  # [1, L]
    return Prepared(
        a.input_ids,
        a.embeds,
        a.positions,
        a.deepstack,
        a.visual_tokens,
        preprocess_s,
        t2 - t1,
        t3 - t2,
        a.kept,
        c,
        key_bias=bias,
    )


def _encode_blocks(model, pixel_values, grid: list, c, per_frame: bool) -> list:
    """The vision tower on one kind of visual input: per block (an image, a video, or with ``per_frame`` one
    temporal slice of a video) (features [n, D], DeepStack list, attention received or None, kept units or
    None, their mass or None, merged grid)."""
    out = model.encode(mx.array(pixel_values), grid, **tower_hooks(model, c))
    mx.eval(out.features, out.deepstack)
    feats, ds = model.split_visual(out, grid, per_frame)
    m = model.config.vision.spatial_merge_size
    if per_frame:
        merged = [(1, h // m, w // m) for t, h, w in grid for _ in range(t)]
    else:
        merged = [(t, h // m, w // m) for t, h, w in grid]
    n = len(merged)
    attention = [None] * n
    if out.attention is not None:
        sizes = np.cumsum([t * h * w for t, h, w in merged])[:-1].tolist()
        attention = mx.split(out.attention, sizes) if sizes else [out.attention]
    units, masses = [None] * n, [None] * n
    if out.units is not None and per_frame:  # kept units of each slice, local to it
        units, masses = [], []
        for j, (t, h, w) in enumerate(grid):
            u, per = np.array(out.units[j]), (h // m) * (w // m)
            mass = None if out.unit_mass is None else np.array(out.unit_mass[j])
            for s in range(t):
                sel = (u >= s * per) & (u < (s + 1) * per)
                units.append(u[sel] - s * per)
                masses.append(None if mass is None else mass[sel])
    elif out.units is not None:
        units = list(out.units)
        masses = list(out.unit_mass) if out.unit_mass is not None else masses
    return list(zip(feats, ds, attention, units, masses, merged))


def prepare(
    model, processor, prompt: str, images: Sequence = (), *, max_pixels=None, chat_template=True, compaction=None
) -> Prepared:
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
    prep = prepare_ids(
        model,
        ids,
        inputs.get("pixel_values"),
        grid,
        compaction=compaction,
        prompt_ids=prompt_ids,
        preprocess_s=time.perf_counter() - t0,
    )
    prep.decode_bytes = max([im.decoded_bytes for im in images if isinstance(im, ImageFile)], default=0)
    return prep


def make_cache(
    model, max_kv_size: int | None = None, kv_bits: int | None = None, kv_group_size: int | None = None
) -> list:
    """The model's per-layer caches: ``model.make_cache(...)`` when it has one (a hybrid model: a fixed linear
    state per linear layer), else a KV cache per layer. KV caches grow, or are fixed-size/rotating when
    ``max_kv_size`` is given (allocated once at its full size on the first write; ``kv_bits`` 8 or 4 quantizes
    them). Quantized groups default to `memory.kv_group_size` (64 values, 32 when head_dim is not a multiple
    of 64)."""
    check_cache_options(max_kv_size, kv_bits)
    build = getattr(model, "make_cache", None)
    if callable(build):
        return build(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    t = model.config.text
    return [kv_cache(t.head_dim, max_kv_size, kv_bits, kv_group_size) for _ in range(t.num_hidden_layers)]


def check_cache_options(max_kv_size: int | None = None, kv_bits: int | None = None) -> None:
    """Refuse cache settings that no model takes (checked before a model is loaded)."""
    if max_kv_size is not None and (not isinstance(max_kv_size, int) or max_kv_size < 1):
        raise InputError(f"max_kv_size must be a whole number >= 1, got {max_kv_size!r}")
    if kv_bits is not None and kv_bits not in (4, 8):
        raise InputError(f"kv_bits must be 4 or 8, got {kv_bits!r}")
    if max_kv_size is None and kv_bits is not None:
        raise InputError(
            "--kv-bits needs --max-kv-tokens (kv_bits needs max_kv_size): a quantized cache has a fixed size"
        )


class PromptCache(list):
    """The per-layer KV caches of one conversation (a list, like mlx-lm's prompt caches) and where it stands.

    ``position``: M-RoPE position of the next token (it runs ahead of the token count: images take fewer
    positions than tokens, compaction drops tokens). ``turns``: turns held. ``closed``: the last answer's
    end-of-turn token is in the cache. ``text``: everything fed so far, as text (special tokens included),
    so the next turn can be cut from the checkpoint's own chat template. ``messages``: the conversation.
    """

    def __init__(self, caches=(), position: int = 0, turns: int = 0, closed: bool = True):
        super().__init__(caches)
        self.position, self.turns, self.closed = position, turns, closed
        self.text, self.messages = "", []

    @property
    def max_kv_size(self) -> int | None:
        """Slots of a fixed-size cache, None for a growing one."""
        c = attention_cache(self)
        return c.max_tokens if isinstance(c, FixedKVCache) else None

    @property
    def kv_bits(self) -> int | None:
        return getattr(attention_cache(self), "bits", None)

    @property
    def offset(self) -> int:
        """Tokens written so far."""
        c = attention_cache(self)
        return c.offset if c is not None else 0


def make_prompt_cache(
    model, max_kv_size: int | None = None, kv_bits: int | None = None, kv_group_size: int | None = None
) -> PromptCache:
    """A cache for ``generate`` / ``stream_generate(prompt_cache=...)``: calls on the same cache continue one
    conversation. ``model.make_cache(...)`` builds it when the model defines one (hybrid models), else one KV
    cache per layer (`make_cache`): growing, or of ``max_kv_size`` slots (``kv_bits`` 8/4: quantized). In a
    pipeline (rank 0), the other ranks make theirs for their layers, held by the list's last element."""
    caches = model_caches(model, max_kv_size, kv_bits, kv_group_size)
    pipe = pipeline_of(model)
    if pipe is not None:
        caches.append(RemoteCaches(pipe, max_kv_size, kv_bits, kv_group_size))
    return PromptCache(caches)


def model_caches(
    model, max_kv_size: int | None = None, kv_bits: int | None = None, kv_group_size: int | None = None
) -> list:
    """The caches of the layers this process runs (a pipeline rank: its slice of `make_cache`'s per-layer list)."""
    first, stop = model.language_model.layer_range
    return list(make_cache(model, max_kv_size, kv_bits, kv_group_size))[first:stop]


def pin_point(model, cache: list, ids: Sequence[int], first_turn: bool, im_end_id: int | None) -> int | None:
    """Rows of this turn to pin in a fixed-size cache (after what it holds): through the last image, or the
    system prompt on the first turn; None when nothing is pinned. A pin is a prefix of the cache: an image
    that no longer fits before the ring is a `MemoryPlanError`."""
    c0 = attention_cache(cache)
    if not isinstance(c0, FixedKVCache):
        return None
    end = model.config.vision_end_token_id
    has_images = end in ids
    if has_images:
        n = max(i for i, t in enumerate(ids) if t == end) + 1
    elif first_turn and im_end_id in ids:
        n = list(ids).index(im_end_id) + 1
    else:
        return None
    if c0.offset > c0.max_tokens or c0.offset + n > c0.max_tokens - c0.max_chunk:
        if has_images:
            raise MemoryPlanError(
                f"pinning this image needs {c0.offset + n} KV slots but the cache keeps only "
                f"{c0.max_tokens - c0.max_chunk} for its pinned prefix: start a new conversation, raise the cache "
                f"size (--max-kv-tokens) to at least {c0.offset + n + c0.max_chunk}, or use fewer visual tokens "
                "(lower keep or max_pixels)"
            )
        return None
    return n


def prefill(
    model,
    prep: Prepared,
    cache: list,
    step: int = 512,
    pin: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Run the prompt through the LLM in chunks of ``step`` tokens; return the last logits [1, V].

    ``pin``: with a fixed-size cache, pin the first ``pin`` rows of this prompt (after the tokens already
    cached) once they are written, so they never rotate out (see `pin_point`). ``progress(done, total)`` is
    called after each chunk.
    """
    L = prep.embeds.shape[1]
    c0 = attention_cache(cache)
    fixed = isinstance(c0, FixedKVCache)
    if fixed:
        step = min(step, c0.max_chunk)
    cuts = sorted(set(list(range(0, L, step)) + ([pin] if fixed and pin else []) + [L]))
    start = c0.offset
    for i, j in zip(cuts[:-1], cuts[1:]):
        ds = [d[:, i:j] for d in prep.deepstack] if prep.deepstack else None
        bias = None if prep.key_bias is None else prep.key_bias[:, i:j]
        logits = model.language_model(
            prep.embeds[:, i:j], prep.positions[:, :, i:j], cache=cache, deepstack=ds, last_only=True, key_bias=bias
        )
        if fixed and pin and j == pin:
            mx.eval([c.state for c in cache])
            for c in cache:
                if isinstance(c, (FixedKVCache, RemoteCaches)):  # the other ranks pin theirs
                    c.pin(start + pin)
        elif j < L:
            mx.eval([c.state for c in cache])
        if progress is not None:
            progress(j, L)
    return logits[:, -1, :]


def generate_step(
    model,
    prep: Prepared,
    cache: list,
    sampler=None,
    prefill_step_size: int = 512,
    pin: int | None = None,
    progress=None,
    logits_processors=None,
    max_tokens: int | None = None,
    prefilled: Callable[[], None] | None = None,
) -> Iterator[tuple]:
    """Yield ``(token id, logprobs [V])`` forever (the caller stops), as mlx-lm's ``generate_step``; with
    ``max_tokens``, that many and no step is computed past the last. ``prefilled()`` is called once the
    prompt is in the cache (evaluated), before the first decode step writes to it.

    ``sampler(logprobs [1, V]) -> [1]`` (default greedy; mlx-lm's ``make_sampler`` makes others);
    ``logits_processors``: mlx-lm's ``(tokens so far [T], logits [1, V]) -> logits`` (``make_logits_processors``).
    Decode step n sits at position max(prompt positions) + 1 + n. The next step is computed while the current
    token is handed out (double-buffered).
    """
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    history = mx.array(prep.input_ids, dtype=mx.int32)  # [T] what the logits processors see

    def sample(logits):
        nonlocal history
        for processor in logits_processors or ():
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [1, V]
        token = sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token.reshape(-1).astype(mx.int32)])
        return token, logprobs

    logits = prefill(model, prep, cache, prefill_step_size, pin, progress)
    if prefilled is not None:
        mx.eval(logits, [c.state for c in cache])
        prefilled()
    embed = model.language_model.model.embed_tokens
    next_pos = int(prep.positions.max().item()) + 1
    token, logprobs = sample(logits)
    mx.async_eval(token, logprobs)
    n = 1  # tokens sampled
    while max_tokens is None or n < max_tokens:
        pos = mx.full((3, 1, 1), next_pos, dtype=mx.int32)
        next_logits = model.language_model(embed(token.reshape(1, 1)), pos, cache=cache)
        next_token, next_logprobs = sample(next_logits[:, -1, :])
        mx.async_eval(next_token, next_logprobs)
        yield int(token.item()), logprobs[0]
        token, logprobs = next_token, next_logprobs
        next_pos += 1
        n += 1
    yield int(token.item()), logprobs[0]


def image_grids(processor, images: Sequence, max_pixels: int | None = None) -> list[tuple]:
    """The merged grid (1, h, w) each image becomes (what `plan` and `Compaction.kept` take), read from image
    headers only (nothing decoded or allocated)."""
    f = processor.image.factor
    sizes = (processor.image_resized_size(*_hw(im), max_pixels=max_pixels) for im in images)
    return [(1, h // f, w // f) for h, w in sizes]


def image_patches(processor, images: Sequence, max_pixels: int | None = None) -> list[int]:
    """Patches each image will become, read from image headers only (nothing decoded or allocated)."""
    merge = processor.image.merge_size**2
    return [t * h * w * merge for t, h, w in image_grids(processor, images, max_pixels)]


def video_grids(processor, videos: Sequence) -> list[tuple]:
    """The merged grid (t, h, w) each video becomes, one block per video (its vision tower runs all its slices at
    once), from its metadata only (`mlx_compact.video.Video`s or what `open_video` takes; nothing decoded)."""
    v = processor.video
    out = []
    for video in open_videos(videos, factor=v.temporal_patch_size):
        h, w = processor.video_resized_size(video.num_frames, video.height, video.width)
        out.append((-(-video.num_frames // v.temporal_patch_size), h // v.factor, w // v.factor))
    return out


def video_patches(processor, videos: Sequence) -> list[int]:
    """Patches each video will become, from its metadata only (nothing decoded or allocated)."""
    merge = processor.video.merge_size**2
    return [t * h * w * merge for t, h, w in video_grids(processor, videos)]


def video_decode_bytes(processor, videos: Sequence) -> int:
    """Peak bytes of decoding and preprocessing the videos (all are held for the processor): their frames in
    RGB, and float32 copies of their resized frames (each video's normalized stack and patches while it is
    processed, every video's patches and their concatenation at the end)."""
    v = processor.video
    frames, patches = [], []
    for video in open_videos(videos, factor=v.temporal_patch_size):
        h, w = processor.video_resized_size(video.num_frames, video.height, video.width)
        frames.append(video.decode_bytes())
        patches.append(-(-video.num_frames // v.temporal_patch_size) * v.temporal_patch_size * 3 * h * w * 4)
    return sum(frames) + 2 * sum(patches) + 2 * max(patches, default=0)


def image_files(images: Sequence) -> list:
    """Paths become `ImageFile`s (headers read, nothing decoded); other images are kept as they are."""
    return [open_image(im) if isinstance(im, (str, os.PathLike)) else im for im in images]


def decode_bytes(processor, images: Sequence, max_pixels=None, scales: Sequence[int] | None = None) -> int:
    """The largest decode peak among the image files (in-memory images are already decoded: 0)."""
    peaks = [0]
    for i, im in enumerate(images):
        if isinstance(im, ImageFile):
            peaks.append(im.decode_bytes(scales[i] if scales else None))
    return max(peaks)


def plan_run(
    model,
    processor,
    prompt: str,
    images: Sequence,
    *,
    max_pixels=None,
    keep: float = 1.0,
    compaction=None,
    max_kv_tokens=None,
    kv_bits=None,
    max_tokens: int = 256,
    prefill_step: int = 512,
    budget=None,
    scales: Sequence[int] | None = None,
    key_bias: bool = False,
    held: int = 0,
    videos: Sequence = (),
):
    """The memory plan of a run, from image headers and the prompt (text estimate: the prompt + 32 tokens).

    ``compaction`` (or ``keep`` < 1, shorthand for ``Compaction(keep=keep)``): the visual tokens are counted as
    `Compaction.kept` of each image's grid, what the run keeps.
    ``scales``: the JPEG decode reduction of each image (default: each ImageFile's ``scale``); ``held``: tokens
    the conversation's cache already holds. ``videos``: planned from their metadata (`mlx_compact.video`), each
    one block (`video_grids`), with 8 text tokens per temporal slice (Qwen3-VL's timestamps)."""
    images = image_files(images)
    videos = open_videos(videos or (), factor=processor.video.temporal_patch_size)
    text_tokens = len(processor.tokenizer(prompt)["input_ids"]) + 32 + held
    text_tokens += sum(8 * -(-v.num_frames // processor.video.temporal_patch_size) for v in videos)
    decode = decode_bytes(processor, images, max_pixels, scales)
    if videos:
        decode = max(decode, video_decode_bytes(processor, videos))
    return plan(
        model,
        image_grids(processor, images, max_pixels) + video_grids(processor, videos),
        text_tokens,
        compaction=compaction,
        keep=keep,
        max_kv_tokens=max_kv_tokens,
        kv_bits=kv_bits,
        max_tokens=max_tokens,
        prefill_step=prefill_step,
        budget=budget,
        decode_bytes=decode,
        key_bias=key_bias,
    )


def what_fits(model, processor, prompt: str, images: Sequence, **settings) -> list[dict]:
    """Changes to ``settings`` (``plan_run``'s keywords) that would make the plan fit: the largest
    ``max_pixels`` that fits, a lower ``keep``, a quantized fixed-size cache."""
    base = plan_run(model, processor, prompt, images, **settings)

    def fits(**change) -> bool:
        return plan_run(model, processor, prompt, images, **{**settings, **change}).fits

    out = []
    mp0 = settings.get("max_pixels")
    if images:
        current = max(h * w for h, w in (processor.image_resized_size(*_hw(im), max_pixels=mp0) for im in images))
        mp = next((m for m in (int(current / 2**i) for i in range(1, 12)) if m >= 56 * 56 and fits(max_pixels=m)), None)
        if mp is not None:
            out.append({"max_pixels": mp})
    c = planned_compaction(settings.get("compaction"), settings.get("keep", 1.0))
    keep = 1.0 if c.is_identity or c.tokens is not None else c.keep

    def lower(k):  # the run's compaction at a lower keep
        return Compaction(keep=k) if c.method == "none" else replace(c, keep=k, tokens=None)

    k = next((k for k in (0.5, 0.33, 0.25, 0.1) if k < keep and fits(compaction=lower(k), keep=1.0)), None)
    if k is not None:
        out.append({"keep": k})
    if settings.get("kv_bits") is None:
        kv = settings.get("max_kv_tokens") or base.tokens
        bits = next((b for b in (8, 4) if fits(max_kv_tokens=kv, kv_bits=b)), None)
        if bits is not None:
            out.append({"max_kv_tokens": kv, "kv_bits": bits})
    return out


def check_memory(
    model,
    processor,
    prompt: str,
    images: Sequence,
    *,
    max_pixels=None,
    compaction=None,
    max_kv_tokens=None,
    kv_bits=None,
    max_tokens=256,
    prefill_step=512,
    budget=None,
    fit: str = "refuse",
    held: int = 0,
    videos: Sequence = (),
):
    """Plan the run before anything is allocated. Returns the (possibly lowered) max_pixels.

    Every run is planned, text-only ones too (weights, the KV cache asked for, the prompt). Image files
    (paths or `ImageFile`s) are planned from their headers, with the pixels their decoding holds; a JPEG
    whose full decode would not fit is decoded at 1/2 to 1/8 of its size (never below what the model
    sees): its ``ImageFile.scale`` is set here. ``videos`` (`mlx_compact.video.Video`s) are planned from
    their metadata: their frames are never shrunk here (take fewer: ``fps`` / ``max_frames``).

    ``fit="refuse"`` raises ``MemoryPlanError`` naming what would fit; ``"auto"`` lowers max_pixels until
    the plan fits (and refuses if nothing does); ``"off"`` skips the check.
    """
    if fit == "off":
        return max_pixels
    c = _active(model, compaction)
    settings = dict(
        max_pixels=max_pixels,
        compaction=c,
        key_bias=c is not None and c.proportional and bool(images or videos),
        max_kv_tokens=max_kv_tokens,
        kv_bits=kv_bits,
        held=held,
        videos=videos,
        max_tokens=max_tokens,
        prefill_step=prefill_step,
        budget=budget,
    )
    images = image_files(images)
    p = plan_run(model, processor, prompt, images, **settings)
    if p.fits:
        return max_pixels
    if _reduce_decodes(model, processor, prompt, images, settings):
        return max_pixels
    advice = what_fits(model, processor, prompt, images, **settings)
    smaller = next((a["max_pixels"] for a in advice if "max_pixels" in a), None)
    if fit == "auto" and smaller is not None:
        _reduce_decodes(model, processor, prompt, images, {**settings, "max_pixels": smaller})
        return smaller
    f = fmt_bytes
    tips = ", ".join(" ".join(f"{k}={v}" for k, v in a.items()) for a in advice)
    if not tips and not videos and p.decode > max(p.vision, p.kv + p.prefill):
        tips = "nothing at these settings: decoding the largest image alone takes most of it; use a smaller image"
    if videos:
        tips = ", ".join(t for t in (tips, "fewer video frames (fps / max_frames, --fps / --max-frames)") if t)
    if p.peak <= p.budget and p.short_rank is not None:
        r, peak, budget = p.short_rank
        raise MemoryPlanError(
            f"rank {r} of the pipeline would need about {f(peak)} for its layers (weights, KV cache, prefill peak) "
            f"but {f(budget)} is available there; what would fit: {tips or 'nothing at these settings'}"
        )
    raise MemoryPlanError(
        f"this run would need about {f(p.peak)} (weights {f(p.weights)}, KV {f(p.kv)}, image decode {f(p.decode)}, "
        f"vision peak {f(p.vision)}, prefill peak {f(p.prefill)}) but {f(p.budget)} is available; what would fit: "
        f"{tips or 'nothing at these settings; use a smaller model'}"
    )


def _reduce_decodes(model, processor, prompt: str, images: list, settings: dict) -> bool:
    """Decode JPEGs at the smallest reduction that keeps the size the model sees, largest first, until the
    plan fits; set their ``scale`` and return True if it does (else leave every scale at 1)."""
    files = sorted((im for im in images if isinstance(im, ImageFile)), key=lambda im: -im.decode_bytes(1))
    for im in files:
        h, w = processor.image_resized_size(im.height, im.width, max_pixels=settings.get("max_pixels"))
        im.scale = im.max_scale(h, w)
        if plan_run(model, processor, prompt, images, **settings).fits:
            return True
    for im in files:
        im.scale = 1
    return False


def _hw(im) -> tuple:
    """(height, width) of a path, ImageFile, PIL image or HWC array, without decoding pixels."""
    if isinstance(im, (str, bytes)) or hasattr(im, "__fspath__"):
        im = open_image(im)
    if isinstance(im, ImageFile):
        return im.height, im.width
    if hasattr(im, "size") and not hasattr(im, "shape"):
        return im.size[1], im.size[0]
    return im.shape[0], im.shape[1]


@dataclass
class GenerationResponse:
    """One step of ``stream_generate`` (mlx-lm's shape): the new ``text`` segment (may be empty while a
    character is incomplete), the ``token`` and its ``logprobs`` [V], the counts so far, and on the last
    response ``finish_reason`` ("stop": end of turn; "length": max_tokens reached) and the run's ``stats``."""

    text: str
    token: int | None
    logprobs: mx.array | None
    prompt_tokens: int
    generation_tokens: int
    finish_reason: str | None = None
    stats: dict | None = None


def turn_text(
    processor, cache: PromptCache, prompt: str, n_images: int = 0, system_prompt: str | None = None, n_videos: int = 0
) -> str:
    """The text a turn adds to the conversation in ``cache`` (before images are expanded).

    The first turn is the checkpoint's chat template (with ``system_prompt``); a later one is what the
    template renders for the whole conversation beyond what the cache already holds. When the template
    re-renders the history differently (some strip earlier answers), the Qwen turn format is used."""
    content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
    user = {"role": "user", "content": content}
    if cache.turns == 0:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return processor.apply_chat_template(system + [user])
    full = processor.apply_chat_template(cache.messages + [user])
    if cache.text and full.startswith(cache.text):
        return full[len(cache.text) :]
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    vision += "<|vision_start|><|video_pad|><|vision_end|>" * n_videos
    head = "\n" if cache.closed else "<|im_end|>\n"
    return f"{head}<|im_start|>user\n{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"


def check_fits_cache(n: int, cache: list) -> None:
    """Refuse a turn of ``n`` tokens that a fixed-size cache could not hold before the answer begins."""
    c0 = attention_cache(cache)
    size = c0.max_tokens if isinstance(c0, FixedKVCache) else None
    if size is not None and n > size:
        raise InputError(
            f"the prompt is {n} tokens but the cache holds {size} (--max-kv-tokens / max_kv_size): its start would "
            "be forgotten before the answer begins; raise the cache size, or use fewer visual tokens (--keep, "
            "--max-pixels) or a shorter prompt"
        )


def _sampling(sampler, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0):
    if sampler is not None:
        return sampler
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise InputError(f"top_k must be a whole number >= 0 (0: off), got {top_k}")
    if not 0.0 <= min_p < 1.0:
        raise InputError(f"min_p must be in [0, 1) (0: off), got {min_p}")
    return _sampler(temperature, top_p, top_k, min_p)


def _processors(logits_processors, repetition_penalty: float | None):
    """The caller's logits processors, plus mlx-lm's repetition penalty when asked for."""
    if repetition_penalty is None:
        return logits_processors
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise InputError(f"repetition_penalty must be a finite number > 0 (1: off), got {repetition_penalty}")
    from mlx_lm.sample_utils import make_logits_processors

    return list(logits_processors or []) + make_logits_processors(repetition_penalty=repetition_penalty)


def stream_generate(
    model,
    processor,
    prompt: str,
    images: Sequence = (),
    *,
    max_tokens: int = 256,
    sampler=None,
    logits_processors=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    max_pixels: int | None = None,
    compaction=None,
    prompt_cache: PromptCache | None = None,
    system_prompt: str | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    prefill_step_size: int = 512,
    memory_budget: int | None = None,
    fit: str = "refuse",
    progress: Callable[[int, int], None] | None = None,
    videos: Sequence = (),
    fps: float | None = None,
    max_frames: int | None = None,
    turn: str | None = None,
    on_prefill: Callable[[PromptCache], None] | None = None,
) -> Iterator[GenerationResponse]:
    """Yield a `GenerationResponse` per generated token; the last one has ``finish_reason`` and ``stats``.

    ``images``: paths, PIL images or uint8 arrays. ``videos``: each a video file (PyAV), a folder of frames
    or a list of images, sampled at ``fps`` (default 2) up to ``max_frames`` (default 768; see
    `mlx_compact.video`); they follow the images in the turn, and a Qwen3-VL video is compacted per temporal
    slice (one ``stats["visual_tokens"]`` entry each). ``sampler`` / ``logits_processors``: as mlx-lm's (else
    ``temperature`` / ``top_p`` / ``top_k`` / ``min_p``; ``repetition_penalty`` adds mlx-lm's processor). ``compaction``: a ``Compaction`` (or spec) for the visual tokens; None uses
    ``model.default_compaction`` (``load(compaction=...)`` sets it); the prefill and the KV cache then only see
    the compact sequence. ``prompt_cache`` (from `make_prompt_cache`): the conversation to continue; this call prefills
    only its own turn, at the positions where the cache left off, and images already in it are never
    encoded again; without one, a fresh cache (``max_kv_size`` slots, ``kv_bits``; growing by default) is
    used. A fixed-size cache pins the system prompt and images and rotates the rest. Every run is planned
    before anything is allocated (``memory_budget``, ``fit``: see `check_memory`); a turn longer than a
    fixed-size cache is refused. ``progress(done, total)`` is called after each prefill chunk.

    Serving a conversation (`mlx_compact.serve`): ``turn`` is this turn's text exactly as the model reads it
    (chat template applied, one ``<|vision_start|><|image_pad|><|vision_end|>`` per image) instead of the
    text cut from the template; ``prompt`` is then only the question that prompt-aware compaction reads.
    ``max_tokens=0`` with a ``prompt_cache`` only prefills the turn (mlx-lm's cache priming): the cache then
    ends with the assistant's turn open and one response (no token, ``finish_reason`` "length") is yielded.
    ``on_prefill(state)`` is called once the turn's prompt is in the cache, before the first token is written
    to it: ``state`` is a `PromptCache` over the same layer caches that describes the conversation at that
    point (copy the layers to keep them: decoding goes on writing into them).
    """
    check_prompt(processor, prompt)
    if max_tokens < (0 if prompt_cache is not None else 1):
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    sampler = _sampling(sampler, temperature, top_p, top_k, min_p)
    logits_processors = _processors(logits_processors, repetition_penalty)
    c = _active(model, compaction)
    try:
        tower_hooks(model, c)
    except ValueError as e:
        raise InputError(str(e)) from None
    if seed is not None:
        set_seed(seed)
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model, max_kv_size, kv_bits)
    if (
        prompt_cache is not None
        and (max_kv_size, kv_bits) != (None, None)
        and (max_kv_size, kv_bits) != (cache.max_kv_size, cache.kv_bits)
    ):
        raise InputError("max_kv_size / kv_bits are the prompt cache's own: make the cache with them instead")
    images = image_files(images or [])
    t0 = time.perf_counter()
    videos = open_videos(
        [videos] if isinstance(videos, (str, os.PathLike)) else list(videos or []),
        fps,
        max_frames,
        factor=processor.video.temporal_patch_size,
        budget=memory_budget,
    )
    asked = max_pixels
    max_pixels = check_memory(
        model,
        processor,
        prompt,
        images,
        max_pixels=max_pixels,
        compaction=c,
        max_kv_tokens=cache.max_kv_size,
        kv_bits=cache.kv_bits,
        max_tokens=max_tokens,
        prefill_step=prefill_step_size,
        budget=memory_budget,
        fit=fit,
        held=cache.offset,
        videos=videos,
    )
    text = turn if turn is not None else turn_text(processor, cache, prompt, len(images), system_prompt, len(videos))
    frames = [v.decode() for v in videos]
    inputs = processor(
        text=text,
        images=images or None,
        videos=frames or None,
        max_pixels=max_pixels,
        video_fps=[v.fps for v in videos],
    )
    del frames  # the patches hold what the model needs
    ids = [int(i) for i in inputs["input_ids"][0]]
    grid = [tuple(int(v) for v in g) for g in inputs["grid_thw"]] if images else []
    video_grid = [tuple(int(v) for v in g) for g in inputs["video_grid_thw"]] if videos else []
    m = model.config.vision.spatial_merge_size
    blocks = [((t, h // m, w // m), False) for t, h, w in grid]
    blocks += [((t, h // m, w // m), model.model_type in PER_FRAME_VIDEO) for t, h, w in video_grid]
    dropped = sum(g[0] * g[1] * g[2] - c.kept(g, per_frame) for g, per_frame in blocks) if c is not None else 0
    check_fits_cache(len(ids) - dropped, cache)
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"] if c is not None else None
    mx.reset_peak_memory()
    prep = prepare_ids(
        model,
        ids,
        inputs.get("pixel_values"),
        grid,
        compaction=c,
        prompt_ids=prompt_ids,
        preprocess_s=time.perf_counter() - t0,
        pixel_values_videos=inputs.get("pixel_values_videos"),
        video_grid=video_grid,
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
    )
    prep.decode_bytes = max(
        [im.decoded_bytes for im in images if isinstance(im, ImageFile)] + [sum(v.decoded_bytes for v in videos)],
        default=0,
    )
    prep.positions = prep.positions + cache.position  # this turn continues the conversation's positions
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pin = pin_point(model, cache, prep.input_ids, cache.turns == 0, im_end)
    eos = set(processor.eos_token_ids)

    def prefilled():
        if on_prefill is not None:
            state = PromptCache(cache, int(prep.positions.max().item()) + 1, cache.turns + 1, closed=False)
            state.text = cache.text + text
            state.messages = cache.messages + [{"role": "user", "content": _content(prompt, len(images), len(videos))}]
            on_prefill(state)

    t_prefill = time.perf_counter()
    tokens, out, t_first, fed, tok, logprobs, finish = [], "", None, 0, None, None, "length"
    try:
        with wired_limit():
            # a cache made here is dropped after the call: the last token need not go into it (no step past it)
            limit = max_tokens if prompt_cache is None else None
            if max_tokens == 0:  # prime the cache: the prompt only
                mx.eval(prefill(model, prep, cache, prefill_step_size, pin, progress), [c.state for c in cache])
                prefilled()
                steps = ()
            else:
                steps = generate_step(
                    model, prep, cache, sampler, prefill_step_size, pin, progress, logits_processors, limit, prefilled
                )
            for tok, logprobs in steps:
                # generate_step has written `tok` into the cache before yielding it (all but the last of `limit`)
                fed += 1 if limit is None or fed + 1 < limit else 0
                if t_first is None:
                    t_first = time.perf_counter()
                if tok in eos:
                    finish = "stop"
                    break
                tokens.append(tok)
                if len(tokens) == max_tokens:  # its text comes with the last response
                    break
                new = processor.decode(tokens)
                segment = "" if new.endswith("\ufffd") or len(new) <= len(out) else new[len(out) :]
                out += segment
                yield GenerationResponse(segment, tok, logprobs, len(prep.input_ids), len(tokens))
    finally:  # commit the turn, complete or not, so the conversation stays consistent
        t_end = time.perf_counter()
        cache.closed = finish == "stop" and tok == im_end
        if fed > len(tokens) and not cache.closed and _trim(cache, 1):
            fed -= 1  # an end-of-text token that is not the end of a turn is not kept
        cache.position = int(prep.positions.max().item()) + 1 + fed
        cache.turns += 1
        answer = processor.decode(tokens)
        cache.text += text + processor.decode(tokens + ([tok] if cache.closed else []), skip_special_tokens=False)
        cache.messages += [{"role": "user", "content": _content(prompt, len(images), len(videos))}]
        cache.messages += [{"role": "assistant", "content": answer}] if max_tokens else []
    stats = run_stats(prep, cache, len(tokens), t_prefill, t_first, t_end, model)
    pipe = pipeline_of(model)
    if pipe is not None:  # the other ranks' peaks during this run (each reset when reported)
        stats["ranks"] = [
            {"rank": r, "peak_memory_bytes": peak, "weights_bytes": params}
            for r, peak, _, params, _ in pipe.memory(True)
        ]
    stats["finish_reason"] = finish
    if max_pixels != asked:  # fit="auto" shrank the images
        stats["fitted_max_pixels"] = max_pixels
    yield GenerationResponse(answer[len(out) :], tok, logprobs, len(prep.input_ids), len(tokens), finish, stats)


def _content(prompt: str, n_images: int, n_videos: int = 0) -> list:
    return [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]


def _trim(cache: list, n: int) -> bool:
    """Forget the last ``n`` tokens if every layer can; False (nothing trimmed) otherwise: a hybrid model's
    linear state cannot be rewound, so such a token stays in the conversation."""
    if all(c.is_trimmable() for c in cache):
        for c in cache:
            c.trim(n)
        return True
    return False


def run_stats(
    prep: Prepared, cache: list, n_generated: int, t_prefill: float, t_first, t_end: float, model=None
) -> dict:
    """The stats every run reports (see ``generate``)."""
    decoded = max(n_generated - 1, 0)
    ttft = {"preprocess": prep.preprocess_s, "vision": prep.vision_s, "prefill": (t_first or t_end) - t_prefill}
    if prep.compaction is not None:
        ttft["compaction"] = prep.compaction_s
    c0 = attention_cache(cache)
    held = c0.offset if c0 is not None else 0
    return {
        "prompt_tokens": len(prep.input_ids),
        "generation_tokens": n_generated,
        "visual_tokens": prep.visual_tokens,
        "kv_bytes_allocated": sum(c.nbytes for c in cache),
        "kv_bytes_used": sum(getattr(c, "used_bytes", c.nbytes) for c in cache),
        "linear_state_bytes": sum(c.nbytes for c in cache if isinstance(c, LinearCache)),  # of both: fixed
        "kv_evicted_tokens": max(0, held - getattr(c0, "max_tokens", held)),
        "ttft_s": ttft,
        "decode_tokens_per_s": decoded / (t_end - t_first) if decoded and t_first else None,  # None: one token
        "image_decode_bytes": prep.decode_bytes,
        "proportional": prep.compaction is not None and prep.compaction.proportional,
        # decoded pixels live in numpy/PIL, beside the weights, before MLX sees them
        "peak_memory_bytes": max(mx.get_peak_memory(), weights_bytes(model) + prep.decode_bytes if model else 0),
    }


def generate(model, processor, prompt: str, images: Sequence = (), **kwargs) -> GenerationResult:
    """Generate a reply to ``prompt`` about ``images``; see ``stream_generate`` for the options
    (``prompt_cache=`` continues a conversation).

    Returns a ``GenerationResult`` with ``.text``, ``.tokens`` and ``.stats`` (prompt and generated
    token counts, visual tokens before/after per image, KV bytes allocated and used (a hybrid model's fixed linear
    state included, and apart as ``linear_state_bytes``), TTFT split into
    preprocess / vision / prefill seconds (and compaction, when compacting), decode tokens/s, peak memory
    since the call began, finish_reason). ``compaction=Compaction(...)`` compacts the visual tokens end to end.
    """
    tokens, text = [], ""
    for r in stream_generate(model, processor, prompt, images, **kwargs):
        text += r.text
        if r.finish_reason != "stop" and r.token is not None:
            tokens.append(r.token)
    return GenerationResult(text=text, tokens=tokens, stats=r.stats)
