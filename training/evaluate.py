"""Test-split accuracy per question family: transformers (torch) and mlx_compact (loader + greedy generate).

    python training/evaluate.py --hf RUN/hf --mlx MLX_DIR [--per-family N] [--convert DTYPE]

With --convert, first converts the Hugging Face checkpoint into MLX_DIR with `mlx_compact.convert`.
Also prints the largest logit difference between the two implementations on a few test prompts.
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


def mlx_accuracy(model, processor, questions) -> tuple[dict, list]:
    from mlx_compact.generate import generate

    right, total, wrong = {f: 0 for f in scenes.FAMILIES}, {f: 0 for f in scenes.FAMILIES}, []
    for family, image, q, a in questions:
        got = generate(model, processor, q, [image], max_tokens=4).text.strip()
        total[family] += 1
        right[family] += got == a
        if got != a:
            wrong.append((family, q, a, got))
    return {f: right[f] / max(total[f], 1) for f in scenes.FAMILIES}, wrong


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
    args = ap.parse_args(argv)
    hf, mlx_dir = Path(args.hf), Path(args.mlx)
    if args.convert:
        from mlx_compact.convert import convert

        convert(hf, mlx_dir, dtype=args.convert, force=True, progress=False)
    from mlx_compact.loader import load

    questions = scenes.eval_questions("test", args.per_family)
    model, processor = load(str(mlx_dir))
    t0 = time.time()
    gap = logit_gap(hf, model, processor, questions[:5])
    acc_torch = torch_accuracy(hf, questions)
    t1 = time.time()
    acc_mlx, wrong = mlx_accuracy(model, processor, questions)
    t2 = time.time()
    res = {
        "questions": len(questions),
        "torch": acc_torch,
        "mlx": acc_mlx,
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
