"""Memory that never grows on a hybrid model: a 20,000-token decode and a 500-turn chat (Qwen3.5).

A small random Qwen3.5 (the tests' `tiny_hybrid` checkpoint, built here with transformers: 4 LLM layers, two
Gated DeltaNet and two gated attention, width 96; float32 on the CPU) with a fixed-size attention cache
(``--max-kv-tokens``, rotating, the first turn's image pinned) and the fixed linear state, so every layer's cache
is allocated once. Sampled along the way: the process's resident memory (VmRSS), MLX's active memory, its buffer
cache, its peak since the start, and the caches' bytes (``kv_bytes_allocated``, of which the linear state):

- decode: one ``stream_generate`` of ``--decode-tokens`` tokens (with no end-of-turn token, so it never stops
  early; not a logits processor masking them: ``generate_step`` then keeps the token history it hands the
  processors as an unevaluated concatenation, which one that never reads it lets grow by ~2 KiB of graph a
  token), sampled every ``--every`` tokens;
- chat: a ``ChatSession`` of ``--turns`` turns (an image in the first, a short question and a reply of up to 8
  tokens in each), sampled every 25 turns. The conversation's transcript (``PromptCache.text`` / ``messages``)
  grows with the turns, as any chat history does: it is Python memory, a few hundred bytes a turn.

"Flat" is judged on the second half of each run (after the rotating cache has wrapped): the growth of each
series from its first to its last sample there.

    taskset -c 1 python benchmarks/bench_flat.py [--decode-tokens 20000] [--turns 500] [--max-kv-tokens 512]

Prints both curves and writes benchmarks/results/bench_flat.json.
"""

import argparse
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
from PIL import Image  # noqa: E402

from mlx_compact import ChatSession, load, stream_generate  # noqa: E402
from mlx_compact.cache import LinearCache  # noqa: E402
from mlx_compact.generate import make_prompt_cache  # noqa: E402

WORDS = "red green blue square circle left right top bottom digit letter shape".split()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def sample(step: int, cache=None, stats=None) -> dict:
    out = {
        "step": step,
        "rss": rss_bytes(),
        "mlx_active": mx.get_active_memory(),
        "mlx_cache": mx.get_cache_memory(),  # freed buffers MLX keeps for reuse (in RSS, not in active)
        "mlx_peak": mx.get_peak_memory(),
    }
    if stats is not None:
        out["cache"], out["linear_state"] = stats["kv_bytes_allocated"], stats["linear_state_bytes"]
    elif cache is not None:
        out["cache"] = sum(c.nbytes for c in cache)
        out["linear_state"] = sum(c.nbytes for c in cache if isinstance(c, LinearCache))
    return out


def growth(samples: list) -> dict:
    """Each series' change from the first to the last sample of the second half, in bytes."""
    half = samples[len(samples) // 2 :]
    keys = [k for k in half[0] if k != "step"]
    return {k: half[-1][k] - half[0][k] for k in keys}


def run_decode(model, proc, image, args) -> list:
    cache = make_prompt_cache(model, max_kv_size=args.max_kv_tokens)
    samples = [sample(0)]
    mx.reset_peak_memory()
    n, eos = 0, proc.eos_token_ids
    proc.eos_token_ids = []  # never end the turn: the decode runs to max_tokens
    for r in stream_generate(
        model, proc, "describe the picture in detail", [image], max_tokens=args.decode_tokens, prompt_cache=cache
    ):
        n = r.generation_tokens
        if n % args.every == 0 or r.finish_reason:
            samples.append(sample(n, cache))
            if n % (5 * args.every) == 0:
                s = samples[-1]
                print(
                    f"  decode {n:6d} tokens: RSS {s['rss'] / 2**20:7.1f} MiB, MLX active {s['mlx_active'] / 2**20:6.2f} "
                    f"MiB, peak {s['mlx_peak'] / 2**20:6.2f} MiB, cache {s['cache'] / 2**20:.3f} MiB",
                    flush=True,
                )
    proc.eos_token_ids = eos
    assert n == args.decode_tokens, n
    return samples


def run_chat(model, proc, image, args) -> list:
    chat = ChatSession(model, proc, max_kv_size=args.max_kv_tokens)
    rng = np.random.default_rng(0)
    samples = [sample(0)]
    mx.reset_peak_memory()
    for turn in range(1, args.turns + 1):
        words = " ".join(rng.choice(WORDS, 4))
        r = chat.ask(f"turn {turn}: what about the {words}?", [image] if turn == 1 else [], max_tokens=8)
        if turn % 25 == 0 or turn == 1:
            samples.append(sample(turn, stats=r.stats))
            s = samples[-1]
            print(
                f"  chat turn {turn:4d}: {chat.cache.offset} tokens fed, RSS {s['rss'] / 2**20:7.1f} MiB, MLX active "
                f"{s['mlx_active'] / 2**20:6.2f} MiB, peak {s['mlx_peak'] / 2**20:6.2f} MiB, cache "
                f"{s['cache'] / 2**20:.3f} MiB, evicted {r.stats['kv_evicted_tokens']}",
                flush=True,
            )
    samples[-1]["tokens_fed"] = chat.cache.offset
    samples[-1]["transcript_chars"] = len(chat.cache.text)
    return samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode-tokens", type=int, default=20000)
    ap.add_argument("--turns", type=int, default=500)
    ap.add_argument("--max-kv-tokens", type=int, default=512)
    ap.add_argument("--every", type=int, default=500)
    args = ap.parse_args()
    from tiny_hybrid import make_checkpoint

    env = common.environment()
    print(f"BLAS {env['blas']}, mlx {env['mlx']}, {env['device']}, float32", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, proc = load(str(make_checkpoint("qwen3_5", Path(tmp) / "qwen3_5")))
    small = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((192, 128), Image.Resampling.BILINEAR)
    t = time.perf_counter()
    decode = run_decode(model, proc, image, args)
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    chat = run_chat(model, proc, image, args)
    t_chat = time.perf_counter() - t
    result = {
        "environment": env,
        "args": vars(args),
        "model": "tiny_hybrid qwen3_5 (4 layers: linear, full, linear, full; width 96), float32",
        "decode": {"samples": decode, "second_half_growth": growth(decode), "seconds": t_decode},
        "chat": {"samples": chat, "second_half_growth": growth(chat), "seconds": t_chat},
    }
    for name in ("decode", "chat"):
        g = result[name]["second_half_growth"]
        s0, s1 = result[name]["samples"][1], result[name]["samples"][-1]
        print(
            f"{name}: {result[name]['seconds']:.0f} s; from sample {s0['step']} to {s1['step']}: RSS "
            f"{s0['rss'] / 2**20:.1f} -> {s1['rss'] / 2**20:.1f} MiB, MLX active {s0['mlx_active'] / 2**20:.2f} -> "
            f"{s1['mlx_active'] / 2**20:.2f} MiB, MLX peak {s1['mlx_peak'] / 2**20:.2f} MiB, cache "
            f"{s0['cache'] / 2**20:.3f} -> {s1['cache'] / 2**20:.3f} MiB; second half growth: "
            + ", ".join(f"{k} {v / 2**10:+.1f} KiB" for k, v in g.items())
        )
    path = common.write_json("bench_flat.json", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
