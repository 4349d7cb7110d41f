"""The runtime over long runs: flat memory with a fixed-size KV cache, a long chat, decode speed.

(a) decode: ``--decode`` tokens (default 6,000; ``--decode 20000`` for the long run) one at a time
    through our language model (random weights, the Qwen2.5-VL-3B head layout: 16 query heads / 2 KV
    heads x head_dim 128, with a small hidden size, ``--small-layers`` layers and a small vocabulary
    so the run takes minutes) with FixedKVCache(``--capacity``) float and 8-bit, and mlx-lm's growing
    KVCache. Active memory is sampled every 1000 tokens; "drift" is max - min of the samples once
    the fixed cache is full.
(b) chat: a ``--turns``-turn scripted ChatSession(max_kv_size=...) on a tiny checkpoint (the tests'
    builder): an image in turn 1, then text turns. Active memory every 25 turns after the cache is
    full, and the pinned prefix (cache.pinned) must not change.
(c) speed: one decode step (the whole LLM: layers + norm + lm_head) at 1k / 8k / 32k context at real
    widths (2048 hidden, 11008 MLP, 16 / 2 heads, head_dim 128; ``--layers`` deep, vocabulary
    ``--vocab``) for FixedKVCache float / 8-bit and mlx-lm's KVCache / RotatingKVCache / QuantizedKVCache
    (8-bit), the caches
    filled with random K/V via update_and_fetch. Best of ``--steps`` steps, the cache kinds interleaved.

    python benchmarks/bench_runtime.py [--decode 20000] [--growing-tokens 20000] [--capacity 2048] [--turns 500]
                                       [--layers 2] [--steps 5] [--contexts 1024,8192,32768] [--only a,b,c]

Prints tables and writes benchmarks/results/bench_runtime.json.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import common  # noqa: E402  (imports mlx_compact before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402

from mlx_compact import _blas  # noqa: E402
from mlx_compact.cache import FixedKVCache  # noqa: E402
from mlx_compact.models.config import TextConfig  # noqa: E402
from mlx_compact.models.language import LanguageModel  # noqa: E402

MiB = 2**20
PINNED = 256  # the pinned prefix (system prompt + image) of the fixed caches; keep= of RotatingKVCache


def text_config(hidden: int, intermediate: int, layers: int, vocab: int) -> TextConfig:
    """Qwen2.5-VL-3B's attention layout (16 q heads, 2 KV heads, head_dim 128) at a chosen width."""
    return TextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=vocab,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        mrope_section=(16, 24, 24),
        tie_word_embeddings=True,
    )


def language_model(cfg: TextConfig) -> LanguageModel:
    lm = LanguageModel(cfg)
    common.load_same_weights([lm], common.random_weights(lm, seed=0))
    mx.eval(lm.parameters())
    return lm


class _Mask:
    """mlx-lm's caches need make_mask(n, return_array, window_size); our LanguageModel passes only n."""

    def make_mask(self, n, return_array=False, window_size=None):
        return super().make_mask(n, return_array=return_array, window_size=window_size)


class LmKVCache(_Mask, lm_cache.KVCache):
    pass


class LmRotatingKVCache(_Mask, lm_cache.RotatingKVCache):
    pass


class LmQuantizedKVCache(_Mask, lm_cache.QuantizedKVCache):
    pass


def make_caches(kind: str, layers: int, capacity: int):
    if kind == "mlx-lm KVCache":
        return [LmKVCache() for _ in range(layers)]
    if kind == "mlx-lm RotatingKVCache":
        return [LmRotatingKVCache(max_size=capacity, keep=PINNED) for _ in range(layers)]
    if kind == "mlx-lm QuantizedKVCache 8-bit":
        return [LmQuantizedKVCache(group_size=64, bits=8) for _ in range(layers)]
    bits = 8 if "8-bit" in kind else None
    return [FixedKVCache(capacity, pinned=PINNED, bits=bits) for _ in range(layers)]


def step(lm, caches, token, pos: int):
    """One decode step through the whole LLM; returns the next (greedy) token, evaluated."""
    p = mx.full((3, 1, 1), pos, dtype=mx.int32)
    logits = lm(lm.model.embed_tokens(token), p, cache=caches)
    nxt = mx.argmax(logits[:, -1, :], axis=-1).reshape(1, 1)
    mx.eval(nxt)
    return nxt


def _tag(vals):
    return " ".join(f"{v:.1f}" for v in vals)


# ----- (a) long decode -------------------------------------------------------------------


def long_decode(args) -> dict:
    cfg = text_config(args.small_hidden, 2 * args.small_hidden, args.small_layers, args.small_vocab)
    lm = language_model(cfg)
    out = {
        "config": {
            "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers,
            "q_heads": 16,
            "kv_heads": 2,
            "head_dim": 128,
            "vocab": cfg.vocab_size,
            "capacity": args.capacity,
            "tokens": args.decode,
        }
    }
    kinds = [k for k in ["FixedKVCache float", "FixedKVCache 8-bit", "mlx-lm KVCache"] if k in args.kinds.split(",")]
    print(
        f"(a) {args.decode}-token decode, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"16/2 heads x 128, vocab {cfg.vocab_size}; fixed capacity {args.capacity} (pinned {PINNED})"
    )
    print(f"    active memory above start (MiB), every {args.every} tokens")
    for kind in kinds:
        n = args.decode if "Fixed" in kind else min(args.decode, args.growing_tokens)
        gc.collect()
        mx.synchronize()
        mx.clear_cache()
        caches = make_caches(kind, cfg.num_hidden_layers, args.capacity)
        base = mx.get_active_memory()
        token = mx.array([[1]])
        samples, t0 = [], time.perf_counter()
        for t in range(n):
            token = step(lm, caches, token, t)
            if (t + 1) % args.every == 0:
                samples.append((mx.get_active_memory() - base) / MiB)
        secs = time.perf_counter() - t0
        full_at = args.capacity // args.every  # samples taken once the fixed cache is full
        after = samples[full_at:] if "Fixed" in kind else samples
        drift = (max(after) - min(after)) if after else 0.0
        kv = sum(c.nbytes for c in caches) / MiB
        out[kind] = {
            "tokens": n,
            "samples_mib": samples,
            "drift_after_full_mib": drift,
            "kv_mib": kv,
            "tokens_per_s": n / secs,
        }
        what = "drift after full" if "Fixed" in kind else "growth"
        print(
            f"  {kind:<20} {n:>6} tok {n / secs:6.0f} tok/s | KV {kv:7.1f} MiB | {what} {drift:6.2f} MiB | "
            f"{_tag(samples)}",
            flush=True,
        )
        del caches
    del lm
    return out


# ----- (b) long chat -----------------------------------------------------------------------


def long_chat(args) -> dict:
    from PIL import Image
    from tiny_checkpoints import make_checkpoint

    from mlx_compact.chat import ChatSession
    from mlx_compact.loader import load

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint("qwen2_vl", Path(tmp) / "qwen2_vl")
        model, proc = load(str(path))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    chat = ChatSession(model, proc, max_kv_size=args.chat_kv)
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    first = chat.ask("look at this picture", [image], max_tokens=4)
    pinned = chat.cache[0].pinned
    allocated = first.stats["kv_bytes_allocated"]
    samples, full_turn, t0 = [], None, time.perf_counter()
    for i in range(1, args.turns):
        chat.ask(f"question {i}: what about part {i % 7} of it? " + "words " * (i % 5), max_tokens=6)
        if full_turn is None and chat.cache[0].offset > chat.cache[0].max_tokens:
            full_turn = i
        if (i + 1) % 25 == 0:
            samples.append((mx.get_active_memory() - base) / MiB)
    secs = time.perf_counter() - t0
    after = samples[(full_turn or 0) // 25 + 1 :]
    res = {
        "turns": args.turns,
        "max_kv_tokens": args.chat_kv,
        "pinned_after_turn_1": pinned,
        "pinned_at_end": chat.cache[0].pinned,
        "visual_tokens": first.stats["visual_tokens"],
        "kv_bytes_allocated_turn_1": allocated,
        "kv_bytes_allocated_end": chat.last_stats["kv_bytes_allocated"],
        "offset_at_end": chat.cache[0].offset,
        "cache_full_at_turn": full_turn,
        "samples_mib": samples,
        "drift_after_full_mib": (max(after) - min(after)) if after else None,
        "seconds": secs,
    }
    print(
        f"\n(b) {args.turns}-turn chat, tiny qwen2_vl, max_kv_tokens {args.chat_kv}: image pinned "
        f"{pinned} -> {chat.cache[0].pinned} slots ({'unchanged' if pinned == chat.cache[0].pinned else 'CHANGED'}), "
        f"KV allocated {allocated} -> {res['kv_bytes_allocated_end']} B, {chat.cache[0].offset} tokens written, "
        f"cache full at turn {full_turn}; {secs:.0f} s"
    )
    print(
        f"    active memory above start (MiB) every 25 turns: {_tag(samples)}; drift after full "
        f"{res['drift_after_full_mib']:.3f} MiB",
        flush=True,
    )
    return res


# ----- (c) decode speed ----------------------------------------------------------------------


def fill(caches, ctx: int, chunk: int = 2048):
    """Write `ctx` random tokens into every layer's cache (no attention)."""
    k = mx.random.normal((1, 2, chunk, 128))  # [1, Hkv, chunk, hd]
    mx.eval(k)
    for t in range(0, ctx, chunk):
        n = min(chunk, ctx - t)
        for c in caches:
            mx.eval(c.update_and_fetch(k[:, :, :n], k[:, :, :n]))


def decode_speed(args) -> dict:
    cfg = text_config(2048, 11008, args.layers, args.vocab)
    lm = language_model(cfg)
    kinds = [
        "FixedKVCache float",
        "FixedKVCache 8-bit",
        "mlx-lm KVCache",
        "mlx-lm RotatingKVCache",
        "mlx-lm QuantizedKVCache 8-bit",
    ]
    contexts = [int(c) for c in args.contexts.split(",")]
    print(
        f"\n(c) decode step through our LLM: 2048 hidden, 11008 MLP, 16/2 heads x 128, {args.layers} layers, "
        f"vocab {args.vocab}; best of {args.steps}, kinds interleaved; fixed/rotating size = context, "
        f"pinned {PINNED}"
    )
    print(
        f"  {'context':>8}"
        + "".join(f"{k.replace('QuantizedKVCache', 'QKVCache'):>24}" for k in kinds)
        + "   (tokens/s (ms/step))"
    )
    rows = []
    for ctx in contexts:
        caches = {}
        for kind in kinds:
            caches[kind] = make_caches(kind, args.layers, ctx)
            fill(caches[kind], ctx)
        token = mx.array([[1]])
        best = {k: float("inf") for k in kinds}
        for s in range(args.steps + 1):  # the first round is a warm-up (and wraps the fixed caches)
            for kind in kinds:
                t = time.perf_counter()
                step(lm, caches[kind], token, ctx + s)
                dt = time.perf_counter() - t
                if s:
                    best[kind] = min(best[kind], dt)
        row = {
            "context": ctx,
            **{
                k: {"tokens_per_s": 1 / best[k], "ms": best[k] * 1e3, "kv_mib": sum(c.nbytes for c in caches[k]) / MiB}
                for k in kinds
            },
        }
        rows.append(row)
        print(f"  {ctx:>8}" + "".join(f"{1 / best[k]:>14.2f} ({best[k] * 1e3:6.1f})" for k in kinds), flush=True)
        del caches
        gc.collect()
        mx.clear_cache()
    for r in rows:
        ref = max(r[k]["tokens_per_s"] for k in kinds if k.startswith("mlx-lm") and "Quantized" not in k)
        r["fixed_float_vs_best_mlx_lm_float"] = r["FixedKVCache float"]["tokens_per_s"] / ref
        r["fixed_8bit_vs_mlx_lm_8bit"] = (
            r["FixedKVCache 8-bit"]["tokens_per_s"] / r["mlx-lm QuantizedKVCache 8-bit"]["tokens_per_s"]
        )
    print(
        "  ours / mlx-lm (float: vs the faster of KVCache and RotatingKVCache; 8-bit: vs QuantizedKVCache): "
        + ", ".join(
            f"{r['context']}: float {r['fixed_float_vs_best_mlx_lm_float']:.2f}, 8-bit {r['fixed_8bit_vs_mlx_lm_8bit']:.2f}"
            for r in rows
        )
    )
    del lm
    return {
        "config": {
            "hidden": 2048,
            "intermediate": 11008,
            "layers": args.layers,
            "vocab": args.vocab,
            "steps": args.steps,
        },
        "rows": rows,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c")
    ap.add_argument("--decode", type=int, default=6000, help="(a) tokens with the fixed caches (20000: long run)")
    ap.add_argument("--growing-tokens", type=int, default=4000, help="(a) tokens for mlx-lm's growing KVCache")
    ap.add_argument("--capacity", type=int, default=2048, help="(a) FixedKVCache size")
    ap.add_argument(
        "--kinds", default="FixedKVCache float,FixedKVCache 8-bit,mlx-lm KVCache", help="(a) caches, comma-separated"
    )
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--small-hidden", type=int, default=128)
    ap.add_argument("--small-layers", type=int, default=2)
    ap.add_argument("--small-vocab", type=int, default=256)
    ap.add_argument("--turns", type=int, default=500)
    ap.add_argument("--chat-kv", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2, help="(c) LLM layers at real width")
    ap.add_argument("--vocab", type=int, default=1024, help="(c) vocabulary (the real 151936 makes lm_head dominate)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--contexts", default="1024,8192,32768")
    ap.add_argument("--out", default="bench_runtime.json", help="file name under benchmarks/results")
    args = ap.parse_args()
    print(f"BLAS: {_blas.BLAS}")
    print(f"mlx {mx.__version__}, device {mx.default_device()}, float32\n")
    parts = set(args.only.split(","))
    result = {"environment": common.environment(), "args": vars(args)}
    if "a" in parts:
        result["decode_memory"] = long_decode(args)
    if "b" in parts:
        result["chat"] = long_chat(args)
    if "c" in parts:
        result["decode_speed"] = decode_speed(args)
    print(f"\nwrote {common.write_json(args.out, result)}")


if __name__ == "__main__":
    main()
