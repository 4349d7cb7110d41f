"""Which photos fit on which Mac: the memory plan for 8 / 16 / 32 GB Macs, image sizes and keep ratios.

    python examples/plan_memory.py [--model M] [--sizes 1024x768 2016x1512 4032x3024] [--keep 1 0.5 0.33 0.25]

Nothing runs and nothing big is allocated: the checkpoint's weights are opened lazily (only their sizes are
read) and images are described by their size alone. macOS lets the GPU use about two thirds of the memory
of a Mac with less than 36 GB and about three quarters above: those are the budgets planned against.
Figures are for this machine's backend (Metal: 16-bit activations; CPU: 32-bit weights and activations).
"""

import argparse

import numpy as np

import mlx_compact  # import before mlx.core (it picks the BLAS on Linux)
from mlx_compact.generate import image_grids
from mlx_compact.loader import DEFAULT_MODEL, load_model, resolve
from mlx_compact.memory import fmt_bytes
from mlx_compact.processor import Processor


def mac_budget(ram_gb: int) -> int:
    """About what macOS lets the GPU wire on a Mac with `ram_gb` GB (its recommended working set)."""
    return int(ram_gb * 2**30 * (2 / 3 if ram_gb < 36 else 3 / 4))


def image_of(size: str):
    """A stand-in image of WIDTHxHEIGHT pixels that allocates nothing (only its shape is read)."""
    w, h = (int(v) for v in size.lower().split("x"))
    return np.broadcast_to(np.uint8(0), (h, w, 3))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--sizes", nargs="+", default=["1024x768", "2016x1512", "4032x3024"], help="WIDTHxHEIGHT")
    p.add_argument("--keep", nargs="+", type=float, default=[1.0, 0.5, 0.33, 0.25])
    p.add_argument("--macs", nargs="+", type=int, default=[8, 16, 32], help="Mac memory sizes in GB")
    p.add_argument("--max-pixels", type=int, default=None, help="the images' pixel limit (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--kv-bits", type=int, choices=(4, 8), default=None)
    args = p.parse_args(argv)

    path = resolve(args.model)
    model = load_model(path, lazy=True)  # parameters stay on disk; weights_bytes reads their sizes
    processor = Processor.from_pretrained(path)
    text_tokens = 64  # a short question and the chat template
    print(f"{args.model}: weights {fmt_bytes(mlx_compact.plan(model, [], 0).weights)}")
    macs = "".join(f"{str(gb) + ' GB Mac':>11}" for gb in args.macs)
    print(f"{'image':>10} {'keep':>5} {'visual':>7} {'KV':>10} {'peak':>10}{macs}")
    for size in args.sizes:
        grids = image_grids(processor, [image_of(size)], args.max_pixels)
        for keep in args.keep:
            plans = [
                mlx_compact.plan(
                    model,
                    grids,
                    text_tokens,
                    keep=keep,
                    kv_bits=args.kv_bits,
                    max_kv_tokens=None,
                    max_tokens=args.max_tokens,
                    budget=mac_budget(gb),
                )
                for gb in args.macs
            ]
            q = plans[0]
            fits = "".join(f"{'fits' if x.fits else 'NO':>11}" for x in plans)
            print(
                f"{size:>10} {keep:>5g} {sum(q.visual_tokens):>7} {fmt_bytes(q.kv):>10} {fmt_bytes(q.peak):>10}{fits}"
            )


if __name__ == "__main__":
    main()
