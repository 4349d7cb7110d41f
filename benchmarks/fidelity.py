"""Fidelity of compact visual tokens: task accuracy and KL(full || compact) at the answer position.

Default mode (the shipped tiny Qwen3-VL on the synthetic test split of `training/scenes.py`): for every
operator and keep ratio, post-merger (and in-encoder with --encoder), accuracy per question family on
`eval_questions("test", N)` and KL(full || compact) of the next-token distribution at the first answer
position, averaged over the questions:

    python benchmarks/fidelity.py [--ops pool,floor,...] [--keeps 1.0,0.5,...] [--per-family 20] [--encoder]
    python benchmarks/fidelity.py --quick
    python benchmarks/fidelity.py --mass-repeat --ops diversity,random --keeps 1.0,0.33 --per-family 40

--mass-repeat is a diagnostic, not a compaction mode: every kept token is repeated once per original token
it stands for (its nearest-kept group), so it carries its group's attention mass (what ToMe's proportional
attention does with a log(size) logit bias), at the full KV cost. It tells whether a loss comes from what
the operator drops or from the model reading attention mass (e.g. counting tokens rather than objects).

Label-free mode (any checkpoint, any images): KL at the first generated position and greedy-answer
agreement (compact vs full) per operator and keep:

    python benchmarks/fidelity.py --model PATH_OR_REPO --images DIR [--questions FILE] [--max-tokens 8]

Prints a table, writes JSON to benchmarks/results/fidelity.json (label-free: fidelity_labelfree.json) and,
when matplotlib is importable, a plot (accuracy vs keep, one panel per family) to benchmarks/results/fidelity.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_compact  # noqa: F401,E402  (preloads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_compact.compaction import ENCODER_METHODS, Compaction  # noqa: E402
from mlx_compact.generate import make_cache, prefill, prepare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OPS = ("pool", "floor", "diversity", "saliency", "merge", "random")
DEFAULT_KEEPS = (1.0, 0.5, 0.33, 0.25, 0.1)
QUICK_OPS = ("diversity", "random")
QUICK_KEEPS = (1.0, 0.33)
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def settings(ops, keeps, encoder: bool) -> list:
    """[(label, where, method, keep, Compaction or None)]; keep 1.0 is run through the operator too."""
    out = []
    for where in ("post", "encoder") if encoder else ("post",):
        for op in ops:
            if where == "encoder" and op not in ENCODER_METHODS:
                continue
            for k in keeps:
                out.append((f"{op}@{where}", where, op, float(k), Compaction(op, keep=float(k), where=where)))
    return out


def run_one(model, processor, prompt: str, images, compaction, max_tokens: int):
    """Prefill + greedy decode. Returns (log-probs at the first generated position [V] float64, tokens)."""
    prep = prepare(model, processor, prompt, images, compaction=compaction)
    cache = make_cache(model)
    logits = prefill(model, prep, cache).astype(mx.float32)  # [1, V]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [1, V]
    mx.eval(logp)
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
    return first, tokens


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


def labelled(model, processor, questions, ops=DEFAULT_OPS, keeps=DEFAULT_KEEPS, encoder=False,
             max_tokens: int = 4, log=print) -> dict:
    """Accuracy per family and mean KL(full || compact) at the answer position, per setting."""
    from training.scenes import FAMILIES

    full = []
    for _, image, q, _ in questions:
        full.append(run_one(model, processor, q, [image], None, max_tokens))
    base_right = {f: [] for f in FAMILIES}
    for (fam, _, _, a), (_, toks) in zip(questions, full):
        base_right[fam].append(processor.decode(toks).strip() == a)
    rows = [dict(setting="full", method="none", where="-", keep=1.0,
                 accuracy={f: float(np.mean(v)) for f, v in base_right.items() if v},
                 mean_accuracy=float(np.mean([x for v in base_right.values() for x in v])), kl=0.0, kl_max=0.0,
                 agreement=1.0, seconds=None)]
    for label, where, op, k, c in settings(ops, keeps, encoder):
        t0 = time.perf_counter()
        right = {f: [] for f in FAMILIES}
        kls, agree = [], []
        for (fam, image, q, a), (flogp, ftoks) in zip(questions, full):
            logp, toks = run_one(model, processor, q, [image], c, max_tokens)
            right[fam].append(processor.decode(toks).strip() == a)
            kls.append(kl(flogp, logp))
            agree.append(toks == ftoks)
        rows.append(dict(setting=label, method=op, where=where, keep=k,
                         accuracy={f: float(np.mean(v)) for f, v in right.items() if v},
                         mean_accuracy=float(np.mean([x for v in right.values() for x in v])),
                         kl=float(np.mean(kls)), kl_max=float(np.max(kls)), agreement=float(np.mean(agree)),
                         seconds=time.perf_counter() - t0))
        log(f"  {label:20s} keep {k:<5} acc {rows[-1]['mean_accuracy']:.3f}  KL {rows[-1]['kl']:.4f}")
    return dict(mode="labelled", n_questions=len(questions), families=list(FAMILIES), rows=rows)


def print_labelled(res: dict) -> None:
    fams = res["families"]
    flat = []
    for r in res["rows"]:
        d = dict(setting=r["setting"], keep=r["keep"])
        d.update({f: r["accuracy"].get(f) for f in fams})
        d.update(mean=r["mean_accuracy"], KL=r["kl"], agree=r["agreement"])
        flat.append(d)
    print(_table(flat, ["setting", "keep", *fams, "mean", "KL", "agree"]))


BASELINES = ("pool", "random")
TARGETS = {"mean": 0.97, "where": 0.95, "read": 0.95}  # share of the full model's accuracy kept at keep 1/3


def retention(res: dict, keep: float = 0.33) -> dict:
    """Share of the full model's accuracy each setting keeps at `keep` (mean over families, and per
    family), the best prompt-free operator (baselines excluded) and whether it meets TARGETS."""
    full = res["rows"][0]
    fams = res["families"]

    def share(got, base):
        return None if got is None or not base else got / base

    rows = []
    for r in res["rows"][1:]:
        if abs(r["keep"] - keep) > 1e-9:
            continue
        per = {f: share(r["accuracy"].get(f), full["accuracy"].get(f)) for f in fams}
        rows.append(dict(setting=r["setting"], method=r["method"], mean=share(r["mean_accuracy"], full["mean_accuracy"]),
                         **per))
    candidates = [r for r in rows if r["method"] not in BASELINES and r["mean"] is not None]
    best = max(candidates, key=lambda r: r["mean"], default=None)
    met = None if best is None else {k: best.get(k) is not None and best[k] >= t for k, t in TARGETS.items()}
    return dict(keep=keep, rows=rows, best=best, targets=TARGETS, met=met)


def print_retention(ret: dict) -> None:
    if not ret["rows"]:
        return
    print(f"\nshare of the full model's accuracy kept at keep {ret['keep']}:")
    print(_table(ret["rows"], ["setting", "mean", *[k for k in ret["rows"][0] if k not in ("setting", "method", "mean")]]))
    if ret["best"] is not None:
        b = ret["best"]
        print(f"best prompt-free operator: {b['setting']}: "
              + ", ".join(f"{k} {_fmt(b.get(k))} (target {t}: {'met' if ret['met'][k] else 'MISSED'})"
                          for k, t in ret["targets"].items()))


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
            ax.plot([r["keep"] for r in rs], ys, marker="o", label=label,
                    linestyle="--" if label.endswith("@encoder") else "-")
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


# ----------------------------------------------------------------------------- label-free mode


def label_free(model, processor, images, questions=("Describe this image.",), ops=DEFAULT_OPS,
               keeps=DEFAULT_KEEPS, encoder=False, max_tokens: int = 8, log=print) -> dict:
    """KL(full || compact) at the first generated position and greedy agreement, per setting.

    images: [(name, PIL image)]; questions: prompts, each asked about every image.
    """
    pairs = [(name, im, q) for name, im in images for q in questions]
    full = [run_one(model, processor, q, [im], None, max_tokens) for _, im, q in pairs]
    rows = []
    for label, where, op, k, c in settings(ops, keeps, encoder):
        t0 = time.perf_counter()
        kls, agree, token_agree = [], [], []
        for (_, im, q), (flogp, ftoks) in zip(pairs, full):
            logp, toks = run_one(model, processor, q, [im], c, max_tokens)
            kls.append(kl(flogp, logp))
            agree.append(toks == ftoks)
            n = max(len(ftoks), len(toks), 1)
            token_agree.append(sum(a == b for a, b in zip(ftoks, toks)) / n)
        rows.append(dict(setting=label, method=op, where=where, keep=k, kl=float(np.mean(kls)),
                         kl_max=float(np.max(kls)), agreement=float(np.mean(agree)),
                         token_agreement=float(np.mean(token_agree)), seconds=time.perf_counter() - t0))
        log(f"  {label:20s} keep {k:<5} KL {rows[-1]['kl']:.4f}  agree {rows[-1]['agreement']:.3f}")
    return dict(mode="label_free", n_images=len(images), questions=list(questions), n_pairs=len(pairs),
                max_tokens=max_tokens, full_answers=[processor.decode(t) for _, t in full], rows=rows)


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
    ap.add_argument("--mass-repeat", action="store_true",
                    help="diagnostic (default mode, post-merger): repeat each kept token by the size of its group")
    ap.add_argument("--out", help="JSON output path")
    ap.add_argument("--plot", help="PNG output path (default mode)")
    args = ap.parse_args(argv)
    if args.mass_repeat and (args.encoder or args.images):
        ap.error("--mass-repeat is a post-merger diagnostic of the default mode: drop --encoder / --images")

    ops = tuple(args.ops.split(",")) if args.ops else (QUICK_OPS if args.quick else DEFAULT_OPS)
    keeps = _floats(args.keeps) if args.keeps else (QUICK_KEEPS if args.quick else DEFAULT_KEEPS)
    n = 4 if args.quick else args.per_family

    model, processor = mlx_compact.load(args.model)
    meta = dict(model=args.model or "default (qwen3-vl-tiny)", ops=list(ops), keeps=list(keeps),
                encoder=args.encoder, backend=str(mx.default_device()))
    t0 = time.perf_counter()
    if args.images:
        res = label_free(model, processor, load_images(args.images), load_questions(args.questions), ops, keeps,
                         args.encoder, args.max_tokens or 8)
        print(_table(res["rows"], ["setting", "keep", "kl", "kl_max", "agreement", "token_agreement"]))
        out = Path(args.out) if args.out else RESULTS / "fidelity_labelfree.json"
    else:
        from training.scenes import eval_questions

        with mass_repeat() if args.mass_repeat else contextlib.nullcontext():
            res = labelled(model, processor, eval_questions("test", n), ops, keeps, args.encoder,
                           args.max_tokens or 4)
        res["per_family"] = n
        res["mass_repeat"] = args.mass_repeat
        if args.mass_repeat:
            print("DIAGNOSTIC: kept tokens repeated by group size (full KV cost; not a compaction mode)")
        print_labelled(res)
        res["retention"] = retention(res)
        print_retention(res["retention"])
        if args.mass_repeat:
            print("(a diagnostic: the targets are for real compaction, whose KV is short; this one's is full length)")
        out = Path(args.out) if args.out else RESULTS / ("fidelity_mass.json" if args.mass_repeat else "fidelity.json")
        png = Path(args.plot) if args.plot else out.with_suffix(".png")
        if plot(res, png):
            print(f"wrote {png}")
    res.update(meta, seconds=time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
