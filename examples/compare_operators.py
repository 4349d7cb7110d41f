"""Compare the visual-token compaction operators on one image.

    python examples/compare_operators.py --image photo.jpg [--model M] [--keep 0.33] [--out kept.png]

Prints a table (visual tokens kept, time to first token, KV cache bytes) and saves a PNG with one panel
per operator: the image as the model sees it, kept patches bright and outlined, dropped patches dimmed.
Which patches were kept comes from the compact prompt itself: each kept row of the prompt maps back to
its row in the uncompacted prompt, and a visual row's offset in its image block is its (h, w) cell on
the merged grid (one cell = 28x28 pixels, 32x32 on Qwen3-VL).
"""

import argparse

from PIL import Image, ImageDraw, ImageOps

import mlx_compact  # import before mlx.core (it picks the BLAS on Linux)
from mlx_compact.compaction import METHODS
from mlx_compact.generate import prepare
from mlx_compact.loader import DEFAULT_MODEL
from mlx_compact.processor import to_rgb

OPERATORS = METHODS  # every compaction method, "none" first


def kept_cells(model, processor, prompt, image, compaction, max_pixels=None):
    """The merged-grid cells (row, col) of the visual tokens `compaction` keeps, and the grid (h, w)."""
    prep = prepare(model, processor, prompt, [image], max_pixels=max_pixels, compaction=compaction)
    start = prep.input_ids.index(model.config.image_token_id)  # text before the image is never compacted
    n = prep.visual_tokens[0]["before"]
    f = processor.image.factor
    h, w = (s // f for s in processor.image_resized_size(image.height, image.width, max_pixels=max_pixels))
    assert h * w == n, (h, w, n)
    rows = [int(r) - start for r in prep.kept if start <= r < start + n]
    return [divmod(r, w) for r in rows], (h, w)


def panel(image, cells, grid, label, width=320):
    """The image with kept cells bright and outlined, the rest dimmed, and a label underneath."""
    gh, gw = grid
    scale = max(1, round(width / gw)) if gw * 8 < width else width / gw
    cw = ch = scale
    base = image.resize((round(gw * cw), round(gh * ch)), Image.Resampling.BICUBIC)
    out = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.7)
    draw = ImageDraw.Draw(out)
    for r, c in cells:
        box = (round(c * cw), round(r * ch), round((c + 1) * cw), round((r + 1) * ch))
        out.paste(base.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 210, 0))
    framed = Image.new("RGB", (out.width, out.height + 18), (255, 255, 255))
    framed.paste(out, (0, 0))
    ImageDraw.Draw(framed).text((4, out.height + 3), label, fill=(0, 0, 0))
    return framed


def sheet(panels, columns=4):
    """Panels in a grid."""
    w, h = max(p.width for p in panels), max(p.height for p in panels)
    rows = (len(panels) + columns - 1) // columns
    out = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, p in enumerate(panels):
        out.paste(p, ((i % columns) * w, (i // columns) * h))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="What is in this picture?")
    p.add_argument("--keep", type=float, default=0.33)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per operator")
    p.add_argument("--operators", nargs="+", default=list(OPERATORS), choices=OPERATORS)
    p.add_argument("--out", default="kept_patches.png")
    args = p.parse_args(argv)

    model, processor = mlx_compact.load(args.model)
    with Image.open(args.image) as im:
        image = to_rgb(ImageOps.exif_transpose(im))
    run = dict(max_pixels=args.max_pixels, max_tokens=args.max_tokens)
    mlx_compact.generate(model, processor, args.prompt, [image], **run)  # warm-up: first calls compile kernels

    print(f"{'operator':>10} {'visual tokens':>14} {'TTFT s':>7} {'vision s':>9} {'prefill s':>9} {'KV MiB':>7}")
    panels = []
    for name in args.operators:
        c = mlx_compact.Compaction.none() if name == "none" else mlx_compact.Compaction(method=name, keep=args.keep)
        s = mlx_compact.generate(model, processor, args.prompt, [image], compaction=c, **run).stats
        v = s["visual_tokens"][0]
        t = s["ttft_s"]
        print(
            f"{name:>10} {v['after']:>6} of {v['before']:<5} {sum(t.values()):>7.3f} {t['vision']:>9.3f} "
            f"{t['prefill']:>9.3f} {s['kv_bytes_used'] / 2**20:>7.2f}"
        )
        cells, grid = kept_cells(model, processor, args.prompt, image, c, args.max_pixels)
        panels.append(panel(image, cells, grid, f"{name}: {len(cells)} of {grid[0] * grid[1]} tokens"))
    sheet(panels).save(args.out)
    print(f"kept patches drawn in {args.out}")


if __name__ == "__main__":
    main()
