"""Two turns of a chat about one image with the Python API, and what each turn cost.

    python examples/chat_about_image.py --image photo.jpg [--model M] [--keep 0.33] [--max-kv-tokens 4096]

The first turn encodes the image (compacted to a third of its visual tokens) and fills the KV cache; the
follow-up reuses that cache, so its stats show no image re-encoded and only its own prompt tokens.
"""

import argparse

import mlx_compact  # import before mlx.core (it picks the BLAS on Linux)
from mlx_compact.loader import DEFAULT_MODEL


def show(turn: str, result) -> None:
    s = result.stats
    ttft = sum(s["ttft_s"].values())
    visual = ", ".join(f"{v['before']} -> {v['after']}" for v in s["visual_tokens"]) or "none encoded"
    print(f"[{turn}] {result.text!r}")
    print(
        f"    prompt tokens {s['prompt_tokens']} (visual: {visual}), generated {s['generation_tokens']}, "
        f"TTFT {ttft:.2f} s, KV {s['kv_bytes_used'] / 2**20:.1f} MiB used of "
        f"{s['kv_bytes_allocated'] / 2**20:.1f} MiB, peak {s['peak_memory_bytes'] / 2**20:.0f} MiB"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--image", required=True)
    p.add_argument("--question", default="What is in this picture?")
    p.add_argument("--follow-up", default="What colours stand out?")
    p.add_argument("--keep", type=float, default=0.33, help="share of visual tokens kept")
    p.add_argument("--max-kv-tokens", type=int, default=4096, help="fixed cache size (image pinned)")
    p.add_argument("--max-tokens", type=int, default=100)
    args = p.parse_args(argv)

    model, processor = mlx_compact.load(args.model)
    chat = mlx_compact.ChatSession(
        model, processor, compaction=mlx_compact.Compaction(keep=args.keep), max_kv_size=args.max_kv_tokens
    )
    show("turn 1", chat.ask(args.question, [args.image], max_tokens=args.max_tokens))
    show("turn 2", chat.ask(args.follow_up, max_tokens=args.max_tokens))


if __name__ == "__main__":
    main()
