"""Our uncompacted Qwen-VL path against mlx-vlm, side by side, same weights, one process.

Random float32 weights at real widths (Qwen2.5-VL-3B, Qwen3-VL-2B, Qwen3-VL-30B-A3B) and reduced depth are
generated once and loaded into both our model and mlx-vlm's. Qwen3-VL-30B-A3B goes through files: a
checkpoint in the Qwen release's layout and config dialect (fused experts [E, H, 2I]) is written, converted
by ``convert.convert`` (mlx-vlm's layout), and that one directory is loaded by both libraries
(``mlx_compact.loader.load_model``, ``mlx_vlm.utils.load_model``); every tensor mlx-vlm read is checked equal
to ours, then both models share one copy (kept under --ckpt-dir, reused by the next run). A 1280x720 image is preprocessed
once (smart_resize + patchify as the checkpoints' processors do) and fed to both. Measured for
both, alternating ours / mlx-vlm, best of --repeats:

- vision: the vision tower including the merger (and DeepStack mergers), one image;
- prefill: the LLM over the whole prompt with each library's own generation loop
  (ours: ``mlx_compact.generate.generate_step``; mlx-vlm: ``mlx_vlm.generate.ar.generate_step``),
  both with the same chunk size, time to the first token;
- decode: tokens/s over --decode greedy steps after the first token, each with its own KV cache;
- peak memory of each phase above the memory active before it (mx.reset_peak_memory()).

A correctness check compares vision features, DeepStack features, the first token's log-probs and
teacher-forced decode log-probs between the two, so the comparison is apples to apples.

    python benchmarks/bench_port.py [--models qwen2_5_vl,qwen3_vl,qwen3_vl_moe] [--llm-layers 4] [--vit-layers 4]
                                    [--decode 16] [--repeats 3] [--prefill-step 512|default] [--ckpt-dir DIR]

Prints a table (ratio = mlx-vlm time / our time, > 1 means we are faster; memory: theirs / ours; times are
the best of the repeats, and the median and the spread (max / min - 1) of each side follow it) and writes
benchmarks/results/bench_port.json.

``--e2e`` instead times both libraries end to end through their public API, each with its defaults, on one
converted directory (`write_e2e_checkpoint`): ``mlx_compact.load`` + ``mlx_compact.stream_generate`` against
``mlx_vlm.load`` + ``mlx_vlm.stream_generate`` (what each library's ``generate`` loops over), alternating after
one warm-up each: time to the first token, prompt tok/s and decode tok/s; writes
benchmarks/results/bench_port_e2e.json. Both modes also give each figure in process CPU time, which leaves out
what other processes time-sharing the core add (the wall-clock figures include it).
"""

import argparse
import gc
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (imports mlx_compact before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_compact.generate import Prepared, make_cache  # noqa: E402
from mlx_compact.generate import generate_step as our_generate_step
from mlx_compact.processor import CLIP_MEAN, CLIP_STD, _PixelConfig, smart_resize  # noqa: E402

IMAGE_HW = (720, 1280)  # height, width
OUR_DEFAULT_STEP = 512  # mlx_compact.generate.prefill default
TARGET = 0.95
CPU_KEYS = ("vision_cpu_s", "prefill_cpu_s", "decode_cpu_tps")  # process CPU time, beside the wall-clock figures

# ----- inputs -------------------------------------------------------------------------------


def make_image_rows(model_type: str, seed: int = 0):
    """A random 1280x720 RGB image through smart_resize + normalize + patchify: rows, grid."""
    from PIL import Image

    qwen3 = model_type.startswith("qwen3_vl")
    patch = 16 if qwen3 else 14
    pix = _PixelConfig(
        {
            "patch_size": patch,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": 56 * 56,
            "max_pixels": 16384 * 28 * 28,
        },
        (56 * 56, 16384 * 28 * 28),
        (0.5, 0.5, 0.5) if qwen3 else CLIP_MEAN,
        (0.5, 0.5, 0.5) if qwen3 else CLIP_STD,
    )
    rng = np.random.default_rng(seed)
    # smooth-ish content: low-res noise upscaled, so resizing is not degenerate
    small = rng.integers(0, 256, (IMAGE_HW[0] // 16, IMAGE_HW[1] // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((IMAGE_HW[1], IMAGE_HW[0]), Image.Resampling.BILINEAR)
    h, w = smart_resize(*IMAGE_HW, factor=pix.factor, min_pixels=pix.min_pixels, max_pixels=pix.max_pixels)
    x = pix.normalize(image, h, w)  # [C, H, W]
    rows, grid = pix.patchify(np.broadcast_to(x, (2, *x.shape)))
    return rows.astype(np.float32), tuple(int(g) for g in grid), (h, w)


def make_prompt(cfg: dict, grid, seed: int = 0):
    """Chat-formatted ids: system-less user turn with one image and ~16 text tokens."""
    n_visual = grid[0] * grid[1] * grid[2] // 4
    rng = np.random.default_rng(seed)
    text = [int(t) for t in rng.integers(1000, 100000, 16)]
    ids = [151644, 872, 198, cfg["vision_start_token_id"]] + [cfg["image_token_id"]] * n_visual
    ids += [cfg["vision_end_token_id"]] + text + [151645, 198, 151644, 77091, 198]
    return ids


# ----- the two sides ------------------------------------------------------------------------


class Ours:
    name = "ours"

    def __init__(self, model, rows, grid, ids):
        self.model, self.rows, self.grid, self.ids = model, mx.array(rows), [grid], ids

    def vision(self):
        out = self.model.encode(self.rows, self.grid)
        mx.eval(out.features, out.deepstack)
        return out

    def prepare(self, out) -> Prepared:
        """What mlx_compact.generate.prepare does after tokenizing, from a computed VisionOutput."""
        m = self.model
        visual, ds = m.split_visual(out, self.grid)
        embeds, deepstack = m.splice(self.ids, visual, ds if ds and ds[0] else None)
        positions, _ = m.positions(self.ids, self.grid)
        mx.eval(embeds, deepstack)
        return Prepared(self.ids, embeds, mx.array(positions)[:, None, :], deepstack, [], 0.0, 0.0)

    def generate(self, prep, step):
        """Yield token ids (int) with mlx_compact's own loop (prefill chunks of `step`)."""
        steps = our_generate_step(self.model, prep, make_cache(self.model), lambda x: mx.argmax(x, axis=-1), step)
        return (token for token, _ in steps)

    def teacher_forced_logprobs(self, prep, tokens, step):
        """Log-probs after the prompt and after each of `tokens` fed back (ours, no sampling)."""
        from mlx_compact.generate import prefill

        cache = make_cache(self.model)
        logits = prefill(self.model, prep, cache, step)
        out = [logits - mx.logsumexp(logits, axis=-1, keepdims=True)]
        start = int(prep.positions.max().item()) + 1  # decode step n sits at max(prompt positions) + 1 + n
        embed = self.model.language_model.model.embed_tokens
        for n, tok in enumerate(tokens):
            pos = mx.full((3, 1, 1), start + n, dtype=mx.int32)
            lg = self.model.language_model(embed(mx.array([[tok]])), pos, cache=cache)[:, -1, :]
            out.append(lg - mx.logsumexp(lg, axis=-1, keepdims=True))
        mx.eval(out)
        return [o[0] for o in out]


class _Precomputed:
    """mlx-vlm's model with get_input_embeddings answered from a precomputed result, so that
    mlx-vlm's own generate_step can be timed without re-running the vision tower."""

    def __init__(self, model, features):
        self._model, self._features = model, features

    def get_input_embeddings(self, *args, **kwargs):
        return self._features

    def __getattr__(self, name):
        return getattr(self._model, name)


class Theirs:
    name = "mlx-vlm"

    def __init__(self, model, rows, grid, ids):
        self.model, self.rows, self.ids = model, mx.array(rows), mx.array([ids])
        self.grid = mx.array([grid])
        self.qwen3 = model.config.model_type.startswith("qwen3_vl")

    def vision(self):
        out = self.model.vision_tower(self.rows, self.grid)
        mx.eval(out)
        return out

    def prepare(self):
        feats = self.model.get_input_embeddings(self.ids, self.rows, image_grid_thw=self.grid)
        mx.eval([v for v in feats.to_dict().values() if v is not None])
        return feats

    def generate(self, feats, step, max_tokens):
        """Yield token ids (int) with mlx-vlm's own generate_step."""
        from mlx_vlm.generate.ar import generate_step

        lm = self.model.language_model
        lm._position_ids = lm._rope_deltas = None  # fresh generation
        gen = generate_step(
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
        )
        self.logprobs = []
        for tok, logprobs in gen:
            self.logprobs.append(logprobs)
            yield int(tok)


# ----- Qwen3-VL-MoE: one converted directory, loaded by both -----------------------------------

SHARD_BYTES = 2 << 30


def _release_name(name: str, v: mx.array):
    """Our parameter name and value -> the Qwen release's (transformers 4.57) name and value."""
    if name.startswith("vision_tower."):
        name = "model.visual." + name[len("vision_tower.") :]
        if name.endswith("patch_embed.proj.weight"):
            v = v.transpose(0, 4, 1, 2, 3)  # [O, T, P, P, C] -> torch [O, C, T, P, P]
    elif name.startswith("language_model.model."):
        name = "model.language_model." + name[len("language_model.model.") :]
    elif name.startswith("language_model.lm_head."):
        name = name[len("language_model.") :]
    return name, v


def write_release_checkpoint(cfg: dict, path: Path, seed: int) -> None:
    """Random weights (`common.iter_random_weights` on our model) saved as the Qwen release saves them:
    fused experts ``mlp.experts.gate_up_proj`` [E, H, 2I] (gate first) and ``down_proj`` [E, I, H], shards of
    ~2 GiB with an index, the release-dialect config.json."""
    import json

    model = common.build_ours(cfg)  # parameters unevaluated: nothing allocated
    path.mkdir(parents=True, exist_ok=True)
    shard, size, shards, pending = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(path / name), shard, metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, size = {}, 0

    for name, v in common.iter_random_weights(model, seed):
        if ".switch_mlp." in name:
            prefix, proj = name.split(".switch_mlp.")
            proj = proj.split(".")[0]
            if proj == "down_proj":
                out = {prefix + ".experts.down_proj": v.swapaxes(1, 2)}  # [E, H, I] -> [E, I, H]
            else:
                pending.setdefault(prefix, {})[proj] = v
                if len(pending[prefix]) < 2:
                    continue
                gu = pending.pop(prefix)
                out = {
                    prefix + ".experts.gate_up_proj": mx.concatenate([gu["gate_proj"], gu["up_proj"]], axis=1).swapaxes(
                        1, 2
                    )
                }  # [E, H, 2I]
            out = {_release_name(k, w)[0]: mx.contiguous(w) for k, w in out.items()}
        else:
            out = dict([_release_name(name, v)])
        for k, w in out.items():
            mx.eval(w)
            shard[k] = w
            size += w.nbytes
        del out, v
        if size >= SHARD_BYTES and not pending:
            flush()
    flush()
    n = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (path / name).rename(path / final)
        weight_map.update({k: final for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def converted_checkpoint(model_type: str, cfg: dict, args) -> Path:
    """The directory our converter wrote from a release-layout random checkpoint (made once per config/seed)."""
    import hashlib
    import json
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from convert.convert import convert

    key = hashlib.sha256(json.dumps([cfg, args.seed, common._POOL_SIZE], sort_keys=True).encode()).hexdigest()[:10]
    root = Path(args.ckpt_dir).expanduser() / f"{model_type}-{args.llm_layers}l-{args.vit_layers}v-{key}"
    dst = root / "mlx"
    if (dst / "config.json").exists():
        return dst
    src = root / "release"
    shutil.rmtree(src, ignore_errors=True)
    t = time.perf_counter()
    write_release_checkpoint(cfg, src, args.seed)
    print(f"  wrote the release-layout checkpoint {src} in {time.perf_counter() - t:.0f}s", flush=True)
    gc.collect()
    t = time.perf_counter()
    convert(src, dst, dtype="float32", force=True, progress=False)
    print(f"  converted it with convert.convert into {dst} in {time.perf_counter() - t:.0f}s", flush=True)
    shutil.rmtree(src, ignore_errors=True)
    gc.collect()
    mx.clear_cache()
    return dst


def load_both(path: Path):
    """Our model and mlx-vlm's from one converted directory. mlx-vlm's is loaded lazily and every tensor it
    read is checked equal to ours, one at a time, then replaced by ours, so the two share one copy."""
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import load_model as vlm_load_model

    from mlx_compact.loader import load_model

    ours = load_model(path, dtype=mx.float32)
    theirs = vlm_load_model(path, lazy=True)
    own = dict(tree_flatten(ours.parameters()))
    shared = []
    for k, v in tree_flatten(theirs.parameters()):
        if k not in own:
            raise RuntimeError(f"mlx-vlm has a parameter {k} that ours lacks")
        if v.shape != own[k].shape or v.dtype != own[k].dtype or not mx.array_equal(v, own[k]).item():
            raise RuntimeError(
                f"{k}: mlx-vlm read {v.shape} {v.dtype}, ours {own[k].shape} {own[k].dtype}, or the values differ"
            )
        shared.append((k, own[k]))
        del v
    if len(shared) != len(own):
        raise RuntimeError(f"ours has {len(own) - len(shared)} parameters mlx-vlm lacks")
    theirs.load_weights(shared, strict=True)
    theirs.eval()
    return ours, theirs, own


# ----- measurement --------------------------------------------------------------------------


def run_vision(side):
    with common.Peak() as pk:
        c = time.process_time()
        t, out = common.timed(side.vision)
        side.cpu = {"vision_cpu_s": time.process_time() - c}  # CPU time: what time-sharing the core adds is left out
    return t, pk.delta, out


def run_generate(side, args_, n_decode):
    """One generation: (prefill s = time to first token, decode tok/s, peak delta, tokens)."""
    tokens = []
    with common.Peak() as pk:
        t0, c0 = time.perf_counter(), time.process_time()
        gen = side.generate(*args_)
        tokens.append(next(gen))
        t1, c1 = time.perf_counter(), time.process_time()
        for _ in range(n_decode):
            tokens.append(next(gen))
        t2, c2 = time.perf_counter(), time.process_time()
        gen.close()
    side.cpu = {"prefill_cpu_s": c1 - c0, "decode_cpu_tps": n_decode / (c2 - c1)}  # as run_vision's
    return t1 - t0, n_decode / (t2 - t1), pk.delta, tokens


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def bench_model(model_type, args):
    cfg = common.CONFIGS[model_type](args.llm_layers, args.vit_layers)
    print(
        f"\n=== {common.NAMES[model_type]} widths, {args.llm_layers} LLM layers, {args.vit_layers} ViT blocks ===",
        flush=True,
    )
    t = time.perf_counter()
    if model_type == "qwen3_vl_moe":  # through files: our converter's output, read by both
        ours_m, theirs_m, weights = load_both(converted_checkpoint(model_type, cfg, args))
    else:
        ours_m, theirs_m = common.build_ours(cfg), common.build_mlx_vlm(cfg)
        weights = common.random_weights(ours_m, seed=args.seed)
        common.load_same_weights([ours_m, theirs_m], weights)
    rows, grid, hw = make_image_rows(model_type, args.seed)
    ids = make_prompt(cfg, grid, args.seed)
    n_visual = grid[0] * grid[1] * grid[2] // 4
    print(
        f"weights {common.param_bytes(weights) / 2**30:.2f} GiB f32 (vision {common.param_bytes(weights, 'vision_tower') / 2**20:.0f} MiB), "
        f"built in {time.perf_counter() - t:.1f}s; image {IMAGE_HW[1]}x{IMAGE_HW[0]} -> {hw[1]}x{hw[0]}, "
        f"grid {grid} = {rows.shape[0]} patches, {n_visual} visual tokens, prompt {len(ids)} tokens",
        flush=True,
    )
    ours, theirs = Ours(ours_m, rows, grid, ids), Theirs(theirs_m, rows, grid, ids)
    step_ours = OUR_DEFAULT_STEP if args.prefill_step == "default" else int(args.prefill_step)
    step_theirs = None if args.prefill_step != "default" else None
    if args.prefill_step == "default":
        from mlx_vlm.generate.common import DEFAULT_PREFILL_STEP_SIZE

        step_theirs = DEFAULT_PREFILL_STEP_SIZE
    else:
        step_theirs = int(args.prefill_step)

    # --- vision, alternating
    res = {s: {"vision_s": [], "vision_peak": []} for s in ("ours", "mlx-vlm")}
    outs = {}
    for r in range(args.repeats):
        for side in (ours, theirs) if r % 2 == 0 else (theirs, ours):
            t, peak, out = run_vision(side)
            res[side.name]["vision_s"].append(t)
            res[side.name]["vision_peak"].append(peak)
            res[side.name].setdefault("vision_cpu_s", []).append(side.cpu["vision_cpu_s"])
            outs[side.name] = out
            print(f"  vision  {side.name:8s} {t:7.2f}s  peak +{peak / common.MiB:7.0f} MiB", flush=True)

    # --- correctness: vision
    o, (tf, tds) = outs["ours"], (outs["mlx-vlm"] if theirs.qwen3 else (outs["mlx-vlm"], []))
    check = {"vision_features_rel_err": rel_err(o.features, tf)}
    if o.deepstack or tds:
        check["deepstack_rel_err"] = (
            max(rel_err(a, b) for a, b in zip(o.deepstack, tds)) if len(o.deepstack) == len(tds) else float("inf")
        )
    del outs, o, tf, tds

    prep = ours.prepare(ours.vision())
    feats = theirs.prepare()
    check["embeds_rel_err"] = rel_err(prep.embeds, feats.inputs_embeds)
    check["positions_equal"] = bool(np.array_equal(np.array(prep.positions), np.array(feats.position_ids)))

    # --- generation (prefill + decode), alternating
    for s in res.values():
        s.update(prefill_s=[], decode_tps=[], generate_peak=[])
    toks = {}
    for r in range(args.repeats):
        for side in (ours, theirs) if r % 2 == 0 else (theirs, ours):
            gargs = (prep, step_ours) if side is ours else (feats, step_theirs, args.decode + 2)
            tp, tps, peak, tk = run_generate(side, gargs, args.decode)
            gc.collect()
            res[side.name]["prefill_s"].append(tp)
            res[side.name]["decode_tps"].append(tps)
            res[side.name]["generate_peak"].append(peak)
            for k, v in side.cpu.items():
                res[side.name].setdefault(k, []).append(v)
            toks[side.name] = tk
            print(
                f"  prefill {side.name:8s} {tp:7.2f}s  decode {tps:6.2f} tok/s  peak +{peak / common.MiB:7.0f} MiB",
                flush=True,
            )

    # --- correctness: first-token and teacher-forced decode log-probs (mlx-vlm's tokens fed to ours)
    theirs_lp = [np.array(lp) for lp in theirs.logprobs[: args.check_steps + 1]]
    ours_lp = ours.teacher_forced_logprobs(prep, toks["mlx-vlm"][: args.check_steps], step_ours)
    check["first_token_logprob_max_abs_diff"] = float(np.abs(np.array(ours_lp[0]) - theirs_lp[0]).max())
    check["decode_logprob_max_abs_diff"] = (
        max(float(np.abs(np.array(a) - b).max()) for a, b in zip(ours_lp[1:], theirs_lp[1:]))
        if args.check_steps
        else None
    )
    check["greedy_tokens_equal"] = toks["ours"] == toks["mlx-vlm"]
    check["greedy_tokens_agree"] = sum(a == b for a, b in zip(toks["ours"], toks["mlx-vlm"])) / len(toks["ours"])
    check["logprob_scale"] = float(np.abs(theirs_lp[0]).max())
    tol = 1e-3
    check["ok"] = bool(
        check["vision_features_rel_err"] < tol
        and check.get("deepstack_rel_err", 0) < tol
        and check["embeds_rel_err"] < tol
        and check["positions_equal"]
        and check["first_token_logprob_max_abs_diff"] < 1e-2
        and (check["decode_logprob_max_abs_diff"] or 0) < 1e-2
    )
    print(
        "  check: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in check.items()),
        flush=True,
    )

    summary = {}
    for name, s in res.items():
        summary[name] = {
            "vision_s": min(s["vision_s"]),
            "prefill_s": min(s["prefill_s"]),
            "decode_tok_s": max(s["decode_tps"]),
            "median": {
                "vision_s": float(np.median(s["vision_s"])),
                "prefill_s": float(np.median(s["prefill_s"])),
                "decode_tok_s": float(np.median(s["decode_tps"])),
            },
            "spread": {k: max(s[k]) / min(s[k]) - 1 for k in ("vision_s", "prefill_s", "decode_tps")},
            "vision_peak_mib": max(s["vision_peak"]) / common.MiB,
            "generate_peak_mib": max(s["generate_peak"]) / common.MiB,
            "runs": s,
        }
        summary[name]["cpu_median"] = {k: float(np.median(s[k])) for k in CPU_KEYS if s.get(k)}
    out = {
        "model": common.NAMES[model_type],
        "model_type": model_type,
        "llm_layers": args.llm_layers,
        "vit_layers": args.vit_layers,
        "config": cfg,
        "image": {
            "input_hw": IMAGE_HW,
            "resized_hw": hw,
            "grid_thw": grid,
            "patches": rows.shape[0],
            "visual_tokens": n_visual,
        },
        "prompt_tokens": len(ids),
        "prefill_step": {"ours": step_ours, "mlx-vlm": step_theirs},
        "decode_steps": args.decode,
        "check": check,
        "summary": summary,
    }
    del ours, theirs, ours_m, theirs_m, weights, prep, feats
    gc.collect()
    mx.clear_cache()
    return out


def table(results, args):
    rows = []
    for r in results:
        o, t = r["summary"]["ours"], r["summary"]["mlx-vlm"]
        L, V = r["llm_layers"], r["vit_layers"]
        figs = [
            ("vision s", o["vision_s"], t["vision_s"], t["vision_s"] / o["vision_s"]),
            ("  per ViT block ms*", 1e3 * o["vision_s"] / V, 1e3 * t["vision_s"] / V, None),
            ("prefill s", o["prefill_s"], t["prefill_s"], t["prefill_s"] / o["prefill_s"]),
            ("  per LLM layer ms*", 1e3 * o["prefill_s"] / L, 1e3 * t["prefill_s"] / L, None),
            ("decode tok/s", o["decode_tok_s"], t["decode_tok_s"], o["decode_tok_s"] / t["decode_tok_s"]),
            ("  ms/token", 1e3 / o["decode_tok_s"], 1e3 / t["decode_tok_s"], None),
            (
                "vision peak MiB",
                o["vision_peak_mib"],
                t["vision_peak_mib"],
                t["vision_peak_mib"] / max(o["vision_peak_mib"], 1e-9),
            ),
            (
                "generate peak MiB",
                o["generate_peak_mib"],
                t["generate_peak_mib"],
                t["generate_peak_mib"] / max(o["generate_peak_mib"], 1e-9),
            ),
        ]
        for name, a, b, ratio in figs:
            flag = "" if ratio is None else ("" if ratio >= TARGET else "  <-- below 0.95x")
            rstr = "" if ratio is None else f"{ratio:6.2f}x"
            rows.append(f"{r['model']:14s} {name:20s} {a:10.2f} {b:10.2f} {rstr:>8s}{flag}")
    for r in results:
        o, t = r["summary"]["ours"], r["summary"]["mlx-vlm"]
        mo, mt = o["median"], t["median"]
        rows.append(
            f"{r['model']:14s} medians: vision {mo['vision_s']:.2f} vs {mt['vision_s']:.2f} s "
            f"({mt['vision_s'] / mo['vision_s']:.2f}x), prefill {mo['prefill_s']:.2f} vs {mt['prefill_s']:.2f} s "
            f"({mt['prefill_s'] / mo['prefill_s']:.2f}x), decode {mo['decode_tok_s']:.2f} vs {mt['decode_tok_s']:.2f} "
            f"tok/s ({mo['decode_tok_s'] / mt['decode_tok_s']:.2f}x); spread (max/min - 1) ours / mlx-vlm: "
            + ", ".join(
                f"{k.split('_')[0]} {100 * o['spread'][k]:.0f}% / {100 * t['spread'][k]:.0f}%"
                for k in ("vision_s", "prefill_s", "decode_tps")
            )
        )
    for r in results:
        o, t = r["summary"]["ours"].get("cpu_median", {}), r["summary"]["mlx-vlm"].get("cpu_median", {})
        if all(k in o and k in t for k in CPU_KEYS):
            rows.append(
                f"{r['model']:14s} CPU-time medians: vision {o['vision_cpu_s']:.2f} vs {t['vision_cpu_s']:.2f} s "
                f"({t['vision_cpu_s'] / o['vision_cpu_s']:.2f}x), prefill {o['prefill_cpu_s']:.2f} vs "
                f"{t['prefill_cpu_s']:.2f} s ({t['prefill_cpu_s'] / o['prefill_cpu_s']:.2f}x), decode "
                f"{o['decode_cpu_tps']:.2f} vs {t['decode_cpu_tps']:.2f} tok/s ({o['decode_cpu_tps'] / t['decode_cpu_tps']:.2f}x)"
            )
    head = f"{'model':14s} {'figure':20s} {'ours':>10s} {'mlx-vlm':>10s} {'ratio':>8s}"
    note = (
        "ratio: mlx-vlm time / our time (decode: our tok/s / theirs; memory: theirs / ours); > 1 = we are better.\n"
        "* per-layer figures are the phase time divided by the depth (vision includes patch embed and mergers;\n"
        "  prefill includes embedding, final norm and lm_head)."
    )
    return "\n".join([head, "-" * len(head)] + rows + [note])


# ----- end to end: each library's public load + generate on one converted directory -------------

TINY = Path(__file__).resolve().parent.parent / "mlx_compact" / "assets" / "qwen3-vl-tiny"
E2E_PROMPT = "what colour is the circle at the top left?"  # the tiny model's own kind of question
E2E_IDS = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4}


def write_e2e_checkpoint(model_type: str, args, path: Path) -> Path:
    """A converted directory as ``convert`` writes one (`convert.save_weights`: mlx-vlm's layout, float32;
    config.json through `convert._mlx_config`) at real widths and reduced depth, with random weights as in
    the side-by-side mode; the tokenizer, chat template and generation config of the shipped tiny model (a
    byte-level BPE of 640 ids, 0-6 special) and the release's image preprocessing for the model (patch
    size, mean/std; the pixel bounds of `make_image_rows`), plus the 1280x720 image as image.png.

    The embedding rows (tied with the output head) of every id but the whole-word tokens of that vocabulary
    (letters, optionally after a space: no special token, no lone byte) are zero, so every greedy token is
    a word both tokenizers decode and none ends the reply: both libraries generate exactly the tokens asked
    for.
    """
    import json
    import shutil

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from convert.convert import _mlx_config, save_config, save_weights
    from mlx_compact.processor import CLIP_MEAN, CLIP_STD

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = common.CONFIGS[model_type](args.llm_layers, args.vit_layers)
    cfg.update(E2E_IDS, eos_token_id=2)
    if "text_config" in cfg:
        cfg["text_config"]["eos_token_id"] = 2
    model = common.build_ours(cfg)
    weights = common.random_weights(model, seed=args.seed)
    name = "language_model.model.embed_tokens.weight"
    vocab = json.loads((TINY / "tokenizer.json").read_text())["model"]["vocab"]
    words = np.zeros((weights[name].shape[0], 1), bool)
    words[[i for t, i in vocab.items() if re.fullmatch("\u0120?[a-z]{2,}", t) and i < len(words)]] = True
    weights[name] = mx.where(mx.array(words), weights[name], 0.0)
    model.load_weights(list(weights.items()), strict=True)
    del weights
    save_weights(path, model, progress=False)
    save_config(_mlx_config(cfg, model), path / "config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(TINY / f, path / f)
    qwen3 = model_type.startswith("qwen3_vl")
    pixels = {"min_pixels": 56 * 56, "max_pixels": 16384 * 28 * 28}
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor",
                "do_convert_rgb": True,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": [0.5] * 3 if qwen3 else list(CLIP_MEAN),
                "image_std": [0.5] * 3 if qwen3 else list(CLIP_STD),
                "merge_size": 2,
                "patch_size": 16 if qwen3 else 14,
                "temporal_patch_size": 2,
                "resample": 3,
                "rescale_factor": 1 / 255,
                **pixels,
                "size": {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
            },
            indent=2,
        )
    )
    rng = np.random.default_rng(args.seed)  # the image of make_image_rows
    small = rng.integers(0, 256, (IMAGE_HW[0] // 16, IMAGE_HW[1] // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((IMAGE_HW[1], IMAGE_HW[0]), Image.Resampling.BILINEAR).save(path / "image.png")
    return path


def e2e_run(name: str, model, processor, image: str, max_tokens: int, peak: bool = True) -> dict:
    """One public streaming generation with the library's defaults, timed from the call: time to the first
    token (image load, preprocessing, vision, prefill), decode tokens/s after it, total; the library's own
    figures. ``generate`` in both libraries is a loop over this ``stream_generate``."""
    import mlx_vlm

    import mlx_compact

    with common.Peak() as pk:
        t0, c0 = time.perf_counter(), time.process_time()
        if name == "ours":
            gen = mlx_compact.stream_generate(model, processor, E2E_PROMPT, [image], max_tokens=max_tokens)
        else:
            from mlx_vlm.prompt_utils import apply_chat_template

            prompt = apply_chat_template(processor, model.config, E2E_PROMPT, num_images=1)
            gen = mlx_vlm.stream_generate(model, processor, prompt, image=[image], max_tokens=max_tokens)
        t_first, text, last = None, "", None
        for r in gen:
            if t_first is None:
                t_first, c_first = time.perf_counter(), time.process_time()
            text += r.text
            last = r
        t_end, c_end = time.perf_counter(), time.process_time()
    if name == "ours":
        n, prompt_tokens = last.stats["generation_tokens"], last.stats["prompt_tokens"]
        own = {"ttft_s": last.stats["ttft_s"], "decode_tok_s": last.stats["decode_tokens_per_s"]}
    else:
        n, prompt_tokens = last.generation_tokens, last.prompt_tokens
        own = {"prompt_tok_s": last.prompt_tps, "generation_tok_s": last.generation_tps}
    return {
        "ttft_s": t_first - t0,
        "decode_tok_s": (n - 1) / (t_end - t_first) if n > 1 else None,
        "total_s": t_end - t0,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": n,
        "prompt_tok_s": prompt_tokens / (t_first - t0),
        "peak_mib": pk.delta / common.MiB,
        "text": text,
        "cpu_ttft_s": c_first - c0,
        "cpu_decode_tok_s": (n - 1) / (c_end - c_first) if n > 1 else None,
        "own_report": own,
    }


def bench_e2e(model_type: str, args) -> dict:
    """Both libraries' public ``load`` and streaming ``generate`` on one converted directory, each with its
    defaults (ours: float32 on the CPU, prefill chunks of 512; mlx-vlm: the stored dtype, chunks of 2048),
    alternating ours / mlx-vlm after one untimed warm-up generation each."""
    import shutil
    import tempfile

    import mlx_vlm

    import mlx_compact

    print(
        f"\n=== e2e: {common.NAMES[model_type]} widths, {args.llm_layers} LLM layers, {args.vit_layers} ViT blocks ===",
        flush=True,
    )
    keep = args.e2e_dir is not None
    root = Path(args.e2e_dir) if keep else Path(tempfile.mkdtemp(prefix="mlx-compact-e2e-"))
    path = root / f"{model_type}-{args.llm_layers}l-{args.vit_layers}v-s{args.seed}"
    try:
        t = time.perf_counter()
        write_e2e_checkpoint(model_type, args, path)
        print(f"converted directory {path} ready in {time.perf_counter() - t:.1f}s", flush=True)
        t = time.perf_counter()
        sides = {"ours": mlx_compact.load(str(path))}
        load_s = {"ours": time.perf_counter() - t}
        t = time.perf_counter()
        sides["mlx-vlm"] = mlx_vlm.load(str(path))
        load_s["mlx-vlm"] = time.perf_counter() - t
        dtypes = {k: str(m.language_model.model.embed_tokens.weight.dtype) for k, (m, _) in sides.items()}
        print(f"load: ours {load_s['ours']:.1f}s, mlx-vlm {load_s['mlx-vlm']:.1f}s; dtypes {dtypes}", flush=True)
        image, n_tok = str(path / "image.png"), args.decode + 1
        for name, (m, pr) in sides.items():  # warm-up (first-call costs), untimed
            e2e_run(name, m, pr, image, 2)
        runs = {k: [] for k in sides}
        for r in range(args.repeats):
            for name in ("ours", "mlx-vlm") if r % 2 == 0 else ("mlx-vlm", "ours"):
                m, pr = sides[name]
                res = e2e_run(name, m, pr, image, n_tok)
                gc.collect()
                runs[name].append(res)
                print(
                    f"  e2e {name:8s} TTFT {res['ttft_s']:6.2f}s ({res['prompt_tok_s']:6.1f} prompt tok/s)  "
                    f"decode {res['decode_tok_s']:5.2f} tok/s  total {res['total_s']:6.2f}s  "
                    f"peak +{res['peak_mib']:6.0f} MiB",
                    flush=True,
                )
    finally:
        sides = None
        gc.collect()
        mx.clear_cache()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    texts = {k: v[-1]["text"] for k, v in runs.items()}
    prompts = {k: v[-1]["prompt_tokens"] for k, v in runs.items()}
    summary = {}
    for name, rs in runs.items():
        summary[name] = {}
        for k in ("ttft_s", "prompt_tok_s", "decode_tok_s", "total_s", "peak_mib", "cpu_ttft_s", "cpu_decode_tok_s"):
            xs = [x[k] for x in rs]
            summary[name][k] = {"median": float(np.median(xs)), "min": min(xs), "max": max(xs)}
    check = {
        "prompt_tokens_equal": prompts["ours"] == prompts["mlx-vlm"],
        "prompt_tokens": prompts["ours"],
        "texts_equal": texts["ours"] == texts["mlx-vlm"],
        "texts": texts,
    }
    print(f"  check: prompt tokens {prompts}, same text: {check['texts_equal']}", flush=True)
    return {
        "model": common.NAMES[model_type],
        "model_type": model_type,
        "llm_layers": args.llm_layers,
        "vit_layers": args.vit_layers,
        "generated_tokens": n_tok,
        "load_s": load_s,
        "dtypes": dtypes,
        "check": check,
        "summary": summary,
        "runs": runs,
    }


def e2e_table(results) -> str:
    """Medians (min-max) of each side; ratio of the medians, > 1 = we are faster."""
    head = f"{'model':14s} {'figure':16s} {'ours':>22s} {'mlx-vlm':>22s} {'ratio':>7s}"
    rows = [head, "-" * len(head)]
    for r in results:
        for k, label, higher in (
            ("ttft_s", "TTFT s", False),
            ("prompt_tok_s", "prompt tok/s", True),
            ("decode_tok_s", "decode tok/s", True),
            ("total_s", "total s", False),
            ("cpu_ttft_s", "CPU TTFT s", False),
            ("cpu_decode_tok_s", "CPU decode tok/s", True),
        ):
            o, t = r["summary"]["ours"][k], r["summary"]["mlx-vlm"][k]
            ratio = o["median"] / t["median"] if higher else t["median"] / o["median"]
            cells = [f"{x['median']:.2f} ({x['min']:.2f}-{x['max']:.2f})" for x in (o, t)]
            rows.append(f"{r['model']:14s} {label:16s} {cells[0]:>22s} {cells[1]:>22s} {ratio:6.2f}x")
    rows.append(
        "TTFT: from the stream_generate call to the first token (image load, preprocessing, vision, prefill);\n"
        "prompt tok/s: prompt tokens / TTFT; decode: tokens after the first / their time; CPU: the same with the\n"
        "process's CPU time (time-sharing of the core left out). Medians (min-max); ratio > 1 = we are faster."
    )
    return "\n".join(rows)


def main_e2e(args, env) -> None:
    t0 = time.perf_counter()
    results = [bench_e2e(m.strip(), args) for m in args.models.split(",") if m.strip()]
    print()
    print(e2e_table(results))
    total = time.perf_counter() - t0
    print(f"total {total:.0f}s")
    out = "bench_port_e2e.json" if args.out == "bench_port.json" else args.out
    path = common.write_json(out, {"environment": env, "args": vars(args), "total_s": total, "results": results})
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen2_5_vl,qwen3_vl")
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--vit-layers", type=int, default=4)
    p.add_argument("--decode", type=int, default=8, help="decode steps timed after the first token")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--prefill-step", default=str(OUR_DEFAULT_STEP), help="chunk for both, or 'default' (ours 512, mlx-vlm 2048)"
    )
    p.add_argument("--check-steps", type=int, default=3, help="teacher-forced decode steps compared")
    p.add_argument(
        "--e2e",
        action="store_true",
        help="end to end instead: both libraries' public load + stream_generate with their defaults on one "
        "converted directory (writes bench_port_e2e.json)",
    )
    p.add_argument("--e2e-dir", default=None, help="keep (and reuse) the --e2e converted directories here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_port.json")
    p.add_argument(
        "--ckpt-dir",
        default="/tmp/mlx-compact-bench",
        help="where the Qwen3-VL-MoE checkpoints (release layout, then converted) are written and kept",
    )
    args = p.parse_args()

    env = common.environment()
    print(
        f"MLX {env['mlx']} on {env['device']} ({env['device_info'].get('device_name', '?')}), "
        f"BLAS: {env['blas']}, mlx-vlm {env['mlx_vlm']}, {env['cpus']} CPUs, float32"
    )
    if args.e2e:
        return main_e2e(args, env)
    t0 = time.perf_counter()
    results = [bench_model(m.strip(), args) for m in args.models.split(",") if m.strip()]
    print()
    print(table(results, args))
    for r in results:
        print(
            f"{r['model']}: correctness {'OK' if r['check']['ok'] else 'MISMATCH'} "
            f"(vision rel err {r['check']['vision_features_rel_err']:.1e}, "
            f"first-token logprob diff {r['check']['first_token_logprob_max_abs_diff']:.1e})"
        )
    total = time.perf_counter() - t0
    print(f"total {total:.0f}s")
    path = common.write_json(args.out, {"environment": env, "args": vars(args), "total_s": total, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
