"""Test-split accuracy per question family: transformers (torch) and mlx_compact (loader + greedy generate).

    python training/evaluate.py --hf RUN/hf --mlx MLX_DIR [--per-family N] [--convert DTYPE]

With --convert, first converts the Hugging Face checkpoint into MLX_DIR with `mlx_compact.convert`.
transformers' figure is teacher-forced exact match of the whole answer (for describe: in the reference
order); ours is greedy generation scored by `scenes.score` (describe: the same set of objects and
positions in any order; also its item F1, the partial score). Ours is also given on the questions whose
phrasing is held out of training. Also prints the largest logit difference between the two
implementations on a few test prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import mlx_compact  # noqa: F401,E402  (before mlx.core)
from training import scenes  # noqa: E402


def torch_accuracy(hf: Path, questions) -> dict:
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from mlx_compact.processor import Processor
    from training.train import Batcher, evaluate, val_batches

    torch.set_num_threads(1)
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32)
    return evaluate(model, val_batches(Batcher(Processor.from_pretrained(hf)), questions))


def mlx_accuracy(model, processor, questions) -> tuple[dict, dict, float, list]:
    """(accuracy per family, the same on held-out phrasings, describe's mean item F1, mistakes)."""
    from mlx_compact.generate import generate

    fams = scenes.FAMILIES
    right, total = {f: 0 for f in fams}, {f: 0 for f in fams}
    hright, htotal = {f: 0 for f in fams}, {f: 0 for f in fams}
    f1, wrong = [], []
    for family, image, q, a, held in questions:
        got = generate(model, processor, q, [image], max_tokens=120 if family == "describe" else 6).text.strip()
        ok = scenes.score(family, a, got)
        total[family] += 1
        right[family] += ok
        htotal[family] += held
        hright[family] += held and ok
        if family == "describe":
            f1.append(scenes.describe_f1(a, got))
        if not ok:
            wrong.append((family, q, a, got))
    acc = {f: right[f] / max(total[f], 1) for f in fams}
    held_acc = {f: hright[f] / max(htotal[f], 1) for f in fams}
    return acc, held_acc, float(np.mean(f1)) if f1 else None, wrong


def logit_gap(hf: Path, model, processor, questions) -> float:
    """Largest |torch - mlx| logit over every position of a few single-turn prompts."""
    import mlx.core as mx
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    ref = Qwen3VLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    gap = 0.0
    for _, image, q, _ in questions:
        x = processor(processor.build_prompt(q, 1), [image])
        ids = torch.from_numpy(x["input_ids"].astype(np.int64))
        with torch.no_grad():
            want = ref(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=torch.from_numpy(x["pixel_values"]),
                image_grid_thw=torch.from_numpy(x["grid_thw"].astype(np.int64)),
                mm_token_type_ids=(ids == processor.image_token_id).int(),
            ).logits.numpy()
        got = np.array(model(mx.array(x["input_ids"]), mx.array(x["pixel_values"]), x["grid_thw"]).astype(mx.float32))
        gap = max(gap, float(np.abs(want - got).max()))
    return gap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", required=True, help="the Hugging Face checkpoint directory")
    ap.add_argument("--mlx", required=True, help="the converted MLX directory")
    ap.add_argument("--convert", choices=("float16", "float32", "bfloat16"), help="convert --hf into --mlx first")
    ap.add_argument("--per-family", type=int, default=200)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--no-torch", action="store_true", help="skip transformers' teacher-forced accuracy")
    args = ap.parse_args(argv)
    hf, mlx_dir = Path(args.hf), Path(args.mlx)
    if args.convert:
        from mlx_compact.convert import convert

        convert(hf, mlx_dir, dtype=args.convert, force=True, progress=False)
    from mlx_compact.loader import load

    questions = scenes.eval_questions("test", args.per_family, held=True)
    plain = [q[:4] for q in questions]
    model, processor = load(str(mlx_dir))
    t0 = time.time()
    gap = logit_gap(hf, model, processor, plain[:5])
    acc_torch = torch_accuracy(hf, plain) if not args.no_torch else None
    t1 = time.time()
    acc_mlx, acc_held, f1, wrong = mlx_accuracy(model, processor, questions)
    t2 = time.time()
    res = {
        "questions": len(questions),
        "held_out_phrasings": sum(q[4] for q in questions),
        "torch_teacher_forced": acc_torch,
        "mlx": acc_mlx,
        "mlx_held_out_phrasings": acc_held,
        "describe_item_f1": f1,
        "max_logit_gap": gap,
        "torch_s": round(t1 - t0, 1),
        "mlx_s": round(t2 - t1, 1),
        "mlx_wrong_examples": wrong[:20],
    }
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
