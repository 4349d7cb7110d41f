"""The memory planner's estimate against the measured peak, at real widths and reduced depth.

Random float32 weights at Qwen2.5-VL-3B, Qwen3-VL-2B, Qwen3-VL-30B-A3B, Qwen3.6-27B and Qwen3.6-35B-A3B widths
(the hybrids: ``--vocab`` rows and ``--experts`` to fit; the 3:1 layer pattern at any depth) (``--llm-layers`` /
``--vit-layers`` deep; the vocabulary, so the embedding / lm_head, at full size; the MoE's 128 experts per
layer all resident, as the plan counts them: 2.4 GiB per layer in float32). A processor is built around a
tiny byte-level tokenizer (the tests' one) with the model's token ids remapped to its special tokens,
so ``mlx_compact.generate`` runs end to end on a real image size with the checkpoints' pixel budgets.

For each image size:

- ``plan``: ``mlx_compact.memory.plan`` for the run, exactly as ``check_memory`` makes it;
- ``measured``: ``mx.reset_peak_memory()`` after the model is loaded, ``generate(...)``, then
  ``mx.get_peak_memory()``. Both ``plan.peak`` and ``measured`` include the weights; the table
  reports the whole figure and the part above the weights ("activations": measured minus the
  memory active before the run vs ``plan.peak - plan.weights``).
- with ``--stages``, per stage (a second, instrumented run of the same pipeline): the vision tower (``prepare``),
  then prefill + decode (``generate_step``), each peak above the memory active when it starts,
  against ``plan.vision`` and ``plan.kv + plan.prefill``.

Then a refusal: ``generate(..., memory_budget=weights + 16 MiB)`` must raise ``MemoryPlanError``
before the vision tower is called (the encoder is replaced by one that fails the check).

    python benchmarks/bench_memory.py [--models qwen2_5_vl,qwen3_vl,qwen3_vl_moe] [--sizes 640x480,1280x720,1920x1080]
                                      [--llm-layers 2] [--vit-layers 2] [--max-tokens 4] [--stages]

Prints a table and writes benchmarks/results/bench_memory.json.
"""

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import common  # noqa: E402  (imports mlx_compact before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mlx_compact import _blas  # noqa: E402
from mlx_compact.generate import (  # noqa: E402
    _sampler,
    generate,
    generate_step,
    image_patches,
    make_cache,
    pin_point,
    prepare,
)
from mlx_compact.memory import MemoryPlanError, device_budget, fmt_bytes, plan, weights_bytes  # noqa: E402
from mlx_compact.processor import CLIP_MEAN, CLIP_STD, Processor  # noqa: E402

TARGET = 0.15  # |estimate / measured - 1| on the whole peak
PROMPT = "Describe this image in detail."

# the checkpoints' preprocessor configs (pixel budgets as shipped)
PIXELS = {
    "qwen2_5_vl": {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    },
    "qwen3_vl": {
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    },
}
PIXELS["qwen3_vl_moe"] = PIXELS["qwen3_vl"]  # Qwen3-VL-30B-A3B ships Qwen3-VL's preprocessor config
PIXELS["qwen3_5"] = PIXELS["qwen3_5_moe"] = PIXELS["qwen3_vl"]  # so do the Qwen3.5 / 3.6 releases
HYBRIDS = ("qwen3_5", "qwen3_5_moe")


def tiny_token_ids(cfg: dict) -> dict:
    """The config with its special token ids moved to the tiny tokenizer's (ids 0..6)."""
    from tiny_checkpoints import TOKEN_IDS

    cfg = copy.deepcopy(cfg)
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    for key, tok in ids.items():
        cfg[key] = TOKEN_IDS[tok]
    for c in (cfg, cfg.get("text_config", {})):
        if "eos_token_id" in c:
            c["eos_token_id"] = TOKEN_IDS["<|im_end|>"]
    return cfg


def build(model_type: str, llm_layers: int, vit_layers: int, vocab: int | None = None, experts: int | None = None):
    """Our model at real widths and reduced depth with random weights, and a processor around the tiny tokenizer.
    ``vocab`` / ``experts``: the Qwen3.5 / 3.6 hybrids' vocabulary rows and (MoE) experts, reduced to fit."""
    from tiny_checkpoints import CHAT_TEMPLATE, make_tokenizer

    extra = {}
    if model_type in HYBRIDS:
        extra = {"vocab_size": vocab or common.HYBRID_VOCAB}
        if model_type == "qwen3_5_moe" and experts:
            extra["experts"] = experts
    cfg = tiny_token_ids(common.CONFIGS[model_type](llm_layers, vit_layers, **extra))
    model = common.build_ours(cfg)
    common.load_same_weights([model], common.random_weights(model, seed=0))
    mx.eval(model.parameters())
    tok = make_tokenizer()
    proc = Processor(".", tok, cfg, PIXELS[model_type], PIXELS[model_type], CHAT_TEMPLATE)
    return model, proc


def make_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def the_plan(model, proc, image, max_tokens: int, prefill_step: int = 512):
    """The plan check_memory makes for this run (same text estimate)."""
    text_tokens = len(proc.tokenizer(PROMPT)["input_ids"]) + 32
    return plan(model, image_patches(proc, [image]), text_tokens, max_tokens=max_tokens, prefill_step=prefill_step)


def settle():
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    return mx.get_active_memory()


def measure_generate(model, proc, image, max_tokens: int) -> dict:
    """Whole-run peak of generate() (includes the weights) and the part above the memory active before."""
    base = settle()
    # the OS's available memory excludes the weights already loaded, which the plan counts: add them back
    budget = device_budget()["available"] + mx.get_active_memory()
    r = generate(model, proc, PROMPT, [image], max_tokens=max_tokens, fit="refuse", memory_budget=budget)
    mx.synchronize()
    peak = mx.get_peak_memory()
    return {
        "base": base,
        "peak": peak,
        "above_base": peak - base,
        "prompt_tokens": r.stats["prompt_tokens"],
        "generated": r.stats["generation_tokens"],
        "stats_peak": r.stats["peak_memory_bytes"],
    }


def measure_stages(model, proc, image, max_tokens: int) -> dict:
    """Peak of the vision stage and of prefill + decode, each above the memory active when it starts."""
    base = settle()
    t = time.perf_counter()
    prep = prepare(model, proc, PROMPT, [image])
    mx.synchronize()
    vision = mx.get_peak_memory() - base
    t_vision = time.perf_counter() - t
    base2 = settle()
    cache = make_cache(model)
    pin = pin_point(model, cache, prep.input_ids, True, None)
    t = time.perf_counter()
    for n, _ in enumerate(generate_step(model, prep, cache, _sampler(0.0), 512, pin)):
        if n + 1 >= max_tokens:
            break
    mx.synchronize()
    llm = mx.get_peak_memory() - base2
    kv = sum(c.nbytes for c in cache)
    state = sum(c.nbytes for c in cache if type(c).__name__ == "LinearCache")
    out = {
        "linear_state": state,
        "vision": vision,
        "llm": llm,
        "llm_held_before": base2 - base,
        "kv_allocated": kv,
        "vision_s": t_vision,
        "llm_s": time.perf_counter() - t,
        "patches": int(np.prod(prep_grid(proc, image))),
    }
    del prep, cache
    return out


def prep_grid(proc, image):
    h, w = proc.image_resized_size(image.height, image.width)
    p = proc.image.patch_size
    return (1, h // p, w // p)


def check_refusal(model, proc, image) -> dict:
    """A small budget must raise MemoryPlanError before the vision tower runs."""
    budget = weights_bytes(model) + 16 * 2**20
    encode = model.encode
    called = []
    model.encode = lambda *a, **k: called.append(1) or encode(*a, **k)
    base = settle()
    try:
        generate(model, proc, PROMPT, [image], max_tokens=2, memory_budget=budget)
        raised, msg = False, ""
    except MemoryPlanError as e:
        raised, msg = True, str(e)
    finally:
        del model.encode
    mx.synchronize()
    allocated = max(0, mx.get_peak_memory() - base)  # the peak stays 0 when nothing was allocated
    return {
        "budget": budget,
        "raised": raised,
        "encoder_called": bool(called),
        "peak_above_base": allocated,
        "message": msg,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2_5_vl,qwen3_vl")
    ap.add_argument("--sizes", default="640x480,1280x720,1920x1080")
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--stages", action="store_true", help="also measure the vision and LLM stages apart")
    ap.add_argument("--vocab", type=int, default=None, help="Qwen3.5 / 3.6 only: vocabulary rows (default 248320)")
    ap.add_argument("--experts", type=int, default=None, help="Qwen3.6-35B-A3B only: experts (default 256)")
    args = ap.parse_args()
    print(f"BLAS: {_blas.BLAS}")
    print(
        f"mlx {mx.__version__}, device {mx.default_device()}, float32, {args.llm_layers} LLM layers, "
        f"{args.vit_layers} ViT blocks, full vocabulary (hybrids: {args.vocab or 'full'}; "
        f"35B-A3B experts: {args.experts or 256})\n"
    )
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows, refusals = [], {}
    for mt in args.models.split(","):
        t = time.perf_counter()
        model, proc = build(mt, args.llm_layers, args.vit_layers, args.vocab, args.experts)
        print(f"{common.NAMES[mt]}: built in {time.perf_counter() - t:.0f} s", flush=True)
        for w, h in sizes:
            image = make_image(w, h)
            p = the_plan(model, proc, image, args.max_tokens)
            m = measure_generate(model, proc, image, args.max_tokens)
            s = None if not args.stages else measure_stages(model, proc, image, args.max_tokens)
            row = {
                "model": common.NAMES[mt],
                "image": f"{w}x{h}",
                "patches": sum(image_patches(proc, [image])),
                "prompt_tokens": m["prompt_tokens"],
                "plan": {
                    "weights": p.weights,
                    "kv": p.kv,
                    "linear_state": p.state,
                    "vision": p.vision,
                    "prefill": p.prefill,
                    "peak": p.peak,
                },
                "measured": m,
                "stages": s,
                "peak_ratio": p.peak / m["peak"],
                "activation_ratio": (p.peak - p.weights) / m["above_base"],
            }
            rows.append(row)
            line = (
                f"  {w}x{h}: patches {row['patches']}, prompt {m['prompt_tokens']} tok | peak plan "
                f"{fmt_bytes(p.peak)} measured {fmt_bytes(m['peak'])} ({row['peak_ratio']:.3f}) | above weights "
                f"plan {fmt_bytes(p.peak - p.weights)} measured {fmt_bytes(m['above_base'])} "
                f"({row['activation_ratio']:.3f})"
            )
            if s:
                line += (
                    f"\n      vision plan {fmt_bytes(p.vision)} measured {fmt_bytes(s['vision'])} "
                    f"({p.vision / s['vision']:.3f}); kv+prefill plan {fmt_bytes(p.kv + p.prefill)} measured "
                    f"{fmt_bytes(s['llm'])} ({(p.kv + p.prefill) / max(s['llm'], 1):.3f}), "
                    f"kv alloc {fmt_bytes(s['kv_allocated'])} plan {fmt_bytes(p.kv)}"
                    + (f" (state {fmt_bytes(s['linear_state'])} plan {fmt_bytes(p.state)})" if p.state else "")
                    + "; "
                    f"vision {s['vision_s']:.1f} s, llm {s['llm_s']:.1f} s"
                )
            print(line, flush=True)
        refusals[common.NAMES[mt]] = r = check_refusal(model, proc, make_image(*sizes[-1]))
        print(
            f"  refusal at budget {fmt_bytes(r['budget'])}: raised={r['raised']}, encoder called="
            f"{r['encoder_called']}, peak above base {fmt_bytes(r['peak_above_base'])}\n    ...{r['message'][-150:]}",
            flush=True,
        )
        del model, proc
        gc.collect()
        mx.clear_cache()

    print(
        f"\n{'model':<15}{'image':>11}{'patches':>9}{'plan peak':>12}{'measured':>12}{'ratio':>7}"
        f"{'plan act':>11}{'meas act':>11}{'ratio':>7}{'ok':>4}"
    )
    for r in rows:
        m, p = r["measured"], r["plan"]
        ok = abs(r["peak_ratio"] - 1) <= TARGET
        print(
            f"{r['model']:<15}{r['image']:>11}{r['patches']:>9}"
            f"{p['peak'] / 2**20:>10.0f}Mi{m['peak'] / 2**20:>10.0f}Mi"
            f"{r['peak_ratio']:>7.3f}{(p['peak'] - p['weights']) / 2**20:>9.0f}Mi{m['above_base'] / 2**20:>9.0f}Mi"
            f"{r['activation_ratio']:>7.3f}{'yes' if ok else 'NO':>4}"
        )
    path = common.write_json(
        "bench_memory.json",
        {
            "environment": common.environment(),
            "args": vars(args),
            "target": TARGET,
            "rows": rows,
            "refusals": refusals,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
