"""The runs that tests/test_pipeline.py compares between one process and a pipeline of ranks.

``python pipeline_runs.py OUT.json CHECKPOINT...`` under ``mlx.launch``: every rank loads each checkpoint with
``pipeline=True`` (rank 0 runs `runs` on it, the other ranks serve their layers), and rank 0 writes what the
runs gave as JSON.
"""

import json
import sys

import numpy as np
from PIL import Image

from mlx_compact import ChatSession, Compaction, make_prompt_cache, stream_generate
from mlx_compact.generate import plan_run
from mlx_compact.loader import LoadError, load_model
from mlx_compact.memory import MemoryPlanError
from mlx_compact.pipeline import pipeline_of
from mlx_compact.processor import Processor


def image() -> Image.Image:
    """A 90 x 60 RGB test image (smooth gradient plus noise)."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:60, 0:90]
    base = np.stack([x * 255 / 90, y * 255 / 60, (x + y) * 127 / 150], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (60, 90, 3)), 0, 255).astype(np.uint8), "RGB")


def _run(responses) -> dict:
    tokens, logprobs, stats = [], [], {}
    for r in responses:
        if r.token is not None and r.finish_reason != "stop":
            tokens.append(r.token)
            logprobs.append(np.array(r.logprobs).tolist())
        stats = r.stats or stats
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "kv_bytes": stats.get("kv_bytes_allocated"),
        "evicted": stats.get("kv_evicted_tokens"),
        "ranks": stats.get("ranks"),  # a pipeline's other ranks: their peaks in the run and weights
    }


def runs(model, processor) -> dict:
    """Greedy answers with their logprobs: an image; with compaction; with a fixed-size cache that rotates
    (image pinned); two chat turns over one cache."""
    im, q = image(), "Describe the picture in detail."
    out = {}
    out["image"] = _run(stream_generate(model, processor, q, [im], max_tokens=6))
    c = Compaction("diversity", keep=0.5)
    out["compaction"] = _run(stream_generate(model, processor, q, [im], max_tokens=6, compaction=c))
    cache = make_prompt_cache(model, max_kv_size=128)  # rotates during the answer, the image pinned
    out["fixed"] = _run(stream_generate(model, processor, q, [im], max_tokens=48, prompt_cache=cache))
    chat = ChatSession(model, processor, max_kv_size=160)
    out["chat"] = [_run(chat.stream(q, [im], max_tokens=5)), _run(chat.stream("And the colours?", max_tokens=5))]
    return out


def plan_refusal(model, processor) -> dict:
    """A run that fits rank 0 but not rank 1 (a large fixed-size cache, whose KV is per layer, on a split that
    gives rank 1 more layers): the plan of every rank, and the refusal."""
    settings = dict(max_kv_tokens=200_000, max_tokens=4)
    p = plan_run(model, processor, "Hi", [], **settings)
    (_, peak1, _), budget = p.ranks[0], (p.peak + p.ranks[0][1]) // 2
    if peak1 <= p.peak:
        return None
    try:
        next(stream_generate(model, processor, "Hi", max_kv_size=200_000, max_tokens=4, memory_budget=budget))
        message = None
    except MemoryPlanError as e:
        message = str(e)
    return {"peak0": p.peak, "peak1": peak1, "budget": budget, "message": message}


def main(argv) -> None:
    out, results = argv[0], {}
    for path in argv[1:]:
        try:  # every rank refuses a share that would not fit, with the same message
            load_model(path, pipeline=True, memory_budget=4096)
        except LoadError as e:
            refused = str(e)
        model = load_model(path, pipeline=True)
        pipe = pipeline_of(model)
        if pipe.rank != 0:
            pipe.serve(model)
            continue
        processor = Processor.from_pretrained(path)
        results[path] = {"split": pipe.split, "refused": refused, "plan": plan_refusal(model, processor)}
        results[path].update(runs(model, processor))
        pipe.close()
    if pipeline_of(model).rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1:])
