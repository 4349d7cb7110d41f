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


# Subcommands, in help order. `generate`, `chat` and `plan` get their add_*_parser / run_* here.
SUBCOMMANDS = [add_convert_parser]


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
