"""Fidelity of compact visual tokens: task accuracy and KL(full || compact) at the answer position.

Default mode (the shipped tiny Qwen3-VL on the synthetic test split of the world it was trained on, the
first edition's 3x3 grid, `training/grid_scenes.py`; `--world free` for the second edition's,
`training/scenes.py`, with `--model` a checkpoint trained on it): for every operator and
keep ratio, post-merger (and in-encoder with --encoder), accuracy per question family on
`eval_questions("test", N)` (describe: the same set of objects and positions, in any order) and
KL(full || compact) of the next-token distribution at the first answer position, averaged over the
questions. With --kept-picture, also a picture per operator of the visual tokens it keeps on a few test
images (at the keep nearest 1/3):

    python benchmarks/fidelity.py [--ops pool,floor,...] [--keeps 1.0,0.5,...] [--per-family 20] [--encoder]
    python benchmarks/fidelity.py --quick
    python benchmarks/fidelity.py --mass-repeat --ops diversity,random --keeps 1.0,0.33 --per-family 40
    python benchmarks/fidelity.py --proportional --encoder --per-family 40   # ~7 min on one core

--proportional runs every setting twice, as is and with size-aware attention (`Compaction(proportional=True)`:
each kept token adds log(tokens it stands for) to its key's attention logits; rows `op@where+p`), in either
mode. Every row records the KV bytes allocated for the first question and the decode tokens/s of its answers
(median over those longer than one token); a separate measurement times 32 forced greedy decode tokens
(`generate_step`, EOS ignored) on the first question for each operator at keep 1/3, the two variants back to
back, 15 repeats, and reports the median of the paired ratios (targets: KV bytes within 1% of the run without
it, decode tokens/s within 3%).

--mass-repeat is a diagnostic, not a compaction mode: every kept token is repeated once per original token
it stands for (its nearest-kept group), so it carries its group's attention mass (what ToMe's proportional
attention does with a log(size) logit bias), at the full KV cost. It tells whether a loss comes from what
the operator drops or from the model reading attention mass (e.g. counting tokens rather than objects).

Label-free mode (any checkpoint, any images): KL at the first generated position and greedy-answer
agreement (compact vs full) per operator and keep:

    python benchmarks/fidelity.py --model PATH_OR_REPO --images DIR [--questions FILE] [--max-tokens 8]

Prints a table, writes JSON to benchmarks/results/fidelity.json (label-free: fidelity_labelfree.json; with
--proportional: fidelity_prop.json, fidelity_labelfree_prop.json) and, when matplotlib is importable, a plot
(accuracy vs keep, one panel per family) beside it (fidelity.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_compact  # noqa: F401,E402  (preloads OpenBLAS before mlx.core)
from mlx_compact.compaction import ENCODER_METHODS, Compaction  # noqa: E402
from mlx_compact.generate import generate_step, make_cache, prefill, prepare, run_stats  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OPS = ("pool", "floor", "diversity", "saliency", "merge", "random")
DEFAULT_KEEPS = (1.0, 0.5, 0.33, 0.25, 0.1)
QUICK_OPS = ("diversity", "random")
QUICK_KEEPS = (1.0, 0.33)
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def settings(ops, keeps, encoder: bool, proportional: bool = False) -> list:
    """[(label, where, method, keep, Compaction or None)]; keep 1.0 is run through the operator too.
    With `proportional`, each setting twice: as is, then with size-aware attention (label `op@where+p`)."""
    out = []
    for where in ("post", "encoder") if encoder else ("post",):
        for op in ops:
            if where == "encoder" and op not in ENCODER_METHODS:
                continue
            for k in keeps:
                for p in (False, True) if proportional else (False,):
                    out.append(
                        (
                            f"{op}@{where}" + ("+p" if p else ""),
                            where,
                            op,
                            float(k),
                            Compaction(op, keep=float(k), where=where, proportional=p),
                        )
                    )
    return out


def run_one(model, processor, prompt: str, images, compaction, max_tokens: int):
    """Prefill + greedy decode. Returns (log-probs at the first generated position [V] float64, tokens,
    the run stats of `generate`)."""
    prep = prepare(model, processor, prompt, images, compaction=compaction)
    cache = make_cache(model)
    t_prefill = time.perf_counter()
    logits = prefill(model, prep, cache).astype(mx.float32)  # [1, V]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [1, V]
    mx.eval(logp)
    t_first = time.perf_counter()
    first = np.array(logp[0]).astype(np.float64)  # [V]
    eos = set(processor.eos_token_ids)
    embed = model.language_model.model.embed_tokens
    next_pos = int(prep.positions.max().item()) + 1
    token = mx.argmax(logits, axis=-1)  # [1]
    tokens = []
    while True:
        t = int(token.item())
        if t in eos:
            break
        tokens.append(t)
        if len(tokens) >= max_tokens:
            break
        pos = mx.full((3, 1, 1), next_pos, dtype=mx.int32)
        out = model.language_model(embed(token.reshape(1, 1)), pos, cache=cache)  # [1, 1, V]
        token = mx.argmax(out[:, -1, :], axis=-1)
        next_pos += 1
    return first, tokens, run_stats(prep, cache, len(tokens), t_prefill, t_first, time.perf_counter())


def cost(stats: list) -> dict:
    """KV bytes allocated for the first question; median decode tokens/s of the answers longer than a token."""
    tps = [s["decode_tokens_per_s"] for s in stats if s["generation_tokens"] > 1]
    return dict(kv_bytes=stats[0]["kv_bytes_allocated"], decode_tokens_per_s=float(np.median(tps)) if tps else None)


def decode_speed(model, processor, prompt: str, image, plain, prop, n_tokens: int = 32, repeats: int = 15):
    """Decode tokens/s of two compactions on one question: `n_tokens` greedy tokens forced (EOS ignored)
    through `generate_step`, the two run back to back (in turn first) `repeats` times. Returns (median
    tokens/s of each, median of the paired ratios prop / plain)."""
    greedy = lambda logits: mx.argmax(logits, axis=-1)  # noqa: E731
    tps = {False: [], True: []}
    for r in range(repeats):
        for c in (plain, prop) if r % 2 == 0 else (prop, plain):
            steps = generate_step(
                model, prepare(model, processor, prompt, [image], compaction=c), make_cache(model), greedy
            )
            next(steps)  # prefill and the first token
            t0 = time.perf_counter()
            for _ in range(n_tokens - 1):
                next(steps)
            tps[c.proportional].append((n_tokens - 1) / (time.perf_counter() - t0))
    ratio = float(np.median(np.array(tps[True]) / np.array(tps[False])))
    return float(np.median(tps[False])), float(np.median(tps[True])), ratio


def proportional_cost(
    model, processor, prompt: str, image, rows: list, ops, keeps, encoder, keep=0.33, log=print
) -> dict:
    """Each +p row's KV bytes and decode tokens/s against its plain twin, and `decode_speed` of both at `keep`
    (else the smallest keep) for every operator."""
    plain = {(r["where"], r["method"], r["keep"]): r for r in rows if not r.get("prop", True)}
    pairs = []
    for r in rows:
        twin = plain.get((r["where"], r["method"], r["keep"])) if r.get("prop") else None
        if twin is not None:
            a, b = twin["decode_tokens_per_s"], r["decode_tokens_per_s"]
            pairs.append(
                dict(
                    setting=r["setting"],
                    keep=r["keep"],
                    kv_bytes=twin["kv_bytes"],
                    kv_bytes_p=r["kv_bytes"],
                    kv_ratio=r["kv_bytes"] / twin["kv_bytes"],
                    tps_ratio=b / a if a and b else None,
                )
            )
    k = keep if keep in keeps else min(keeps)
    s = settings(ops, (k,), encoder, proportional=True)
    speed = []
    for (label, _, _, _, c), (_, _, _, _, cp) in zip(s[::2], s[1::2]):
        a, b, ratio = decode_speed(model, processor, prompt, image, c, cp)
        speed.append(dict(setting=label, keep=k, tok_s=a, tok_s_p=b, ratio=ratio))
        log(f"  {label:20s} keep {k:<5} decode {a:.1f} tok/s, +p {b:.1f} tok/s (paired ratio {ratio:.3f})")
    return dict(
        pairs=pairs,
        decode=speed,
        kv_ratio_max=max((p["kv_ratio"] for p in pairs), default=None),
        decode_ratio_median=float(np.median([d["ratio"] for d in speed])) if speed else None,
    )


def print_cost(pc: dict) -> None:
    print("\nproportional vs plain: KV bytes allocated (first question), decode tokens/s of the answers:")
    print(_table(pc["pairs"], ["setting", "keep", "kv_bytes", "kv_bytes_p", "kv_ratio", "tps_ratio"]))
    print("\ndecode tokens/s, 32 forced greedy tokens, the two back to back, 15 repeats (ratio: median of pairs):")
    print(_table(pc["decode"], ["setting", "keep", "tok_s", "tok_s_p", "ratio"]))
    print(
        f"KV bytes ratio max {_fmt(pc['kv_ratio_max'])} (target <= 1.01); decode tok/s ratio median "
        f"{_fmt(pc['decode_ratio_median'])} (target >= 0.97)"
    )


@contextlib.contextmanager
def mass_repeat():
    """Diagnostic (post-merger only): each kept token repeated once per original token of its nearest-kept
    group, so it keeps its group's attention mass; the sequence is as long as the uncompacted one."""
    from mlx_compact.compaction import compose, ops

    plan = compose.plan

    def repeated(tokens, c):
        sel = plan(tokens, c)
        if c.is_identity:
            return sel
        groups = ops.nearest_kept(tokens, ops.Selection(sel.keep))
        sizes = np.bincount(groups.assign[groups.assign >= 0], minlength=len(groups.keep))  # [K]
        return ops.Selection(np.repeat(groups.keep, np.maximum(sizes, 1)))

    compose.plan = repeated
    try:
        yield
    finally:
        compose.plan = plan


def kl(p_logp: np.ndarray, q_logp: np.ndarray) -> float:
    """KL(p || q) from log-probabilities (nats); clamped at 0 against rounding."""
    p = np.exp(p_logp)
    return max(0.0, float(np.sum(p * (p_logp - q_logp))))


def _table(rows: list, cols: list) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# ----------------------------------------------------------------------------- default (labelled) mode


def world_module(name: str = "grid"):
    """The synthetic world of the labelled mode: "free" (training/scenes.py) or "grid" (grid_scenes.py)."""
    if name == "grid":
        from training import grid_scenes as world
    else:
        from training import scenes as world
    return world


def _right(world, family: str, answer: str, got: str) -> bool:
    score = getattr(world, "score", None)
    return bool(score(family, answer, got)) if score else got.strip() == answer


def _budget(family: str, max_tokens: int) -> int:
    return max(max_tokens, LONG_ANSWER) if family == "describe" else max_tokens


LONG_ANSWER = 120  # tokens for a describe answer (9 objects)


def labelled(
    model,
    processor,
    questions,
    ops=DEFAULT_OPS,
    keeps=DEFAULT_KEEPS,
    encoder=False,
    max_tokens: int = 4,
    log=print,
    proportional=False,
    world="grid",
) -> dict:
    """Accuracy per family and mean KL(full || compact) at the answer position, per setting."""
    world = world_module(world) if isinstance(world, str) else world
    FAMILIES = world.FAMILIES

    full = []
    for fam, image, q, _ in questions:
        full.append(run_one(model, processor, q, [image], None, _budget(fam, max_tokens)))
    base_right = {f: [] for f in FAMILIES}
    for (fam, _, _, a), (_, toks, _) in zip(questions, full):
        base_right[fam].append(_right(world, fam, a, processor.decode(toks)))
    rows = [
        dict(
            setting="full",
            method="none",
            where="-",
            keep=1.0,
            accuracy={f: float(np.mean(v)) for f, v in base_right.items() if v},
            mean_accuracy=float(np.mean([x for v in base_right.values() for x in v])),
            kl=0.0,
            kl_max=0.0,
            agreement=1.0,
            seconds=None,
            **cost([s for _, _, s in full]),
        )
    ]
    for label, where, op, k, c in settings(ops, keeps, encoder, proportional):
        t0 = time.perf_counter()
        right = {f: [] for f in FAMILIES}
        kls, agree, stats = [], [], []
        for (fam, image, q, a), (flogp, ftoks, _) in zip(questions, full):
            logp, toks, st = run_one(model, processor, q, [image], c, _budget(fam, max_tokens))
            right[fam].append(_right(world, fam, a, processor.decode(toks)))
            kls.append(kl(flogp, logp))
            agree.append(toks == ftoks)
            stats.append(st)
        rows.append(
            dict(
                setting=label,
                method=op,
                where=where,
                keep=k,
                prop=c.proportional,
                accuracy={f: float(np.mean(v)) for f, v in right.items() if v},
                mean_accuracy=float(np.mean([x for v in right.values() for x in v])),
                kl=float(np.mean(kls)),
                kl_max=float(np.max(kls)),
                agreement=float(np.mean(agree)),
                seconds=time.perf_counter() - t0,
                **cost(stats),
            )
        )
        log(f"  {label:20s} keep {k:<5} acc {rows[-1]['mean_accuracy']:.3f}  KL {rows[-1]['kl']:.4f}")
    return dict(mode="labelled", n_questions=len(questions), families=list(FAMILIES), rows=rows)


def print_labelled(res: dict) -> None:
    fams = res["families"]
    flat = []
    for r in res["rows"]:
        d = dict(setting=r["setting"], keep=r["keep"])
        d.update({f: r["accuracy"].get(f) for f in fams})
        d.update(mean=r["mean_accuracy"], KL=r["kl"], agree=r["agreement"], kv_bytes=r.get("kv_bytes"))
        flat.append(d)
    print(_table(flat, ["setting", "keep", *fams, "mean", "KL", "agree", "kv_bytes"]))


BASELINES = ("pool", "random")
TARGETS = {"mean": 0.97, "where": 0.95, "read": 0.95}  # share of the full model's accuracy kept at keep 1/3
PROP_TARGETS = {"mean": 0.97, "count": 0.95, "where": 0.95, "read": 0.95}  # the same, with proportional attention


def retention(res: dict, keep: float = 0.33) -> dict:
    """Share of the full model's accuracy each setting keeps at `keep` (mean over families, and per
    family), the best prompt-free operator (baselines excluded) and whether it meets TARGETS; when there are
    proportional rows, the best of those too (`best_prop`) against PROP_TARGETS (`met_prop`)."""
    full = res["rows"][0]
    fams = res["families"]

    def share(got, base):
        return None if got is None or not base else got / base

    rows = []
    for r in res["rows"][1:]:
        if abs(r["keep"] - keep) > 1e-9:
            continue
        per = {f: share(r["accuracy"].get(f), full["accuracy"].get(f)) for f in fams}
        rows.append(
            dict(
                setting=r["setting"],
                method=r["method"],
                prop=r.get("prop", False),
                mean=share(r["mean_accuracy"], full["mean_accuracy"]),
                **per,
            )
        )

    def best_of(prop: bool, targets: dict):
        candidates = [r for r in rows if r["method"] not in BASELINES and r["prop"] == prop and r["mean"] is not None]
        best = max(candidates, key=lambda r: r["mean"], default=None)
        return best, None if best is None else {k: best.get(k) is not None and best[k] >= t for k, t in targets.items()}

    best, met = best_of(False, TARGETS)
    out = dict(keep=keep, rows=rows, best=best, targets=TARGETS, met=met)
    if any(r["prop"] for r in rows):
        out["best_prop"], out["met_prop"] = best_of(True, PROP_TARGETS)
        out["prop_targets"] = PROP_TARGETS
    return out


def print_retention(ret: dict) -> None:
    if not ret["rows"]:
        return
    print(f"\nshare of the full model's accuracy kept at keep {ret['keep']}:")
    print(
        _table(
            ret["rows"],
            ["setting", "mean", *[k for k in ret["rows"][0] if k not in ("setting", "method", "prop", "mean")]],
        )
    )
    for what, b, met, targets in (
        ("", ret["best"], ret["met"], ret["targets"]),
        (" with proportional", ret.get("best_prop"), ret.get("met_prop"), ret.get("prop_targets")),
    ):
        if b is not None:
            print(
                f"best prompt-free operator{what}: {b['setting']}: "
                + ", ".join(
                    f"{k} {_fmt(b.get(k))} (target {t}: {'met' if met[k] else 'MISSED'})" for k, t in targets.items()
                )
            )


def plot(res: dict, path: Path) -> bool:
    """Accuracy vs keep, one line per operator/where, one panel per family (plus the mean)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: skipping the plot")
        return False
    fams = list(res["families"]) + ["mean"]
    full = res["rows"][0]
    fig, axes = plt.subplots(1, len(fams), figsize=(3.2 * len(fams), 3.2), sharey=True)
    series = {}
    for r in res["rows"][1:]:
        series.setdefault(r["setting"], []).append(r)
    for ax, fam in zip(np.atleast_1d(axes), fams):
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: r["keep"])
            ys = [r["mean_accuracy"] if fam == "mean" else r["accuracy"].get(fam) for r in rs]
            ax.plot(
                [r["keep"] for r in rs],
                ys,
                marker="x" if rs[0].get("prop") else "o",
                label=label,
                linestyle="--" if rs[0]["where"] == "encoder" else "-",
            )
        base = full["mean_accuracy"] if fam == "mean" else full["accuracy"].get(fam)
        if base is not None:
            ax.axhline(base, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(fam)
        ax.set_xlabel("keep")
        ax.set_ylim(-0.05, 1.05)
    np.atleast_1d(axes)[0].set_ylabel("accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def kept_tokens(model, processor, image, compaction, prompt: str = "Describe this image.") -> tuple:
    """(merged grid rows, cols, indices in raster order of the visual tokens the compaction keeps)."""
    prep = prepare(model, processor, prompt, [image], compaction=compaction)
    full = prepare(model, processor, prompt, [image], compaction=None)
    image_rows = np.flatnonzero(np.array(full.input_ids) == processor.image_token_id)  # [N]
    rows_kept = np.arange(len(prep.input_ids)) if prep.kept is None else np.asarray(prep.kept)
    kept = np.flatnonzero(np.isin(image_rows, rows_kept))  # [K]
    t, h, w = (int(v) for v in processor(processor.build_prompt(prompt, 1), [image])["grid_thw"][0])
    merge = processor.image.merge_size
    return h // merge, w // merge, kept


def kept_picture(model, processor, images, ops, keep: float, encoder: bool, path: Path) -> None:
    """One row per image, one column per operator (and where): dropped tokens greyed out, kept ones as is."""
    from PIL import Image, ImageDraw

    cols = [("full", None)]
    for where in ("post", "encoder") if encoder else ("post",):
        for op in ops:
            if where == "encoder" and op not in ENCODER_METHODS:
                continue
            cols.append((f"{op}@{where}", Compaction(op, keep=keep, where=where)))
    cell = 200
    sheet = Image.new("RGB", (cell * len(cols), 18 + cell * len(images)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for j, (label, c) in enumerate(cols):
        d.text((j * cell + 4, 3), label if c is None else f"{label} {keep}", fill=(0, 0, 0))
    for i, image in enumerate(images):
        scale = min(cell / image.width, cell / image.height) * 0.95
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        for j, (_, c) in enumerate(cols):
            rows, ncols, kept = kept_tokens(model, processor, image, c)
            shown = np.asarray(image.convert("RGB").resize(size)).astype(np.float32)  # [H, W, 3]
            mask = np.zeros((rows, ncols), bool)
            mask.flat[kept] = True
            ys = np.minimum((np.arange(size[1]) * rows) // size[1], rows - 1)
            xs = np.minimum((np.arange(size[0]) * ncols) // size[0], ncols - 1)
            dropped = ~mask[ys][:, xs]  # [H, W]
            shown[dropped] = 0.25 * shown[dropped] + 0.75 * 128
            sheet.paste(Image.fromarray(shown.astype(np.uint8)), (j * cell, 18 + i * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


# ----------------------------------------------------------------------------- label-free mode


def label_free(
    model,
    processor,
    images,
    questions=("Describe this image.",),
    ops=DEFAULT_OPS,
    keeps=DEFAULT_KEEPS,
    encoder=False,
    max_tokens: int = 8,
    log=print,
    proportional=False,
) -> dict:
    """KL(full || compact) at the first generated position and greedy agreement, per setting.

    images: [(name, PIL image)]; questions: prompts, each asked about every image.
    """
    pairs = [(name, im, q) for name, im in images for q in questions]
    full = [run_one(model, processor, q, [im], None, max_tokens) for _, im, q in pairs]
    rows = []
    for label, where, op, k, c in settings(ops, keeps, encoder, proportional):
        t0 = time.perf_counter()
        kls, agree, token_agree, stats = [], [], [], []
        for (_, im, q), (flogp, ftoks, _) in zip(pairs, full):
            logp, toks, st = run_one(model, processor, q, [im], c, max_tokens)
            stats.append(st)
            kls.append(kl(flogp, logp))
            agree.append(toks == ftoks)
            n = max(len(ftoks), len(toks), 1)
            token_agree.append(sum(a == b for a, b in zip(ftoks, toks)) / n)
        rows.append(
            dict(
                setting=label,
                method=op,
                where=where,
                keep=k,
                prop=c.proportional,
                kl=float(np.mean(kls)),
                kl_max=float(np.max(kls)),
                agreement=float(np.mean(agree)),
                token_agreement=float(np.mean(token_agree)),
                seconds=time.perf_counter() - t0,
                **cost(stats),
            )
        )
        log(f"  {label:20s} keep {k:<5} KL {rows[-1]['kl']:.4f}  agree {rows[-1]['agreement']:.3f}")
    return dict(
        mode="label_free",
        n_images=len(images),
        questions=list(questions),
        n_pairs=len(pairs),
        max_tokens=max_tokens,
        full_answers=[processor.decode(t) for _, t, _ in full],
        rows=rows,
    )


def load_images(folder) -> list:
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise SystemExit(f"no .png/.jpg images in {folder}")
    return [(p.name, Image.open(p).convert("RGB")) for p in paths]


def load_questions(path) -> list:
    if path is None:
        return ["Describe this image."]
    qs = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not qs:
        raise SystemExit(f"no questions in {path}")
    return qs


def _floats(s: str) -> tuple:
    return tuple(float(x) for x in s.split(",") if x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint (label-free mode with --images; default mode: the shipped model)")
    ap.add_argument("--images", help="a folder of .png/.jpg images: label-free mode")
    ap.add_argument("--questions", help="label-free mode: a text file, one question per line")
    ap.add_argument("--ops", help=f"comma-separated operators (default {','.join(DEFAULT_OPS)})")
    ap.add_argument("--keeps", help="comma-separated keep ratios (default 1.0,0.5,0.33,0.25,0.1)")
    ap.add_argument("--per-family", type=int, default=20, help="default mode: questions per family")
    ap.add_argument("--encoder", action="store_true", help="also in-encoder (floor, diversity, saliency, random)")
    ap.add_argument("--max-tokens", type=int, default=None, help="greedy answer length (4 labelled, 8 label-free)")
    ap.add_argument("--quick", action="store_true", help="2 operators, keeps 1.0 and 0.33, 4 per family")
    ap.add_argument(
        "--mass-repeat",
        action="store_true",
        help="diagnostic (default mode, post-merger): repeat each kept token by the size of its group",
    )
    ap.add_argument(
        "--proportional",
        action="store_true",
        help="run every setting twice: as is and with size-aware (proportional) attention",
    )
    ap.add_argument(
        "--world",
        choices=("free", "grid"),
        default="grid",
        help="default mode: the synthetic world (default grid: the shipped model's; free: the second edition's)",
    )
    ap.add_argument(
        "--kept-picture",
        type=int,
        default=0,
        metavar="N",
        help="default mode: draw what each operator keeps (keep nearest 1/3) on the first N test images",
    )
    ap.add_argument("--out", help="JSON output path")
    ap.add_argument("--plot", help="PNG output path (default mode)")
    args = ap.parse_args(argv)
    if args.mass_repeat and (args.encoder or args.images or args.proportional):
        ap.error(
            "--mass-repeat is a post-merger diagnostic of the default mode: drop --encoder / --images / --proportional"
        )

    ops = tuple(args.ops.split(",")) if args.ops else (QUICK_OPS if args.quick else DEFAULT_OPS)
    keeps = _floats(args.keeps) if args.keeps else (QUICK_KEEPS if args.quick else DEFAULT_KEEPS)
    n = 4 if args.quick else args.per_family

    model, processor = mlx_compact.load(args.model)
    meta = dict(
        model=args.model or "default (qwen3-vl-tiny)",
        ops=list(ops),
        keeps=list(keeps),
        encoder=args.encoder,
        proportional=args.proportional,
        backend=str(mx.default_device()),
    )
    suffix = "_prop" if args.proportional else ""
    t0 = time.perf_counter()
    if args.images:
        images, questions = load_images(args.images), load_questions(args.questions)
        res = label_free(
            model,
            processor,
            images,
            questions,
            ops,
            keeps,
            args.encoder,
            args.max_tokens or 8,
            proportional=args.proportional,
        )
        print(_table(res["rows"], ["setting", "keep", "kl", "kl_max", "agreement", "token_agreement", "kv_bytes"]))
        first = (questions[0], images[0][1])
        out = Path(args.out) if args.out else RESULTS / f"fidelity_labelfree{suffix}.json"
    else:
        world = world_module(args.world)
        qs = world.eval_questions("test", n)
        with mass_repeat() if args.mass_repeat else contextlib.nullcontext():
            res = labelled(
                model,
                processor,
                qs,
                ops,
                keeps,
                args.encoder,
                args.max_tokens or 4,
                proportional=args.proportional,
                world=world,
            )
        res["world"] = args.world
        res["per_family"] = n
        res["mass_repeat"] = args.mass_repeat
        if args.mass_repeat:
            print("DIAGNOSTIC: kept tokens repeated by group size (full KV cost; not a compaction mode)")
        print_labelled(res)
        res["retention"] = retention(res)
        print_retention(res["retention"])
        if args.mass_repeat:
            print("(a diagnostic: the targets are for real compaction, whose KV is short; this one's is full length)")
        first = (qs[0][2], qs[0][1])
        suffix = ("_free" if args.world == "free" else "") + suffix
        name = "fidelity_mass.json" if args.mass_repeat else f"fidelity{suffix}.json"
        out = Path(args.out) if args.out else RESULTS / name
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        if plot(res, png):
            print(f"wrote {png}")
        if args.kept_picture:
            k = min(keeps, key=lambda v: abs(v - 0.33))
            pic = out.with_name(out.stem + "_kept.png")
            kept_picture(model, processor, [im for _, im, _, _ in qs[: args.kept_picture]], ops, k, args.encoder, pic)
            print(f"wrote {pic}")
    if args.proportional:
        res["proportional_cost"] = proportional_cost(model, processor, *first, res["rows"], ops, keeps, args.encoder)
        print_cost(res["proportional_cost"])
    res.update(meta, seconds=time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
