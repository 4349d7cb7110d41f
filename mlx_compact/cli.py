"""The `mlx-compact` command.

    mlx-compact convert --hf-path SRC --mlx-path DST [-q] [--q-bits 4|8] [--q-group-size 64]
                        [--dtype bfloat16|float16|float32] [--quantize-vision] [--force]

Each subcommand has an ``add_<name>_parser(subparsers)`` that declares its arguments and a
``run_<name>(args)`` that does the work; `SUBCOMMANDS` lists them. Errors the user can fix are printed
as one line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

import mlx_compact  # noqa: F401  (loads OpenBLAS before mlx.core)

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed as one line."""


# ---------------------------------------------------------------- convert


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face Qwen-VL checkpoint into an MLX directory",
        description="Convert a Hugging Face Qwen-VL checkpoint (directory or repo id) into an MLX directory "
        "that mlx-compact and mlx-vlm both load.",
    )
    p.add_argument("--hf-path", required=True, help="source checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the language model")
    p.add_argument("--q-bits", type=int, choices=(4, 8), default=4, help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64, help="group size (default 64)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the float parameters (default bfloat16)")
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower too")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from mlx_compact.convert import convert

    dst = convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
        quantize_vision=args.quantize_vision,
        force=args.force,
    )
    print(f"wrote {dst}")
    return 0


# ---------------------------------------------------------------- generate


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer one prompt about one or more images",
        description="Run a Qwen-VL model on a prompt (and images) and stream the answer.",
    )
    p.add_argument("--model", default=None, help="model directory or Hugging Face repo id (default: the bundled model)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="shrink images to at most this many pixels before encoding (fewer visual tokens)")
    p.add_argument("--stats", choices=("text", "json"), default="text",
                   help="print run statistics as text on stderr (default) or one JSON object on stdout")
    p.set_defaults(run=run_generate)


def _check_images(paths):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.convert("RGB") if im.mode != "RGB" else im.copy())
        except FileNotFoundError:
            raise UserError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
    return images


def run_generate(args) -> int:
    import json

    from mlx_compact.generate import stream_generate
    from mlx_compact.loader import load

    images = _check_images(args.image)
    model, processor = load(args.model)
    stats = None
    stream = args.stats == "text"
    for item in stream_generate(
        model, processor, args.prompt, images, max_tokens=args.max_tokens, temperature=args.temperature,
        seed=args.seed, max_pixels=args.max_pixels,
    ):
        if isinstance(item, dict):
            stats = item
        elif stream:
            print(item, end="", flush=True)
    if stream:
        print()
        stats.pop("tokens")
        stats.pop("text")
        print(_stats_text(stats), file=sys.stderr)
    else:
        stats.pop("tokens")
        print(json.dumps(stats))
    return 0


def _stats_text(s: dict) -> str:
    t = s["ttft_s"]
    vis = ", ".join(f"{v['before']}->{v['after']}" for v in s["visual_tokens"]) or "none"
    return (
        f"prompt {s['prompt_tokens']} tokens (visual {vis}), generated {s['generation_tokens']}; "
        f"TTFT {sum(t.values()):.2f} s (preprocess {t['preprocess']:.2f}, vision {t['vision']:.2f}, "
        f"prefill {t['prefill']:.2f}); decode {s['decode_tokens_per_s']:.1f} tok/s; "
        f"KV {s['kv_bytes_used'] / 2**20:.1f} of {s['kv_bytes_allocated'] / 2**20:.1f} MiB; "
        f"peak {s['peak_memory_bytes'] / 2**30:.2f} GiB"
    )


# Subcommands, in help order.
SUBCOMMANDS = [add_generate_parser, add_convert_parser]


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-compact", description="Qwen-VL models on MLX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {mlx_compact.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    """Run the `mlx-compact` command line; return the exit code."""
    args = build_parser().parse_args(argv)
    from mlx_compact.convert import ConvertError
    from mlx_compact.loader import LoadError

    try:
        return args.run(args)
    except (UserError, LoadError, ConvertError, FileNotFoundError, PermissionError) as e:
        print(f"mlx-compact {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mlx-compact {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
