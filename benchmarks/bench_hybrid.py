"""The Qwen3.5 / 3.6 hybrids (Gated DeltaNet + gated attention) against mlx-vlm, side by side, same weights.

Random float32 weights at Qwen3.6-27B widths (``qwen3_5``) and Qwen3.6-35B-A3B widths (``qwen3_5_moe``) at reduced
depth (``--llm-layers``, default 4: the releases' 3:1 pattern, three Gated DeltaNet layers then one gated
attention) are generated once and loaded into our model and mlx-vlm's (same parameter names and shapes, one
shared copy). Reduced to fit this 24 GiB machine in float32, beside the depth: the vocabulary (``--vocab``, default
32768 rows of the releases' 248320; the special tokens keep their places at its top) and the 35B-A3B's experts
(``--experts``, default 64 of 256; top 8 and the shared expert as released). A random 1280x720 image is
preprocessed once (smart_resize + patchify as the checkpoints' processor) and fed to both. Measured, alternating
the sides, best of ``--repeats``:

- prepare: everything before the language model, one image: the vision tower and merger, the splice of the
  visual tokens into the prompt and the M-RoPE positions (ours: ``mlx_compact.generate.prepare_ids``, which also
  compacts; mlx-vlm: ``get_input_embeddings``);
- prefill: time to the first token with each library's own generation loop and the same chunk size
  (ours: ``mlx_compact.generate.generate_step``; mlx-vlm: ``mlx_vlm.generate.ar.generate_step``);
- decode: tokens/s over ``--decode`` greedy steps after the first token;
- peak memory of prepare and of generation above the memory active before (``mx.reset_peak_memory()``);
- KV + state: the bytes each library's caches hold after the run (its caches' ``nbytes``), and of those our
  linear state (conv + float32 recurrent state of the Gated DeltaNet layers).

Two of our runs: uncompacted, and at keep 1/3 (``Compaction(keep=1/3)``: the default method, post-merger
diversity with proportional attention), both against mlx-vlm uncompacted (it has no compaction). A check
compares the visual features, the first token's log-probs and the greedy tokens of our uncompacted run with
mlx-vlm's, so the comparison is apples to apples. Then the Gated DeltaNet recurrence alone (one layer, the
prompt's length, same inputs): mlx-lm's ``gated_delta_update``, which our layer calls (on the CPU a per-token
loop), against mlx-vlm's (on the CPU a chunked parallel scan): the prefill's main difference off Metal.

    taskset -c 1 python benchmarks/bench_hybrid.py [--models qwen3_5,qwen3_5_moe] [--llm-layers 4] [--vit-layers 2]
        [--vocab 32768] [--experts 64] [--decode 16] [--repeats 2] [--image 1280x720]

Prints a table (ratio = mlx-vlm time / ours, > 1: we are faster; memory and bytes: theirs / ours) and writes
benchmarks/results/bench_hybrid.json.
"""

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (imports mlx_compact before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_compact.cache import LinearCache  # noqa: E402
from mlx_compact.compaction import Compaction  # noqa: E402
from mlx_compact.generate import generate_step, make_cache, prepare_ids  # noqa: E402
from mlx_compact.processor import _PixelConfig, smart_resize  # noqa: E402

KEEP = 1 / 3


def image_rows(hw, seed: int = 0):
    """A random RGB image of ``hw`` (height, width) through smart_resize + normalize + patchify (Qwen3.5's
    processor: patch 16, merge 2, mean and std 0.5): rows [N, 1536], grid (t, h, w), resized (h, w)."""
    from PIL import Image

    pix = _PixelConfig(
        {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2},
        (65536, 16777216),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
    )
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (hw[0] // 16, hw[1] // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
    h, w = smart_resize(*hw, factor=pix.factor, min_pixels=pix.min_pixels, max_pixels=pix.max_pixels)
    x = pix.normalize(image, h, w)  # [C, H, W]
    rows, grid = pix.patchify(np.broadcast_to(x, (2, *x.shape)))
    return rows.astype(np.float32), tuple(int(g) for g in grid), (h, w)


def prompt_ids(cfg: dict, grid, vocab: int, seed: int = 0) -> list:
    """A user turn with one image and 16 random text tokens, then the assistant's header (Qwen3.5 ids)."""
    sid = {name: common.hybrid_id(i, vocab) for name, i in (("im_start", 248045), ("im_end", 248046))}
    text = [int(t) for t in np.random.default_rng(seed).integers(1000, vocab - 1000, 16)]
    n_visual = grid[0] * grid[1] * grid[2] // 4
    user, nl, assistant = 872, 198, 77091 if vocab > 77091 else 3001  # "user", "\n", "assistant" (in the vocabulary)
    ids = [sid["im_start"], user, nl, cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * n_visual
    return ids + [cfg["vision_end_token_id"]] + text + [sid["im_end"], nl, sid["im_start"], assistant, nl]


class Ours:
    def __init__(self, name, model, rows, grid, ids, compaction=None):
        self.name, self.model, self.rows, self.grid, self.ids = name, model, rows, [grid], ids
        self.compaction = compaction

    def prepare(self):
        prep = prepare_ids(self.model, self.ids, self.rows, self.grid, compaction=self.compaction)
        mx.eval(prep.embeds, prep.positions)
        return prep

    def generate(self, prep, step, max_tokens):
        self.cache = make_cache(self.model)
        steps = generate_step(self.model, prep, self.cache, lambda x: mx.argmax(x, axis=-1), step)
        self.logprobs = []
        for token, logprobs in steps:
            self.logprobs.append(logprobs)
            yield int(token)

    def cache_bytes(self) -> tuple:
        c = self.cache
        return sum(x.nbytes for x in c), sum(x.nbytes for x in c if isinstance(x, LinearCache))


class _Precomputed:
    """mlx-vlm's model answering get_input_embeddings from a precomputed result (so its own generate_step is
    timed without the vision tower, which `prepare` timed)."""

    def __init__(self, model, features):
        self._model, self._features = model, features

    def get_input_embeddings(self, *args, **kwargs):
        return self._features

    def __getattr__(self, name):
        return getattr(self._model, name)


class Theirs:
    name = "mlx-vlm"

    def __init__(self, model, rows, grid, ids):
        self.model, self.rows, self.ids, self.grid = model, mx.array(rows), mx.array([ids]), mx.array([grid])

    def prepare(self):
        feats = self.model.get_input_embeddings(self.ids, self.rows, image_grid_thw=self.grid)
        mx.eval([v for v in feats.to_dict().values() if v is not None])
        return feats

    def generate(self, feats, step, max_tokens):
        from mlx_vlm.generate.ar import generate_step as vlm_generate_step
        from mlx_vlm.models.cache import make_prompt_cache

        lm = self.model.language_model
        lm._position_ids = lm._rope_deltas = None  # a fresh generation
        self.cache = make_prompt_cache(lm)
        gen = vlm_generate_step(
            self.ids,
            _Precomputed(self.model, feats),
            None,
            None,
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            prefill_step_size=step,
            image_grid_thw=self.grid,
            prompt_cache=self.cache,
        )
        self.logprobs = []
        for tok, logprobs in gen:
            self.logprobs.append(logprobs)
            yield int(tok)

    def cache_bytes(self) -> tuple:
        return sum(c.nbytes for c in self.cache), None


def run_prepare(side):
    with common.Peak() as pk:
        c = time.process_time()
        t, out = common.timed(side.prepare)
        cpu = time.process_time() - c
    return t, cpu, pk.delta, out


def run_generate(side, prep, step, n_decode):
    """One generation: prefill s (time to the first token), decode tok/s, their CPU times, peak delta, tokens."""
    tokens = []
    with common.Peak() as pk:
        t0, c0 = time.perf_counter(), time.process_time()
        gen = side.generate(prep, step, n_decode + 2)
        tokens.append(next(gen))
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(n_decode):
            tokens.append(next(gen))
        t2, c2 = time.perf_counter(), time.process_time()
        gen.close()
    return {
        "prefill_s": t1 - t0,
        "decode_tok_s": n_decode / (t2 - t1),
        "prefill_cpu_s": c1 - c0,
        "decode_cpu_tok_s": n_decode / (c2 - c1),
        "generate_peak": pk.delta,
        "tokens": tokens,
    }


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def delta_rule_times(text_cfg, tokens: int, repeats: int) -> dict:
    """The Gated DeltaNet recurrence alone, one layer, ``tokens`` rows at the model's widths, same inputs: what our
    layer calls (mlx-lm's ``gated_delta_update``: on the CPU its per-token ops loop) against what mlx-vlm's calls
    (its ``gated_delta_update``: on the CPU a chunked parallel scan, chunks of 64). Best time and peak of each,
    and the largest difference of the outputs relative to their scale."""
    from mlx_lm.models.gated_delta import gated_delta_update as lm_update
    from mlx_lm.models.gated_delta import normalize_qk
    from mlx_vlm.models.qwen3_5.gated_delta import gated_delta_update as vlm_update

    t = text_cfg
    hk, hv, dk, dv = t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    key = mx.random.key(0)
    kq, kk, kv, ka, kb = mx.random.split(key, 5)
    q, k = normalize_qk(
        mx.random.normal((1, tokens, hk, dk), key=kq),
        mx.random.normal((1, tokens, hk, dk), key=kk),
        inv_scale=dk**-0.5,
        eps=1e-6,
    )
    v = mx.random.normal((1, tokens, hv, dv), key=kv)
    a, b = mx.random.normal((1, tokens, hv), key=ka), mx.random.normal((1, tokens, hv), key=kb)
    A_log, dt_bias = mx.zeros((hv,)) + 0.5, mx.zeros((hv,)) + 0.1
    mx.eval(q, k, v, a, b)
    out, times = {}, {}
    for name, fn in (("ours (mlx-lm)", lm_update), ("mlx-vlm", vlm_update)):
        for _ in range(repeats):
            with common.Peak() as pk:
                t0 = time.perf_counter()
                y, state = fn(q, k, v, a, b, A_log, dt_bias, None)
                mx.eval(y, state)
                dt = time.perf_counter() - t0
            times[name] = min(times.get(name, (1e9, 0)), (dt, pk.delta))
        out[name] = y
    scale = float(mx.abs(out["mlx-vlm"]).max())
    return {
        "tokens": tokens,
        "seconds": {n: t_[0] for n, t_ in times.items()},
        "peak_mib": {n: t_[1] / common.MiB for n, t_ in times.items()},
        "rel_diff": float(mx.abs(out["ours (mlx-lm)"] - out["mlx-vlm"]).max()) / scale,
    }


def config_for(model_type: str, args) -> dict:
    extra = (args.experts,) if model_type == "qwen3_5_moe" else ()
    return common.CONFIGS[model_type](args.llm_layers, args.vit_layers, args.vocab, *extra)


def bench_model(model_type: str, args) -> dict:
    cfg = config_for(model_type, args)
    what = f"{args.llm_layers} LLM layers, {args.vit_layers} ViT blocks, vocabulary {args.vocab}"
    if model_type == "qwen3_5_moe":
        what += f", {args.experts} experts"
    print(f"\n=== {common.NAMES[model_type]} widths, {what} ===", flush=True)
    t = time.perf_counter()
    ours_m, theirs_m = common.build_ours(cfg), common.build_mlx_vlm(cfg)
    weights = common.random_weights(ours_m, seed=args.seed)
    common.load_same_weights([ours_m, theirs_m], weights)
    hw = tuple(int(v) for v in reversed(args.image.split("x")))
    rows, grid, resized = image_rows(hw, args.seed)
    ids = prompt_ids(cfg, grid, args.vocab, args.seed)
    n_visual = grid[0] * grid[1] * grid[2] // 4
    print(
        f"weights {common.param_bytes(weights) / 2**30:.2f} GiB f32, built in {time.perf_counter() - t:.0f}s; "
        f"image {hw[1]}x{hw[0]} -> {resized[1]}x{resized[0]}, {rows.shape[0]} patches, {n_visual} visual tokens, "
        f"prompt {len(ids)} tokens",
        flush=True,
    )
    sides = [
        Ours("ours", ours_m, rows, grid, ids),
        Ours("ours-keep", ours_m, rows, grid, ids, Compaction(keep=KEEP)),
        Theirs(theirs_m, rows, grid, ids),
    ]
    res = {s.name: {} for s in sides}
    preps = {}
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            t, cpu, peak, out = run_prepare(side)
            preps[side.name] = out
            for k, v in (("prepare_s", t), ("prepare_cpu_s", cpu), ("prepare_peak", peak)):
                res[side.name].setdefault(k, []).append(v)
            print(f"  prepare {side.name:9s} {t:7.2f}s  peak +{peak / common.MiB:7.0f} MiB", flush=True)
            gc.collect()
    for r in range(args.repeats):
        for side in sides if r % 2 == 0 else sides[::-1]:
            g = run_generate(side, preps[side.name], args.prefill_step, args.decode)
            side.tokens = g.pop("tokens")
            for k, v in g.items():
                res[side.name].setdefault(k, []).append(v)
            res[side.name]["cache_bytes"], res[side.name]["linear_state_bytes"] = side.cache_bytes()
            print(
                f"  generate {side.name:9s} prefill {g['prefill_s']:7.2f}s  decode {g['decode_tok_s']:6.2f} tok/s  "
                f"peak +{g['generate_peak'] / common.MiB:7.0f} MiB",
                flush=True,
            )
            del side.cache
            gc.collect()

    ours, theirs = sides[0], sides[2]
    p_ours, p_theirs = preps["ours"], preps["mlx-vlm"]
    check = {
        "embeds_rel_err": rel_err(p_ours.embeds.reshape(-1, p_ours.embeds.shape[-1]), p_theirs.inputs_embeds[0]),
        "positions_equal": bool(
            np.array_equal(np.array(p_ours.positions).reshape(3, -1), np.array(p_theirs.position_ids).reshape(3, -1))
        ),
        "first_token_logprob_max_abs_diff": float(
            np.abs(np.array(ours.logprobs[0]) - np.array(theirs.logprobs[0])).max()
        ),
        "greedy_tokens_equal": ours.tokens == theirs.tokens,
        "kept_visual_tokens": preps["ours-keep"].visual_tokens,
        "keep_prompt_tokens": len(preps["ours-keep"].input_ids),
    }
    print("  check: " + ", ".join(f"{k}={v}" for k, v in check.items()), flush=True)
    delta = delta_rule_times(ours_m.config.text, len(ids), args.repeats)
    print(f"  the delta rule alone, one layer, {len(ids)} rows: {delta}", flush=True)
    summary = {}
    for name, s in res.items():
        summary[name] = {
            "prepare_s": min(s["prepare_s"]),
            "prefill_s": min(s["prefill_s"]),
            "decode_tok_s": max(s["decode_tok_s"]),
            "median": {k: float(np.median(s[k])) for k in ("prepare_s", "prefill_s", "decode_tok_s")},
            "cpu_median": {k: float(np.median(s[k])) for k in ("prepare_cpu_s", "prefill_cpu_s", "decode_cpu_tok_s")},
            "prepare_peak_mib": max(s["prepare_peak"]) / common.MiB,
            "generate_peak_mib": max(s["generate_peak"]) / common.MiB,
            "cache_bytes": s["cache_bytes"],
            "linear_state_bytes": s["linear_state_bytes"],
            "runs": s,
        }
    out = {
        "model": common.NAMES[model_type],
        "model_type": model_type,
        "reduced": what,
        "config": cfg,
        "image": {"input_hw": hw, "resized_hw": resized, "grid_thw": grid, "visual_tokens": n_visual},
        "prompt_tokens": len(ids),
        "prefill_step": args.prefill_step,
        "decode_steps": args.decode,
        "check": check,
        "delta_rule": delta,
        "summary": summary,
    }
    del sides, ours, theirs, preps, p_ours, p_theirs, ours_m, theirs_m, weights
    gc.collect()
    mx.clear_cache()
    return out


def print_table(results):
    cols = ("prepare_s", "prefill_s", "decode_tok_s", "prepare_peak_mib", "generate_peak_mib", "cache_bytes")
    print(
        f"\n{'model':<17}{'ours':<10}{'prepare s':>10}{'prefill s':>10}{'decode t/s':>11}{'prep MiB':>9}"
        f"{'gen MiB':>9}{'KV+state':>10}{'state':>9} | ratios (mlx-vlm / ours; decode ours / mlx-vlm)"
    )
    for r in results:
        s, th = r["summary"], r["summary"]["mlx-vlm"]
        for name in ("ours", "ours-keep", "mlx-vlm"):
            o = s[name]
            line = (
                f"{r['model']:<17}{name:<10}{o['prepare_s']:>10.2f}{o['prefill_s']:>10.2f}{o['decode_tok_s']:>11.2f}"
                f"{o['prepare_peak_mib']:>9.0f}{o['generate_peak_mib']:>9.0f}{o['cache_bytes'] / 2**20:>8.1f}Mi"
                f"{(o['linear_state_bytes'] or 0) / 2**20:>7.1f}Mi"
            )
            if name != "mlx-vlm":
                ratios = [th[c] / o[c] for c in cols]
                ratios[2] = o["decode_tok_s"] / th["decode_tok_s"]
                line += " | " + " ".join(f"{x:5.2f}x" for x in ratios)
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3_5,qwen3_5_moe")
    ap.add_argument("--llm-layers", type=int, default=4)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--image", default="1280x720", help="WIDTHxHEIGHT")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-step", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    env = common.environment()
    print(f"BLAS {env['blas']}, mlx {env['mlx']}, mlx-vlm {env['mlx_vlm']}, {env['device']}, float32", flush=True)
    results = [bench_model(mt, args) for mt in args.models.split(",")]
    print_table(results)
    path = common.write_json("bench_hybrid.json", {"environment": env, "args": vars(args), "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
