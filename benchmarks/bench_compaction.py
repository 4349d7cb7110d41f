"""End-to-end compact visual tokens at real widths: visual tokens, KV bytes, vision / prefill / TTFT, decode.

Random weights at the real widths of Qwen2.5-VL-3B and Qwen3-VL-2B at REDUCED depth (--vit-blocks,
--llm-layers; per-layer figures are printed too), one 1920x1080 image resized by smart_resize (--max-pixels),
float32 on the CPU backend. For every operator and keep ratio, post-merger and (full-attention towers)
in-encoder, side by side with the uncompacted baseline, best of --repeats:

    python benchmarks/bench_compaction.py [--models qwen3_vl,qwen2_5_vl] [--ops diversity,saliency]
        [--keeps 0.5,0.33,0.25] [--modes post,encoder] [--repeats 3]

Post-merger runs share one vision pass per model (the tower output does not depend on the operator;
`saliency` pays for its attention probe, counted as compaction overhead). In-encoder runs time the whole tower
with the selection inside; the selection (and probe) time is the overhead. TTFT = vision + compaction + LLM
prefill (preprocessing is not part of it: pixels are random). Writes benchmarks/results/bench_compaction.json.
"""

import argparse
import json
import os
import platform
import time

import mlx.core as mx
import numpy as np

import mlx_compact  # noqa: F401  (preloads OpenBLAS before mlx.core)
from mlx_compact import _blas, memory
from mlx_compact.compaction import ENCODER_METHODS, METHODS, Compaction, assemble, tower_hooks
from mlx_compact.generate import make_cache, prefill, prepare_ids
from mlx_compact.models import build_model
from mlx_compact.processor import smart_resize

IMAGE_HW = (1080, 1920)
TEXT = dict(vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768, bos_token_id=0, eos_token_id=1)
MODELS = {
    "qwen2_5_vl": dict(  # Qwen2.5-VL-3B widths
        text=dict(
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=112,
            tokens_per_second=2,
            hidden_act="silu",
        ),
        real=dict(vit=32, llm=36, fullatt=[7, 15, 23, 31]),
    ),
    "qwen3_vl": dict(  # Qwen3-VL-2B widths
        text=dict(
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=6144,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e6,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2048,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            num_position_embeddings=2304,
            hidden_act="gelu_pytorch_tanh",
        ),
        real=dict(vit=24, llm=28, deepstack=[5, 11, 17]),
    ),
}
IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def build(arch, vit_blocks, llm_layers):
    spec = MODELS[arch]
    text = {**TEXT, **spec["text"], "num_hidden_layers": llm_layers}
    vision = {**spec["vision"], "depth": vit_blocks}
    if arch == "qwen2_5_vl":  # the last block of the reduced tower is its full-attention block
        vision["fullatt_block_indexes"] = [vit_blocks - 1]
    else:  # three DeepStack taps spread over the reduced tower, as [5, 11, 17] over 24
        vision["deepstack_visual_indexes"] = [max(0, round((i + 1) * vit_blocks / 4) - 1) for i in range(3)]
    cfg = {"model_type": arch, "architectures": ["X"], "text_config": text, "vision_config": vision, **IDS}
    model = build_model(cfg)
    mx.eval(model.parameters())
    return model


def inputs(model, max_pixels, seed=0):
    v = model.config.vision
    factor = v.patch_size * v.spatial_merge_size
    h, w = smart_resize(*IMAGE_HW, factor=factor, max_pixels=max_pixels)
    grid = (1, h // v.patch_size, w // v.patch_size)
    rng = np.random.default_rng(seed)
    pv = rng.standard_normal((grid[1] * grid[2], 3 * v.temporal_patch_size * v.patch_size**2)).astype(np.float32)
    n = grid[1] * grid[2] // v.spatial_merge_size**2
    c = model.config
    text = lambda k: rng.integers(1000, 50000, k).tolist()  # noqa: E731
    ids = text(20) + [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id] + text(24)
    return ids, pv, [grid], ids[-24:]


def _clocked(fn, clock):
    """Wrap a tower hook so its own time (inputs evaluated first) accumulates in clock["s"]."""

    def wrapped(*args):
        mx.eval([x for x in args if isinstance(x, mx.array)])
        t = time.perf_counter()
        out = fn(*args)
        mx.eval(out) if isinstance(out, mx.array) else None
        clock["s"] += time.perf_counter() - t
        return out

    return wrapped


def timed(fn, repeats):
    best, out = None, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, out


def llm(model, prep, repeats, decode):
    """Best-of prefill seconds, and decode tokens/s at the end of the prompt."""

    def run():
        cache = make_cache(model)
        logits = prefill(model, prep, cache)
        mx.eval(logits)
        return cache, logits

    t_pre, (cache, logits) = timed(run, repeats)
    tok = mx.argmax(logits, axis=-1)
    embed = model.language_model.model.embed_tokens
    start = int(prep.positions.max().item()) + 1  # decode step n sits at max(prompt positions) + 1 + n
    t = time.perf_counter()
    for n in range(decode):
        pos = mx.full((3, 1, 1), start + n, dtype=mx.int32)
        tok = mx.argmax(model.language_model(embed(tok.reshape(1, 1)), pos, cache=cache)[:, -1], axis=-1)
        mx.eval(tok)
    return t_pre, decode / (time.perf_counter() - t) if decode else 0.0


def kv_bytes(model, L):
    return memory.kv_bytes(model.config.text, L, dtype_bytes=4)  # float32 K and V


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="qwen3_vl,qwen2_5_vl")
    ap.add_argument("--ops", default=",".join(m for m in METHODS if m != "none"))
    ap.add_argument("--keeps", default="0.5,0.33,0.25")
    ap.add_argument("--modes", default="post,encoder")
    ap.add_argument("--vit-blocks", type=int, default=4)
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_compaction.json"))
    a = ap.parse_args()
    print(f"BLAS: {_blas.BLAS}  platform: {platform.platform()}  float32, CPU backend")
    print(f"reduced depth: {a.vit_blocks} ViT blocks, {a.llm_layers} LLM layers; best of {a.repeats}\n")
    rows = []
    for arch in a.models.split(","):
        model = build(arch, a.vit_blocks, a.llm_layers)
        ids, pv, grid, question = inputs(model, a.max_pixels)

        m = model.config.vision.spatial_merge_size
        merged = [(t, h // m, w // m) for t, h, w in grid]
        positions, _ = model.positions(ids, grid)
        clock = {"s": 0.0}
        hooks = lambda c: {k: _clocked(v, clock) if callable(v) else v for k, v in tower_hooks(model, c).items()}  # noqa: E731

        def encode(c=None):
            out = model.encode(mx.array(pv), grid, **hooks(c))
            mx.eval(out.features, out.deepstack)
            return out

        vis, out = timed(encode, a.repeats)
        blocks, ds = model.split_visual(out, grid)
        ds = ds if ds[0] else None
        base = assemble(model, ids, blocks, positions, merged, None, deepstack=ds)
        base_pre, base_dec = llm(model, base, a.repeats, a.decode)
        n = base.visual_tokens[0]["before"]
        row0 = dict(
            model=arch,
            op="none",
            keep=1.0,
            mode="-",
            visual_tokens=n,
            prompt_tokens=len(base.input_ids),
            kv_bytes=kv_bytes(model, len(base.input_ids)),
            vision_s=vis,
            compaction_s=0.0,
            prefill_s=base_pre,
            ttft_s=vis + base_pre,
            decode_tok_s=base_dec,
        )
        rows.append(row0)
        print(
            f"{arch}: image {IMAGE_HW[1]}x{IMAGE_HW[0]} -> patch grid {grid[0]}, {n} visual tokens, prompt "
            f"{len(ids)}; per LLM layer prefill {base_pre / a.llm_layers:.2f} s, per ViT block {vis / a.vit_blocks:.2f} s"
        )
        attention = None
        for mode in a.modes.split(","):
            for op in a.ops.split(","):
                if mode == "encoder" and (arch == "qwen2_5_vl" or op not in ENCODER_METHODS):
                    continue
                for keep in [float(k) for k in a.keeps.split(",")]:
                    c = Compaction(op, keep=keep, where=mode)
                    if mode == "post":  # the tower output is shared; saliency's attention probe is overhead
                        probe = 0.0
                        if op == "saliency":
                            if attention is None:
                                clock["s"] = 0.0
                                attention = [encode(c).attention]
                                attention_s = clock["s"]
                            probe = attention_s

                        def run():
                            r = assemble(
                                model,
                                ids,
                                blocks,
                                positions,
                                merged,
                                c,
                                deepstack=ds,
                                attention=attention if op == "saliency" else None,
                                prompt_ids=question,
                            )
                            mx.eval(r.embeds, r.deepstack)
                            return r

                        comp_s, p = timed(run, a.repeats)
                        v_s, comp_s = vis, comp_s + probe
                    else:  # the selection runs inside the tower: its time (and the probe's) is the overhead

                        def run():
                            clock["s"] = 0.0
                            r = prepare_ids(model, ids, pv, grid, compaction=c)
                            return r, clock["s"]

                        _, (p, sel_s) = timed(run, a.repeats)
                        v_s, comp_s = p.vision_s - sel_s, sel_s + p.compaction_s
                    pre, dec = llm(model, p, a.repeats, a.decode)
                    rows.append(
                        dict(
                            model=arch,
                            op=op,
                            keep=keep,
                            mode=mode,
                            visual_tokens=p.visual_tokens[0]["after"],
                            prompt_tokens=len(p.input_ids),
                            kv_bytes=kv_bytes(model, len(p.input_ids)),
                            vision_s=v_s,
                            compaction_s=comp_s,
                            prefill_s=pre,
                            ttft_s=v_s + comp_s + pre,
                            decode_tok_s=dec,
                        )
                    )
                    print_row(rows[-1], row0)
    print("\n" + table(rows))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(blas=_blas.BLAS, platform=platform.platform(), args=vars(a), rows=rows), f, indent=1)
    print(f"\nwrote {a.out}")


def print_row(r, b):
    print(
        f"  {r['mode']:7s} {r['op']:9s} keep {r['keep']:.2f}: {r['visual_tokens']:5d} tok  KV x{r['kv_bytes'] / b['kv_bytes']:.2f}"
        f"  prefill x{r['prefill_s'] / b['prefill_s']:.2f}  TTFT x{r['ttft_s'] / b['ttft_s']:.2f}"
        f"  overhead {100 * r['compaction_s'] / r['ttft_s']:.2f}%",
        flush=True,
    )


def table(rows):
    head = (
        "model",
        "mode",
        "op",
        "keep",
        "vis tok",
        "KV MB",
        "KV x",
        "vision s",
        "comp ms",
        "prefill s",
        "prefill x",
        "TTFT s",
        "TTFT x",
        "ovh %",
        "dec tok/s",
    )
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {}
    for r in rows:
        if r["op"] == "none":
            base[r["model"]] = r
        b = base[r["model"]]
        out.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["mode"],
                    r["op"],
                    f"{r['keep']:.2f}",
                    str(r["visual_tokens"]),
                    f"{r['kv_bytes'] / 2**20:.1f}",
                    f"{r['kv_bytes'] / b['kv_bytes']:.2f}",
                    f"{r['vision_s']:.2f}",
                    f"{1000 * r['compaction_s']:.0f}",
                    f"{r['prefill_s']:.2f}",
                    f"{r['prefill_s'] / b['prefill_s']:.2f}",
                    f"{r['ttft_s']:.2f}",
                    f"{r['ttft_s'] / b['ttft_s']:.2f}",
                    f"{100 * r['compaction_s'] / r['ttft_s']:.2f}",
                    f"{r['decode_tok_s']:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
