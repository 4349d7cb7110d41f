"""Train a tiny Qwen3-VL (transformers, CPU torch) on the synthetic scenes of `scenes.py`.

    python training/train.py --out OUT_DIR [--steps N] [--seed S] ...

Writes OUT_DIR/hf (a Hugging Face checkpoint: config.json, model.safetensors, tokenizer with the Qwen
special tokens and a chat template, preprocessor_config.json) and logs validation accuracy per question
family against wall-clock minutes. Every step draws fresh scenes (train split, indices fixed by the seed),
each scene carrying several question/answer turns; the loss is on the answer tokens (and the <|im_end|>
that closes them) only, plus an optional auxiliary loss that makes each merged visual token predict the
content of its grid cell (the auxiliary head is not part of the saved model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mlx_compact  # noqa: F401,E402  (before anything imports mlx.core)
from training import scenes  # noqa: E402

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TOKEN_IDS = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
CHAR0 = 1 + len(scenes.SHAPES) * len(scenes.COLOURS)  # first text class of the token content
VOCAB_SIZE = 640  # byte-level BPE: 7 special tokens, 256 bytes, the rest merges learned on the corpus

# Qwen's chat template without the default system turn (shorter sequences; a system message still works).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / Qwen pre-tokenization) trained on the scenes' questions and
    answers: the Qwen special tokens at ids 0..6, then the 256 bytes, then the merges, so any text encodes
    (nothing is ever unknown). Deterministic: the corpus is a function of the seedless scene generator."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(scenes.corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert all(tok.token_to_id(t) == i for t, i in TOKEN_IDS.items())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def make_config(vocab_size: int, args):
    from transformers import Qwen3VLConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=args.width,
        intermediate_size=args.width * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 32,
        num_key_value_heads=args.kv_heads,
        head_dim=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        hidden_act="silu",
        attention_dropout=0.0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": args.rope_theta,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=TOKEN_IDS["<|im_end|>"],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
    )
    vision = dict(
        depth=args.vdepth,
        hidden_size=args.vwidth,
        intermediate_size=args.vwidth * 2,
        num_heads=args.vwidth // 32,
        out_hidden_size=args.width,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=18 * 18,
        deepstack_visual_indexes=list(range(args.deepstack)),
        hidden_act="gelu_pytorch_tanh",
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        image_token_id=TOKEN_IDS["<|image_pad|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
    )


def preprocessor_config() -> dict:
    # 16..200 merged tokens: 128 px to 448 px a side pass through smart_resize at their size (to a multiple
    # of 32 px); larger images are scaled down to 200 tokens
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": 2,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 32 * 32 * 16, "longest_edge": 32 * 32 * 200},
    }


def write_sidecars(path: Path, tok) -> None:
    """Tokenizer, chat template, preprocessor and generation configs (everything but config + weights)."""
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    GenerationConfig(
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=[TOKEN_IDS["<|im_end|>"]],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
        do_sample=False,
    ).save_pretrained(str(path))


# ---------------------------------------------------------------- batches


class Batcher:
    """Scenes -> padded torch batches, tokenized and patchified by mlx_compact's Processor."""

    def __init__(self, processor):
        self.p = processor
        tok = processor.tokenizer
        self.im_end = TOKEN_IDS["<|im_end|>"]
        self.header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.image_id = processor.image_token_id

    def encode(self, image, qa):
        """One conversation about one image: the user's first turn holds the image; qa = [(q, a)]."""
        msgs = []
        for i, (q, a) in enumerate(qa):
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        text = self.p.apply_chat_template(msgs, add_generation_prompt=False)
        x = self.p(text, [image])
        ids = x["input_ids"][0].astype(np.int64)
        labels = np.full_like(ids, -100)
        weights = np.zeros(len(ids), dtype=np.float32)
        h, n = self.header, len(self.header)
        i = 0
        while i < len(ids):
            if list(ids[i : i + n]) == h:
                j = i + n
                while j < len(ids) and ids[j] != self.im_end:
                    j += 1
                labels[i + n : j + 1] = ids[i + n : j + 1]
                weights[i + n : j + 1] = 1 / math.sqrt(j + 1 - i - n)  # long answers (describe) weigh less a token
                i = j
            i += 1
        return ids, labels, x["pixel_values"], x["grid_thw"][0], weights

    def collate(self, items):
        L = max(len(ids) for ids, *_ in items)
        B = len(items)
        input_ids = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        weights = torch.zeros(B, L)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, (ids, lab, _, _, w) in enumerate(items):
            input_ids[b, : len(ids)] = torch.from_numpy(ids)
            labels[b, : len(ids)] = torch.from_numpy(lab)
            weights[b, : len(ids)] = torch.from_numpy(w)
            mask[b, : len(ids)] = 1
        return dict(
            input_ids=input_ids,
            attention_mask=mask,
            labels=labels,
            loss_weights=weights,
            mm_token_type_ids=(input_ids == self.image_id).int(),
            pixel_values=torch.from_numpy(np.concatenate([it[2] for it in items])),
            image_grid_thw=torch.from_numpy(np.stack([it[3] for it in items]).astype(np.int64)),
        )


def rank_share(n: int, args) -> range:
    """This rank's slice of a step's n images (the step's scenes are the same whatever the number of ranks)."""
    per_rank = n // args.ranks
    return range(args.rank * per_rank, (args.rank + 1) * per_rank)


def token_labels(scene, grid) -> tuple:
    """(content, region) of each merged token of the image's grid_thw (t, h, w) in patches."""
    return scene.token_labels(int(grid[1]) // 2, int(grid[2]) // 2)


def train_batch(batcher, args, step):
    """This rank's share of the step's images, tokenized and batched."""
    items, cells, regions = [], [], []
    for i in rank_share(args.batch, args):
        idx = args.seed * 1_000_000_000 + step * args.batch + i
        s = scenes.make_scene("train", idx, n_questions=args.turns, family_weights=args.family_weights)
        items.append(batcher.encode(s.image, [(q, a) for _, q, a in s.qa]))
        c, r = token_labels(s, items[-1][3])
        cells += c
        regions += r
    batch = batcher.collate(items)
    batch["cell_labels"] = torch.tensor(cells, dtype=torch.long)
    batch["cell_regions"] = torch.tensor(regions, dtype=torch.long)
    return batch


def val_batches(batcher, questions, size=50):
    out = []
    for i in range(0, len(questions), size):
        chunk = questions[i : i + size]
        out.append(
            (
                [f for f, *_ in chunk],
                [a for *_, a in chunk],
                batcher.collate([batcher.encode(img, [(q, a)]) for _, img, q, a in chunk]),
            )
        )
    return out


@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Teacher-forced exact match of every answer token and the closing <|im_end|> (= greedy decoding's answer)."""
    model.eval()
    right, total = {f: 0 for f in scenes.FAMILIES}, {f: 0 for f in scenes.FAMILIES}
    for fams, _, batch in batches:
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_weights")}).logits
        pred = logits[:, :-1].argmax(-1)
        lab = batch["labels"][:, 1:]
        ok = ((pred == lab) | (lab == -100)).all(-1)
        for f, o in zip(fams, ok.tolist()):
            right[f] += int(o)
            total[f] += 1
    model.train()
    return {f: right[f] / max(total[f], 1) for f in scenes.FAMILIES}


def lr_at(step, args, time_frac=None):
    """Warm-up by steps, then constant, then cosine decay to 5% over the last `decay_frac` of the run.

    With `time_frac` (the fraction of the wall-clock budget spent, --minutes), the decay is placed by time,
    so it happens at the end of the run whatever the machine's speed."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    done = time_frac if time_frac is not None else step / max(1, args.steps)
    start = 1 - args.decay_frac
    if done < start:
        return args.lr
    frac = min(1.0, (done - start) / max(1e-9, args.decay_frac))
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def sync_clock(frac, evaluate_now, stop, args):
    """Rank 0's clock decides for every rank (lr schedule, validation, stopping), so ranks stay in step."""
    if args.ranks == 1:
        return frac, evaluate_now, stop
    x = torch.tensor([frac, float(evaluate_now), float(stop)], dtype=torch.float64)
    torch.distributed.broadcast(x, 0)
    return float(x[0]), bool(x[1]), bool(x[2])


def all_reduce_grads(params, args):
    """Average the gradients over the ranks (one flat all-reduce)."""
    if args.ranks == 1:
        return
    with_grad = [p for p in params if p.grad is not None]  # the same parameters on every rank
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    torch.distributed.all_reduce(flat)
    flat /= args.ranks
    i = 0
    for p in with_grad:
        p.grad.copy_(flat[i : i + p.numel()].view_as(p))
        i += p.numel()


def vision_phase(model, aux_head, captured, batcher, args, log):
    """Phase 1: train the vision tower (and the auxiliary head) alone on the per-cell content/position loss.

    The LLM is not run, so a step is cheap and takes a bigger batch of images."""
    visual = model.model.visual
    params = list(visual.parameters()) + list(aux_head.parameters())
    peak = args.vision_lr or args.lr
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.98), eps=1e-8, weight_decay=args.wd)
    t0, step, ema, acc_ema, next_log = time.time(), 0, None, None, 60.0
    while True:
        if args.vision_steps:
            frac, stop = step / args.vision_steps, False
        else:
            frac, _, stop = sync_clock((time.time() - t0) / (args.vision_minutes * 60), False, False, args)
        if frac >= 1.0 or stop:
            break
        images, found = [], []
        for i in rank_share(args.vision_batch, args):
            idx = args.seed * 1_000_000_000 + 500_000_000 + step * args.vision_batch + i
            found.append(scenes.make_scene("train", idx, n_questions=0))
            images.append(found[-1].image)
        pix, grids = batcher.p.preprocess_images(images)
        cells, regions = [], []
        for s, g in zip(found, grids):
            c, r = token_labels(s, g)
            cells += c
            regions += r
        # after 70% of the phase: cos(pi * frac), i.e. a drop to ~25% then down to 5% (the shipped run's schedule)
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)) if frac > 0.7 else 1.0
        lr = peak * min(1.0, (step + 1) / 50) * decay
        for g in opt.param_groups:
            g["lr"] = lr
        visual(torch.from_numpy(pix), grid_thw=torch.from_numpy(np.asarray(grids).astype(np.int64)))
        z = aux_head(captured["merged"])
        cells_t, regions_t = torch.tensor(cells), torch.tensor(regions)
        loss = torch.nn.functional.cross_entropy(z[:, : scenes.N_CLASSES], cells_t) + torch.nn.functional.cross_entropy(
            z[:, scenes.N_CLASSES :], regions_t
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(params, args)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        pred = z[:, : scenes.N_CLASSES].argmax(-1)
        acc = [
            (pred[m] == cells_t[m]).float().mean().item()
            for m in (cells_t > 0, (cells_t > 0) & (cells_t < CHAR0), cells_t >= CHAR0)
        ]
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        acc_ema = acc if acc_ema is None else [0.95 * e + 0.05 * a for e, a in zip(acc_ema, acc)]
        step += 1
        t = time.time() - t0
        if args.rank == 0 and (t >= next_log or step == args.vision_steps):
            rec = {
                "phase": "vision",
                "step": step,
                "minutes": round(t / 60, 2),
                "images": step * args.vision_batch,
                "aux_loss": round(ema, 4),
                "content_acc_occupied": round(acc_ema[0], 3),
                "shape_acc": round(acc_ema[1], 3),
                "char_acc": round(acc_ema[2], 3),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(
                f"[vision {t / 60:5.2f} min] step {step:5d} aux loss {ema:.3f} content acc (occupied) {acc_ema[0]:.2f}"
                f" shapes {acc_ema[1]:.2f} chars {acc_ema[2]:.2f}",
                flush=True,
            )
            next_log = t + 60.0
    return time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory (the checkpoint goes to OUT/hf)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--turns", type=int, default=6, help="question/answer turns per image")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--decay-frac", type=float, default=0.2, help="cosine decay over the last part of the steps")
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the per-cell content loss (0: off)")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=1e4)
    ap.add_argument("--vwidth", type=int, default=96)
    ap.add_argument("--vdepth", type=int, default=3)
    ap.add_argument("--deepstack", type=int, default=1, help="DeepStack on the first N vision blocks")
    ap.add_argument("--eval-every", type=float, default=4.0, help="minutes between validation runs")
    ap.add_argument("--val-per-family", type=int, default=30)
    ap.add_argument("--max-minutes", type=float, default=43.0, help="safety stop (wall clock)")
    ap.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="wall-clock budget (vision phase included): run until it is spent, lr decay placed by time "
        "(0: run --steps, decay placed by steps)",
    )
    ap.add_argument(
        "--vision-minutes",
        type=float,
        default=0.0,
        help="first train the vision tower alone on the auxiliary loss for this long (0: off)",
    )
    ap.add_argument(
        "--vision-steps",
        type=int,
        default=0,
        help="first train the vision tower alone for this many steps (reproducible; overrides --vision-minutes)",
    )
    ap.add_argument(
        "--init",
        help="warm start: an MLX checkpoint of the same widths (e.g. the previous bundled model) whose vision "
        "tower and LLM layers start the run (embeddings and head are new: the vocabulary differs)",
    )
    ap.add_argument("--save-every", type=int, default=0, help="also save a checkpoint OUT/ckpt-STEP every N steps")
    ap.add_argument(
        "--family-weights",
        default=None,
        help="phase 2 question mix, e.g. count=2,where=2,exists=2 (others 1; default: uniform)",
    )
    ap.add_argument("--vision-lr", type=float, default=None, help="phase 1 learning rate (default: --lr)")
    ap.add_argument(
        "--freeze-vision",
        action="store_true",
        help="after the vision phase, freeze the tower (DeepStack mergers excepted) and drop the auxiliary loss",
    )
    ap.add_argument("--vision-only", action="store_true", help="stop after the vision phase (to try recipes)")
    ap.add_argument("--vision-batch", type=int, default=32, help="images per step in the vision phase")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (1 is fastest here)")
    ap.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="data-parallel processes, one per core, each pinned to its core (gradients averaged "
        "every step; --batch and --vision-batch are split between them)",
    )
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launch_ranks
    args = ap.parse_args(argv)
    if args.family_weights:
        w = dict(kv.split("=") for kv in args.family_weights.split(","))
        args.family_weights = {f: float(w.get(f, 1.0)) for f in scenes.FAMILIES}
    if args.batch % args.ranks or args.vision_batch % args.ranks:
        ap.error(
            f"--batch ({args.batch}) and --vision-batch ({args.vision_batch}) must divide by --ranks ({args.ranks})"
        )
    if args.ranks == 1 or args.rank is not None:
        return run(args)
    launch_ranks(args, sys.argv[1:] if argv is None else argv)


def launch_ranks(args, argv):
    """Start --ranks copies of this script, each pinned to its own core before Python starts (pinning
    inside an already-started process left it ~40% slower), and wait for all of them."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads)}
    procs = []
    for r in range(args.ranks):
        core = {cores[r % len(cores)]}
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, *argv, "--rank", str(r)],
                env=env,
                preexec_fn=lambda c=core: os.sched_setaffinity(0, c),
            )
        )
    try:
        codes = [p.wait() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise SystemExit(f"a training rank failed (exit codes {codes})")


def save(model, path: Path, tok) -> None:
    model.save_pretrained(str(path))
    write_sidecars(path, tok)  # save_pretrained may rewrite generation_config.json


def warm_start(model, path: Path) -> None:
    """Copy the vision tower and the LLM layers of an MLX checkpoint (our converter's layout) into `model`."""
    from safetensors.numpy import load_file

    ours = model.state_dict()
    loaded = 0
    for name, value in load_file(str(path / "model.safetensors")).items():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        key = name.replace("vision_tower.", "model.visual.").replace("language_model.model.", "model.language_model.")
        if key.endswith("patch_embed.proj.weight"):
            value = value.transpose(0, 4, 1, 2, 3)  # MLX [O, T, H, W, C] -> torch [O, C, T, H, W]
        if key not in ours or tuple(ours[key].shape) != value.shape:
            raise SystemExit(f"--init {path}: {name} {value.shape} does not fit this model")
        ours[key].copy_(torch.from_numpy(value.astype(np.float32)))
        loaded += 1
    print(f"warm start: {loaded} tensors from {path}", flush=True)


def run(args):
    """One rank of training (rank 0 validates, logs and saves)."""
    from transformers import Qwen3VLForConditionalGeneration

    from mlx_compact.processor import Processor

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.rank is None:
        args.rank = 0
    elif args.ranks > 1:
        torch.distributed.init_process_group("gloo", rank=args.rank, world_size=args.ranks)
    out = Path(args.out)
    hf = out / "hf"
    if args.rank == 0:
        tok = make_tokenizer()
        write_sidecars(hf, tok)
        make_config(len(tok), args).save_pretrained(str(hf))  # the processor reads token ids from config.json
    if args.ranks > 1:
        torch.distributed.barrier()
    processor = Processor.from_pretrained(hf)  # every rank: the tokenizer rank 0 trained
    tok = processor.tokenizer
    config = make_config(len(tok), args)
    batcher = Batcher(processor)

    model = Qwen3VLForConditionalGeneration(config).float().train()
    if args.init:
        warm_start(model, Path(args.init))
    n_params = sum(p.numel() for p in model.parameters())
    aux_head = torch.nn.Linear(args.width, scenes.N_CLASSES + 9)  # cell content, then cell position
    captured = {}
    model.model.visual.merger.register_forward_hook(lambda m, i, o: captured.__setitem__("merged", o))
    params = list(model.parameters()) + (list(aux_head.parameters()) if args.aux > 0 else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )

    if args.rank > 0:
        val, log = None, open(os.devnull, "w")
    else:
        val = val_batches(batcher, scenes.eval_questions("val", args.val_per_family))
        log = open(out / "train_log.jsonl", "w")
    if args.rank == 0:
        print(f"params {n_params / 1e6:.2f}M  vocab {len(tok)}  args {vars(args)}", flush=True)

    def report(step, t, loss):
        acc = evaluate(model, val)
        rec = {
            "step": step,
            "minutes": round(t / 60, 2),
            "images": step * args.batch,
            "answers": step * args.batch * args.turns,
            "loss": round(loss, 4),
            **{f: round(a, 3) for f, a in acc.items()},
            "content_acc_occupied": None if aux_acc is None else round(aux_acc, 3),
        }
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(
            f"[{rec['minutes']:6.2f} min] step {step:5d} loss {loss:.3f}  "
            + "  ".join(f"{f} {a:.2f}" for f, a in acc.items()),
            flush=True,
        )
        return acc

    phase1 = args.vision_steps > 0 or args.vision_minutes > 0
    t_vision = vision_phase(model, aux_head, captured, batcher, args, log) if phase1 else 0.0
    if args.vision_only:
        return
    if args.freeze_vision:
        # the tower keeps what phase 1 taught it; only the DeepStack mergers (unused by phase 1) learn on
        visual = model.model.visual
        for name, p in visual.named_parameters():
            p.requires_grad_(name.startswith("deepstack_merger_list"))
        args.aux = 0.0
    budget = args.minutes * 60 - t_vision if args.minutes > 0 else None
    t0 = time.time() - t_vision  # minutes in the log count from the start of the vision phase
    next_eval, ema, stopped = t_vision + args.eval_every * 60, None, False
    t_data = 0.0
    aux_acc = None
    done = 0
    for step in range(10**9 if budget else args.steps):
        t = time.time() - t0
        frac, eval_now, stop = sync_clock(
            (t - t_vision) / budget if budget else -1.0, t >= next_eval, t > args.max_minutes * 60, args
        )
        if eval_now and step > 0:
            if args.rank == 0:
                report(step, t, ema)
            next_eval = (time.time() - t0) + args.eval_every * 60
        if stop:
            if args.rank == 0:
                print(f"safety stop at step {step} ({t / 60:.1f} min)", flush=True)
            stopped = True
            break
        if budget and frac >= 1.0:
            break
        td = time.time()
        batch = train_batch(batcher, args, step)
        t_data += time.time() - td
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, frac if budget else None)
        labels, weights = batch.pop("labels"), batch.pop("loss_weights")
        cells, regions = batch.pop("cell_labels"), batch.pop("cell_regions")
        logits = model(**batch).logits
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
        )
        w = weights[:, 1:].flatten()
        loss = (per_token * w).sum() / w.sum()
        total = loss
        if args.aux > 0:
            z = aux_head(captured["merged"])
            aux = torch.nn.functional.cross_entropy(
                z[:, : scenes.N_CLASSES], cells
            ) + torch.nn.functional.cross_entropy(z[:, scenes.N_CLASSES :], regions)
            total = total + args.aux * aux
            occ = cells > 0
            a = (z[:, : scenes.N_CLASSES].argmax(-1)[occ] == cells[occ]).float().mean().item()
            aux_acc = a if aux_acc is None else 0.95 * aux_acc + 0.05 * a
        opt.zero_grad(set_to_none=True)
        total.backward()
        all_reduce_grads(params, args)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if args.save_every and done % args.save_every == 0 and args.rank == 0:
            save(model, out / f"ckpt-{done}", tok)
        if step == 9 and args.rank == 0:
            tt = time.time() - t0 - t_vision
            print(
                f"speed after 10 steps: {tt / 10:.2f} s/step ({args.batch * 10 / tt:.1f} images/s, "
                f"data {t_data / tt:.0%}, {args.ranks} rank(s))",
                flush=True,
            )
    if args.ranks > 1:  # every rank applied the same averaged gradients: the weights must be identical
        mine = torch.stack([p.detach().double().sum() for p in params])
        first = mine.clone()
        torch.distributed.broadcast(first, 0)
        if not torch.equal(mine, first):
            raise RuntimeError(f"rank {args.rank}: weights diverged from rank 0's")
        # the last collective: shut gloo's threads down before the interpreter exits (leaving them running
        # made a rank abort now and then with "terminate called without an active exception")
        torch.distributed.destroy_process_group()
    if args.rank > 0:
        return
    t = time.time() - t0
    final = report(done, t, ema)
    save(model, hf, tok)
    summary = {
        "steps": done,
        "vision_minutes": round(t_vision / 60, 2),
        "minutes": round(t / 60, 2),
        "params": n_params,
        "stopped_early": stopped,
        "val": final,
        "args": vars(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
