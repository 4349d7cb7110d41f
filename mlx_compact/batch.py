"""A folder of images through one model: one JSON line per image, resumable, bad images skipped.

`run_batch` reads every image's header first (a file that is no image is reported and skipped), plans the
memory once for the largest image and the longest prompt (`generate.check_memory`, refusing before anything
runs when it does not fit), then answers each image with `stream_generate` and appends its line to the
output, flushed, so an interrupted batch loses at most the image it was on. With ``resume`` the images
whose lines are already in the output are not computed again.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .files import InputError
from .generate import check_memory, image_patches, stream_generate
from .images import open_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}


def list_images(spec: str) -> list[str]:
    """The image files of a folder (by suffix, in name order) or of a glob pattern (every match, sorted)."""
    if os.path.isdir(spec):
        names = sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        files = [str(p) for p in names]
    else:
        files = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
    if not files:
        raise InputError(f"no images in {spec}: give a folder of image files or a glob pattern such as 'photos/*.jpg'")
    return files


def read_prompts(path: str, n: int) -> list[str]:
    """One prompt per line of ``path``, for the ``n`` images in order."""
    from .files import read_text

    lines = [line for line in read_text(path, what="prompts file").splitlines() if line.strip()]
    if len(lines) != n:
        raise InputError(
            f"prompts file {path} has {len(lines)} prompts for {n} images: give one line per image, in name order"
        )
    return lines


def finished(out: str) -> set[str]:
    """The files an output already answers (its complete, valid lines)."""
    done = set()
    try:
        with open(out, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupt
                if isinstance(record, dict) and isinstance(record.get("file"), str) and "answer" in record:
                    done.add(record["file"])
    except FileNotFoundError:
        pass
    return done


def run_batch(
    model,
    processor,
    files: Sequence[str],
    prompts: Sequence[str],
    out: str,
    *,
    resume: bool = False,
    on_error: Callable[[str, str], None] | None = None,
    progress: bool = True,
    **options,
) -> dict:
    """Answer ``prompts[i]`` about ``files[i]`` for every image, one JSON line each appended to ``out``.

    ``options``: `stream_generate`'s (max_tokens, temperature, compaction, max_pixels, max_kv_size, kv_bits,
    memory_budget, ...). ``on_error(file, message)`` is told of each image skipped. Returns counts:
    ``answered``, ``skipped`` (bad images), ``resumed`` (already in ``out``).
    """
    from tqdm import tqdm

    if os.path.exists(out) and not resume:
        raise InputError(f"{out} exists: pass --resume to continue it, or give another --out")
    done = finished(out) if resume else set()
    todo = [(f, p) for f, p in zip(files, prompts) if f not in done]
    counts = {"answered": 0, "skipped": 0, "resumed": len(files) - len(todo)}

    def skip(file: str, message: str) -> None:
        counts["skipped"] += 1
        if on_error is not None:
            on_error(file, " ".join(message.split()))

    headers = []
    for f, p in todo:
        try:
            headers.append((open_image(f), p))
        except InputError as e:
            skip(f, str(e))
    if not headers:
        return counts
    max_pixels = options.get("max_pixels")
    largest = max(headers, key=lambda h: (image_patches(processor, [h[0]], max_pixels)[0], h[0].decode_bytes(1)))[0]
    check_memory(  # once, for the largest image and the longest prompt; every other run is smaller
        model,
        processor,
        max((p for _, p in headers), key=len),
        [largest],
        max_pixels=max_pixels,
        compaction=options.get("compaction"),
        max_kv_tokens=options.get("max_kv_size"),
        kv_bits=options.get("kv_bits"),
        max_tokens=options.get("max_tokens", 256),
        budget=options.get("memory_budget"),
    )
    fresh = not os.path.exists(out) or os.path.getsize(out) == 0
    with open(out, "a", encoding="utf-8") as sink:
        if not fresh:
            with open(out, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # an interrupted line: start on a new one
                    sink.write("\n")
        bar = tqdm(total=len(headers), unit="image", disable=not progress, dynamic_ncols=True)
        try:
            for image, prompt in headers:
                t0 = time.perf_counter()
                text, stats = "", {}
                try:
                    for r in stream_generate(model, processor, prompt, [image], fit="off", **options):
                        text += r.text
                        stats = r.stats or stats
                except InputError as e:  # e.g. a file whose header reads but whose pixels are corrupt
                    skip(image.path, str(e))
                    bar.update(1)
                    continue
                record = {
                    "file": image.path,
                    "prompt": prompt,
                    "answer": text,
                    "visual_tokens": stats.get("visual_tokens"),
                    "prompt_tokens": stats.get("prompt_tokens"),
                    "generation_tokens": stats.get("generation_tokens"),
                    "finish_reason": stats.get("finish_reason"),
                    "ttft_s": round(sum(stats.get("ttft_s", {}).values()), 4),
                    "total_s": round(time.perf_counter() - t0, 4),
                }
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                counts["answered"] += 1
                bar.update(1)
        finally:
            bar.close()
    return counts
