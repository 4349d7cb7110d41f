"""The `mlx-compact` command.

    mlx-compact generate --prompt TEXT [--image PATH ...] [--video PATH ...] [options]   answer one prompt
    mlx-compact chat [--image PATH ...] [--video PATH ...] [options]   a conversation that keeps its cache
    mlx-compact plan --image PATH ... [options]                       the memory plan, without running
    mlx-compact convert --hf-path SRC --mlx-path DST [options]        Hugging Face checkpoint -> MLX
    mlx-compact serve [--host H --port P --api-key K --media-dir DIR]  an OpenAI-compatible server
    mlx-compact batch --images DIR|GLOB --prompt TEXT [--out F] [--resume]   one JSON line per image

Each subcommand has an ``add_<name>_parser(subparsers)`` that declares its arguments and a
``run_<name>(args)`` that does the work; `SUBCOMMANDS` lists them. Options shared by several
subcommands are declared once by the ``_add_*`` helpers. Errors the user can fix (bad arguments,
unreadable images, a checkpoint that is not Qwen-VL, a run that would not fit in memory) are printed
as one line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys

import mlx_compact  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlx_compact.compaction.types import METHOD_HELP
from mlx_compact.files import InputError
from mlx_compact.loader import DEFAULT_MODEL

EXIT_USAGE = 2


class _NoTorchNotice(logging.Filter):
    """transformers announces on import that PyTorch is missing; we never need it (tokenizers only)."""

    def filter(self, record) -> bool:
        return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_NoTorchNotice())


class UserError(InputError):
    """An error the user can fix; printed as one line."""


class _Formatter(argparse.HelpFormatter):
    """Wraps paragraphs, but keeps texts with explicit line breaks (lists) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit 2), like every other error here."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types


def _number(text: str, ok, what: str) -> float:
    """A float argument that satisfies ``ok``; otherwise argparse's one-line error naming ``what``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def _keep(text: str) -> float:
    return _number(text, lambda v: 0.0 < v <= 1.0, "keep must be a number in (0, 1] (the share of visual tokens kept)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _temperature(text: str) -> float:
    return _number(text, lambda v: math.isfinite(v) and v >= 0, "temperature must be a finite number >= 0 (0: greedy)")


def _fps(text: str) -> float:
    return _number(
        text, lambda v: math.isfinite(v) and v > 0, "fps must be a number > 0 (frames per second, e.g. 2 or 0.5)"
    )


def _top_p(text: str) -> float:
    return _number(text, lambda v: 0.0 < v <= 1.0, "top-p must be a number in (0, 1] (1: no cut)")


_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "t": 2**40,
    "tb": 2**40,
}


def _size(text: str) -> int:
    """Bytes from '16GB', '10.5g', '512MB' or a plain byte count (binary units: 1 GB = 2**30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower().replace("i", "") not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"a memory size is like 16GB, 10.5GB or 512MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower().replace("i", "")])


# ---------------------------------------------------------------- shared options


def _add_model(p) -> None:
    p.add_argument(
        "--model",
        default=None,
        metavar="M",
        help="a Qwen-VL model: a local directory or a Hugging Face repo id such as "
        "mlx-community/Qwen2.5-VL-3B-Instruct-4bit (downloaded once, then cached; no conversion "
        "needed). Default: the small Qwen3-VL bundled with the package (synthetic scenes only)",
    )


def _add_images(p, required: bool = False, what: str = "the first question") -> None:
    p.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        required=required,
        help=f"an image file (JPEG, PNG, WebP, TIFF, ...; HEIC with pillow-heif installed) for {what}; "
        "repeat for several",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        metavar="P",
        help="shrink each image to at most P pixels before the model sees it (e.g. 1000000 for about "
        "1 megapixel). Each 28x28 pixel block (32x32 on Qwen3-VL) becomes one visual token, so a "
        "12 MP photo can cost thousands of tokens: fewer pixels = less memory and a faster first "
        "token, but less fine detail. Default: the model's own limit",
    )


def _add_videos(p, what: str = "the first question") -> None:
    g = p.add_argument_group(
        "video",
        "A video is read as frames sampled from it, two frames to a grid of visual tokens (the model's\n"
        "temporal patch): more frames or bigger frames cost more tokens, memory and time.",
    )
    g.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="PATH",
        help=f"a video for {what}: a video file (MP4, MOV, MKV, WebM, ...; needs PyAV: pip install "
        "'mlx-compact[video]') or a folder of frames (its image files in name order, nothing "
        "extra needed); repeat for several",
    )
    g.add_argument(
        "--fps",
        type=_fps,
        default=None,
        metavar="F",
        help="frames per second taken from a video file (default 2, as mlx-vlm and Qwen's own tools; "
        "a short clip still gets 4 frames); for a folder, the rate its frames were taken at "
        "(default 2)",
    )
    g.add_argument(
        "--max-frames",
        type=_positive_int,
        default=None,
        metavar="N",
        help="take at most N frames from each video, evenly spaced (default 768)",
    )


def _add_compaction(p, post_only: bool = False) -> None:
    methods = "\n".join(f"  {k:<10} {v}" for k, v in METHOD_HELP.items())
    g = p.add_argument_group(
        "visual-token compaction",
        "A photo becomes hundreds to thousands of visual tokens; keeping a share of them\n"
        f"makes the first token come sooner and the KV cache smaller. Methods:\n{methods}",
    )
    g.add_argument(
        "--compaction",
        choices=list(METHOD_HELP),
        default=None,
        metavar="METHOD",
        help="how to choose the visual tokens to keep (see the list above). Default: none, or "
        "diversity when --keep/--tokens is given",
    )
    keep = g.add_mutually_exclusive_group()
    keep.add_argument(
        "--keep",
        type=_keep,
        default=None,
        metavar="R",
        help="share of each image's visual tokens to keep, in (0, 1]: 0.33 keeps a third. The KV "
        "cache and the prefill shrink in proportion, so the first token comes sooner and uses "
        "less memory; very low values lose detail. Default with --compaction: 0.33",
    )
    keep.add_argument(
        "--tokens",
        type=_positive_int,
        default=None,
        metavar="K",
        help="keep at most K visual tokens per image (instead of a share)",
    )
    g.add_argument(
        "--proportional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="size-aware attention: each kept token weighs as much as the tokens it stands for (its "
        "group), so counting and small details survive low --keep; the cache stays compact "
        "(one extra number per token). Default: on for diversity, merge and pool after the "
        "vision tower, off elsewhere",
    )
    if not post_only:
        g.add_argument(
            "--where",
            choices=("post", "encoder"),
            default="post",
            help="post (default): compact after the vision tower (every model). encoder: choose the "
            "tokens inside the vision tower, so its remaining layers run on fewer tokens too "
            "(faster vision; Qwen2-VL and Qwen3-VL only; floor, diversity, saliency or random)",
        )


def _add_cache(p) -> None:
    g = p.add_argument_group("KV cache (the model's working memory of the conversation)")
    g.add_argument(
        "--max-kv-tokens",
        "--max-kv-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="give the cache a fixed size of N tokens, allocated once: memory cannot grow during a "
        "long answer or chat. The system prompt and the images stay pinned; when it fills, the "
        "oldest chat text is forgotten first (by the attention layers: a hybrid model such as Qwen3.5 "
        "still summarises it in the fixed state of its linear layers). Default: a cache that grows as needed",
    )
    g.add_argument(
        "--kv-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="store the cache in 8 or 4 bits instead of 16: about 2x or 4x less cache memory (8 is "
        "near-lossless, 4 can change answers). Needs --max-kv-tokens",
    )


def _add_sampling(p, top_p_seed: bool = True) -> None:
    g = p.add_argument_group("answer")
    g.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=256,
        metavar="N",
        help="longest answer, in tokens (about 3/4 of a word each; default %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        metavar="T",
        help="randomness of the answer: 0 (default) always picks the likeliest word; 0.7 is livelier",
    )
    if top_p_seed:
        g.add_argument(
            "--top-p",
            type=_top_p,
            default=1.0,
            metavar="P",
            help="with --temperature > 0, sample only from the likeliest words whose probabilities "
            "add up to P (e.g. 0.9); default 1.0 (all words)",
        )
        g.add_argument(
            "--top-k",
            type=int,
            default=0,
            metavar="K",
            help="with --temperature > 0, sample only from the K likeliest words (default 0: off)",
        )
        g.add_argument(
            "--min-p",
            type=float,
            default=0.0,
            metavar="P",
            help="with --temperature > 0, drop words less likely than P times the likeliest (default 0: off)",
        )
        g.add_argument(
            "--repetition-penalty",
            type=float,
            default=None,
            metavar="R",
            help="make recently used words less likely (e.g. 1.1; default: off)",
        )
        g.add_argument(
            "--seed",
            type=int,
            default=None,
            metavar="S",
            help="random seed (any whole number), so that a sampled answer can be repeated",
        )


def _add_memory(p, fit: bool = True) -> None:
    g = p.add_argument_group("memory plan (checked before anything runs)")
    g.add_argument(
        "--memory-budget",
        type=_size,
        default=None,
        metavar="SIZE",
        help="plan against SIZE of memory (e.g. 10GB) instead of what this machine allows; on a Mac "
        "that is the GPU's share of unified memory, about 2/3 to 3/4 of its RAM",
    )
    if fit:
        g.add_argument(
            "--fit",
            choices=("refuse", "auto"),
            default="refuse",
            help="what to do when the plan does not fit: refuse (default) stops with a message naming "
            "what would fit; auto shrinks the images until it fits",
        )


def _add_pipeline(p) -> None:
    g = p.add_argument_group("several Macs (run under mlx.launch; see the README)")
    g.add_argument(
        "--pipeline",
        action="store_true",
        help="split the LLM layers across the ranks that mlx.launch started: each rank loads only its share; rank 0 "
        "also runs the vision tower, compaction and sampling, and is the only one that prints",
    )
    g.add_argument(
        "--layer-split",
        default=None,
        metavar="N,N,...",
        help="the LLM layers of each rank, in rank order (default: split by bytes in proportion to each rank's memory)",
    )
    g.add_argument(
        "--pipeline-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="end every rank when a transfer between ranks waits longer than this (default 300; a rank that dies "
        "is noticed within about a second)",
    )


def _positive_float(text: str) -> float:
    return _number(text, lambda v: math.isfinite(v) and v > 0, "must be a number > 0")


def _add_stats(p, per: str) -> None:
    p.add_argument(
        "--stats",
        choices=("text", "json"),
        default="text",
        help=f"statistics of {per} (tokens, visual tokens kept, KV bytes, time to first token split "
        "into preprocess / vision / prefill, decode speed, peak memory): text on stderr "
        "(default), or json on stdout",
    )


def _check_cache_args(args) -> None:
    from mlx_compact.generate import check_cache_options

    check_cache_options(args.max_kv_tokens, args.kv_bits)


def _compaction(args, keep=None):
    """The Compaction the arguments ask for, or None for no compaction."""
    from mlx_compact.compaction import Compaction

    method, keep = args.compaction, keep if keep is not None else args.keep
    if method is None and keep is None and args.tokens is None:
        if getattr(args, "proportional", None):
            raise UserError("--proportional weighs the tokens compaction keeps: give --keep R or --tokens K")
        return None
    if method == "none" or (keep == 1.0 and args.tokens is None):
        return Compaction.none()
    kw = {
        "method": method or "diversity",
        "where": getattr(args, "where", "post"),
        "proportional": getattr(args, "proportional", None),
    }
    if keep is not None:
        kw["keep"] = keep
    if args.tokens is not None:
        kw["tokens"] = args.tokens
    try:
        return Compaction(**kw)
    except ValueError as e:
        raise UserError(str(e).replace("Compaction(where='encoder')", "--where encoder")) from None


# ---------------------------------------------------------------- images


def _read_image(path: str):
    """An image file, read from its header only (`mlx_compact.images.open_image`): decoded after the plan."""
    from mlx_compact.images import open_image

    return open_image(path)


# ---------------------------------------------------------------- progress and stats


def _prefill_progress(prefill_step: int = 512):
    """A progress(done, total) callback that draws a tqdm bar on stderr for prefills longer than three
    chunks, when stderr is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if total <= 3 * prefill_step:
            return
        if bar is None:
            bar = tqdm(total=total, unit="tok", desc="prefill", leave=False, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar = None

    return progress


def _stats_text(s: dict) -> str:
    t = s["ttft_s"]
    vis = ", ".join(f"{v['before']}->{v['after']}" for v in s["visual_tokens"]) or "none"
    split = ", ".join(f"{k} {v:.2f}" for k, v in t.items())
    evicted = f", {s['kv_evicted_tokens']} evicted" if s.get("kv_evicted_tokens") else ""
    tps = s["decode_tokens_per_s"]
    decode = "n/a" if tps is None else f"{tps:.1f} tok/s"
    return (
        f"prompt {s['prompt_tokens']} tokens (visual {vis}), generated {s['generation_tokens']}; "
        f"TTFT {sum(t.values()):.2f} s ({split}); decode {decode}; "
        f"KV {s['kv_bytes_used'] / 2**20:.1f} of {s['kv_bytes_allocated'] / 2**20:.1f} MiB{evicted}"
        + (f" (linear state {s['linear_state_bytes'] / 2**20:.1f} MiB)" if s.get("linear_state_bytes") else "")
        + f"; peak {s['peak_memory_bytes'] / 2**30:.2f} GiB"
        + "".join(f", rank {r['rank']} {r['peak_memory_bytes'] / 2**30:.2f} GiB" for r in s.get("ranks", []))
    )


def _print_stats(stats: dict, mode: str, text=None) -> None:
    """JSON (one line on stdout; with the reply's text when given) or text (stderr)."""
    if mode == "json":
        print(json.dumps(stats if text is None else {"text": text, **stats}), flush=True)
    else:
        print(_stats_text(stats), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- generate


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer one prompt about one or more images or videos",
        description="Answer one prompt about one or more images or videos and stream the answer to stdout. The memory "
        "plan is checked first: a run that would not fit is refused (or scaled down with --fit auto) "
        "before anything is allocated.",
    )
    _add_model(p)
    p.add_argument("--prompt", required=True, help="the question or instruction")
    _add_images(p, what="the prompt")
    _add_videos(p, what="the prompt")
    _add_compaction(p)
    _add_cache(p)
    _add_sampling(p)
    _add_memory(p)
    _add_pipeline(p)
    _add_stats(p, "the run")
    p.set_defaults(run=run_generate)


def _read_video(path: str, args):
    """A video planned from its metadata (`mlx_compact.video.open_video`): decoded after the memory plan."""
    from mlx_compact.video import open_video

    return open_video(path, args.fps, args.max_frames, budget=args.memory_budget)


def _load_checked(args):
    """Check the options, images and videos, then load the model: (model, processor, compaction, images,
    videos)."""
    from mlx_compact.loader import load
    from mlx_compact.pipeline import process_rank

    _check_cache_args(args)
    c = _compaction(args)
    first = not args.pipeline or process_rank() == 0  # images and videos are the first rank's: it encodes them
    images = [_read_image(p) for p in args.image] if first else []
    videos = [_read_video(p, args) for p in args.video] if first else []
    model, processor = load(
        args.model,
        memory_budget=args.memory_budget,
        pipeline=args.pipeline,
        layer_split=args.layer_split,
        pipeline_timeout=args.pipeline_timeout,
    )
    return model, processor, c, images, videos


def _answer(responses, mode: str) -> None:
    """Stream an answer's text to stdout (text mode), then its stats (see `_print_stats`)."""
    text, stats = "", {}
    for r in responses:
        text += r.text
        if mode == "text":
            print(r.text, end="", flush=True)
        stats = r.stats or stats
    if mode == "text":
        print(flush=True)
    if "fitted_max_pixels" in stats:
        _say(
            f"--fit auto: images shrunk to at most {stats['fitted_max_pixels']} pixels each to fit in memory; "
            "pass --max-pixels to choose yourself"
        )
    _print_stats(stats, mode, None if mode == "text" else text)


def _sampling(args) -> dict:
    """The answer options generate, chat and batch share (their flags: `_add_sampling`)."""
    keys = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: getattr(args, k) for k in keys}


def run_generate(args) -> int:
    from mlx_compact.generate import stream_generate

    model, processor, c, images, videos = _load_checked(args)
    _answer(
        stream_generate(
            model,
            processor,
            args.prompt,
            images,
            videos=videos,
            **_sampling(args),
            seed=args.seed,
            max_pixels=args.max_pixels,
            compaction=c,
            max_kv_size=args.max_kv_tokens,
            kv_bits=args.kv_bits,
            memory_budget=args.memory_budget,
            fit=args.fit,
            progress=_prefill_progress(),
        ),
        args.stats,
    )
    return 0


# ---------------------------------------------------------------- chat

CHAT_HELP = """commands:
  /image PATH   attach an image to the next question (repeat for several)
  /video PATH   attach a video (a file, or a folder of frames) to the next question
  /keep R       keep this share of visual tokens (0 < R <= 1) for images added from now on
  /stats        statistics of the last answer
  /reset        forget the conversation (and free its cache)
  /save FILE    save the conversation (its KV cache) to FILE.safetensors
  /load FILE    continue a conversation saved with /save (same model)
  /help         this list
  /quit         leave (or Ctrl-D / Ctrl-C)"""


def add_chat_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="a multi-turn conversation about images that keeps its cache across turns",
        description="Chat with a Qwen-VL model. Images are encoded once, in the turn that brings them, and the "
        "conversation's cache is kept: a follow-up question costs only its own tokens. Type /help for the "
        "commands (/image, /video, /keep, /stats, /reset, /save, /load, /quit). From a pipe, each input line is one "
        "question and no prompts are printed.",
    )
    _add_model(p)
    _add_images(p)
    _add_videos(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="the system prompt (default: the model's own)")
    _add_compaction(p)
    _add_cache(p)
    _add_sampling(p)
    _add_memory(p)
    _add_pipeline(p)
    _add_stats(p, "each answer")
    p.set_defaults(run=run_chat)


class _Chat:
    """The chat loop's state: a ChatSession, the images waiting for the next question, the options."""

    def __init__(self, args, session, images, videos=()):
        self.args, self.session, self.pending = args, session, list(images)
        self.pending_videos = list(videos)

    def command(self, line: str) -> bool:
        """Run a /command; return False to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            _say(CHAT_HELP)
        elif name == "/image":
            if not arg:
                raise UserError("/image needs a file path")
            self.pending.append(_read_image(arg))
            _say(f"image {arg} attached to the next question")
        elif name == "/video":
            if not arg:
                raise UserError("/video needs a video file or a folder of frames")
            video = _read_video(arg, self.args)
            self.pending_videos.append(video)
            _say(f"video {arg} ({video.num_frames} frames at {video.fps:g} per second) attached to the next question")
        elif name == "/keep":
            try:
                keep = _keep(arg)
            except argparse.ArgumentTypeError as e:
                raise UserError(str(e)) from None
            s.compaction = _compaction(self.args, keep=keep)
            _say(f"images added from now on keep {keep:g} of their visual tokens")
        elif name == "/stats":
            if not s.last_stats:
                raise UserError("no answer yet")
            _print_stats(s.last_stats, self.args.stats)
        elif name == "/reset":
            s.reset()
            self.pending, self.pending_videos = [], []
            _say("conversation reset")
        elif name in ("/save", "/load"):
            if not arg:
                raise UserError(f"{name} needs a file name")
            path = arg if arg.endswith(".safetensors") else arg + ".safetensors"
            try:
                s.save(path) if name == "/save" else s.load(path)
            except InputError:
                raise  # names the file and what to do
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"cannot {name[1:]} {path}: {_one_line(e)}") from None
            _say(f"{'saved to' if name == '/save' else 'loaded'} {path}")
        else:
            raise UserError(f"unknown command {name}; /help lists the commands")
        return True

    def ask(self, question: str) -> None:
        a, turns = self.args, self.session.turns
        images, self.pending = self.pending, []
        videos, self.pending_videos = self.pending_videos, []
        try:
            _answer(
                self.session.stream(
                    question,
                    images,
                    videos=videos,
                    **_sampling(a),
                    progress=_prefill_progress(),
                ),
                a.stats,
            )
        except BaseException:
            if self.session.turns == turns:  # refused before the conversation changed: keep the images
                self.pending = images + self.pending
                self.pending_videos = videos + self.pending_videos
            raise


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _lines(interactive: bool):
    """Input lines: with a prompt and line editing on a terminal, plain lines from a pipe."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        while True:
            try:
                yield input("> ")
            except EOFError:
                print()
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def run_chat(args) -> int:
    from mlx_compact.chat import ChatSession
    from mlx_compact.generate import set_seed
    from mlx_compact.memory import MemoryPlanError
    from mlx_compact.pipeline import PipelineError

    model, processor, c, images, videos = _load_checked(args)
    if args.seed is not None:
        set_seed(args.seed)
    session = ChatSession(
        model,
        processor,
        system_prompt=args.system,
        compaction=c,
        max_kv_size=args.max_kv_tokens,
        kv_bits=args.kv_bits,
        max_pixels=args.max_pixels,
        memory_budget=args.memory_budget,
        fit=args.fit,
    )
    chat = _Chat(args, session, images, videos)
    interactive = sys.stdin.isatty()
    if interactive:
        _say(f"chatting with {args.model or DEFAULT_MODEL}; /help lists the commands, Ctrl-D leaves")
    failed = False
    try:
        for line in _lines(interactive):
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not chat.command(line):
                        break
                else:
                    chat.ask(line)
            except (UserError, InputError, MemoryPlanError) as e:
                print(f"mlx-compact chat: error: {_one_line(e)}", file=sys.stderr, flush=True)
                failed = True
            except (BrokenPipeError, PipelineError):
                raise
            except Exception as e:  # a failed turn or command keeps the conversation: report it and go on
                print(f"mlx-compact chat: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr, flush=True)
                failed = True
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return EXIT_USAGE if failed and not interactive else 0


# ---------------------------------------------------------------- plan


def add_plan_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="print the memory a run would need, without running the model",
        description="Print the memory plan of a run (model weights, KV cache, vision and prefill activation "
        "peaks, the memory this machine allows) and, when it does not fit, what would. Reads only the image "
        "headers, the videos' metadata and the checkpoint's tensor sizes: nothing is decoded or run.",
    )
    _add_model(p)
    _add_images(p, what="the run")
    _add_videos(p, what="the run")
    p.add_argument("--prompt", default="", help="the prompt (its length counts a little; default empty)")
    g = p.add_argument_group("visual-token compaction")
    g.add_argument(
        "--keep",
        type=_keep,
        default=1.0,
        metavar="R",
        help="share of visual tokens kept by compaction, in (0, 1] (default 1: no compaction)",
    )
    _add_cache(p)
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=256,
        metavar="N",
        help="longest answer, in tokens (default %(default)s)",
    )
    _add_memory(p, fit=False)
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(run=run_plan)


def _settings(args) -> dict:
    return dict(
        keep=args.keep,
        max_kv_tokens=args.max_kv_tokens,
        kv_bits=args.kv_bits,
        max_pixels=args.max_pixels,
        max_tokens=args.max_tokens,
        budget=args.memory_budget,
    )


def _flags(change: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in change.items())


def run_plan(args) -> int:
    from mlx_compact.generate import plan_run, what_fits
    from mlx_compact.loader import load_model, resolve
    from mlx_compact.memory import device_budget, fmt_bytes
    from mlx_compact.processor import Processor

    _check_cache_args(args)
    sizes = [(im.height, im.width) for im in map(_read_image, args.image)]
    videos = [_read_video(v, args) for v in args.video]
    path = resolve(args.model)
    model = load_model(path, lazy=True)  # weights stay on disk: only their sizes are read
    processor = Processor.from_pretrained(path)
    settings = {**_settings(args), "videos": videos}
    p = plan_run(model, processor, args.prompt, args.image, **settings)
    advice = [] if p.fits else [_flags(c) for c in what_fits(model, processor, args.prompt, args.image, **settings)]
    merge = processor.image.merge_size**2
    from mlx_compact.generate import image_patches, video_patches

    before = [n // merge for n in image_patches(processor, args.image, args.max_pixels)]
    before_videos = [n // processor.video.merge_size**2 for n in video_patches(processor, videos)]
    kept_videos = p.visual_tokens[len(before) :]
    source = "--memory-budget" if args.memory_budget is not None else device_budget()["source"]
    if args.json:
        images = [
            {"path": f, "height": h, "width": w, "visual_tokens": b, "kept": k}
            for f, (h, w), b, k in zip(args.image, sizes, before, p.visual_tokens)
        ]
        print(
            json.dumps(
                {
                    "model": args.model or DEFAULT_MODEL,
                    "images": images,
                    "videos": [
                        {"path": f, "frames": v.num_frames, "height": v.height, "width": v.width}
                        | {"visual_tokens": b, "kept": k}
                        for f, v, b, k in zip(args.video, videos, before_videos, kept_videos)
                    ],
                    "weights": p.weights,
                    "kv": p.kv,
                    "linear_state": p.state,
                    "decode": p.decode,
                    "vision": p.vision,
                    "prefill": p.prefill,
                    "peak": p.peak,
                    "budget": p.budget,
                    "budget_source": source,
                    "tokens": p.tokens,
                    "visual_tokens": p.visual_tokens,
                    "fits": p.fits,
                    "what_would_fit": advice,
                }
            )
        )
        return 0
    print(f"memory plan for {args.model or DEFAULT_MODEL} ({p.tokens} KV tokens, answer up to {args.max_tokens})")
    for f, (h, w), b, k in zip(args.image, sizes, before, p.visual_tokens):
        print(f"  {f}: {w}x{h} px -> {b} visual tokens" + (f", {k} kept" if k != b else ""))
    for f, v, b, k in zip(args.video, videos, before_videos, kept_videos):
        print(
            f"  {f}: {v.num_frames} frames of {v.width}x{v.height} px -> {b} visual tokens"
            + (f", {k} kept" if k != b else "")
        )
    print(p.summary())
    print(
        f"{'budget from':>14}: {source}"
        + (f" ({fmt_bytes(device_budget()['total'])} total)" if args.memory_budget is None else "")
    )
    if not p.fits:
        print(f"{'would fit with':>14}: " + ("; ".join(advice) or "nothing at these settings; use a smaller model"))
    return 0


# ---------------------------------------------------------------- convert


def add_convert_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face Qwen-VL checkpoint into an MLX directory",
        description="Convert a Hugging Face Qwen-VL checkpoint (directory or repo id) into an MLX directory "
        "that mlx-compact and mlx-vlm both load. Not needed for the mlx-community checkpoints. FP8 releases "
        "(quant_method fp8, 128x128 block scales) are dequantized into --dtype, then quantized if asked.",
    )
    p.add_argument("--hf-path", required=True, help="source checkpoint directory or Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="output directory (must not exist unless --force)")
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="quantize the language model (4-bit: about 4x smaller than 16-bit, slightly less accurate)",
    )
    p.add_argument("--q-bits", type=int, choices=(4, 6, 8), default=4, help="bits per weight (default 4)")
    p.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64, help="group size (default 64)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of the float parameters (default bfloat16)",
    )
    p.add_argument("--quantize-vision", action="store_true", help="quantize the vision tower too")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from mlx_compact.convert import convert

    dst = convert(
        args.hf_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
        quantize_vision=args.quantize_vision,
        force=args.force,
    )
    print(f"wrote {dst}")
    return 0


# ---------------------------------------------------------------- serve


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible server (POST /v1/chat/completions) for apps and scripts",
        description="Serve one model over OpenAI's chat completions API (streaming or not), on 127.0.0.1 unless told "
        "otherwise. Images come as data: URIs (base64) or, with --media-dir, as files in that folder; nothing is "
        "fetched from the network. A conversation's images are encoded once: the next request of the same "
        "conversation reuses its cached prefix and prefills only its new tokens. Every request is planned before "
        "it runs (413 with what would fit when it would not); one computes at a time and the others wait in a "
        "bounded queue (503 with Retry-After when it is full). Needs the serve extra: pip install 'mlx-compact[serve]'.",
    )
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=_positive_int, default=8080, help="port (default %(default)s)")
    p.add_argument(
        "--api-key",
        default=None,
        metavar="K",
        help="require Authorization: Bearer K on /v1 routes (default: none; set one when --host is not 127.0.0.1)",
    )
    p.add_argument(
        "--media-dir",
        default=None,
        metavar="DIR",
        help="let requests name image files (paths or file:// URLs) inside DIR; without it only data: URIs are taken",
    )
    p.add_argument(
        "--model-id",
        default=None,
        metavar="NAME",
        help="the model name clients send and GET /v1/models lists (default: the model's folder or repo name)",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        metavar="P",
        help="shrink each image to at most P pixels (a request's max_pixels may lower it, never raise it); "
        "default: the model's own limit",
    )
    _add_compaction(p)
    _add_cache(p)
    _add_memory(p, fit=False)
    g = p.add_argument_group("limits (each refused with a 4xx error that names it)")
    g.add_argument(
        "--prefix-cache-size",
        type=_size,
        default=_size("1GB"),
        metavar="SIZE",
        help="memory for conversation prefixes kept between requests, least recently used dropped first "
        "(default 1GB, set aside from the memory budget)",
    )
    g.add_argument("--max-queue", type=int, default=16, metavar="N", help="requests that may wait (default 16)")
    g.add_argument(
        "--max-body-size", type=_size, default=_size("32MB"), metavar="SIZE", help="largest request body (default 32MB)"
    )
    g.add_argument("--max-images", type=_positive_int, default=8, metavar="N", help="images per request (default 8)")
    g.add_argument(
        "--max-messages", type=_positive_int, default=512, metavar="N", help="messages per request (default 512)"
    )
    g.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=50_000_000,
        metavar="P",
        help="largest image taken, in pixels before any shrinking (default 50000000)",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=_positive_int,
        default=32768,
        metavar="N",
        help="longest conversation, in text tokens (default 32768)",
    )
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="uvicorn's log level"
    )
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("mlx-compact serve needs Starlette and uvicorn: pip install 'mlx-compact[serve]'") from None
    from mlx_compact.loader import resolve
    from mlx_compact.serve.app import Settings, serve
    from mlx_compact.serve.conversation import Limits, media_folder

    _check_cache_args(args)
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    path = resolve(args.model)  # a bad model name fails here, before the server starts
    name = args.model_id or (args.model.rstrip("/").split("/")[-1] if args.model else "qwen3-vl-tiny")
    settings = Settings(
        model=str(path),
        model_id=name,
        api_key=args.api_key,
        media_dir=media_folder(args.media_dir),
        max_pixels=args.max_pixels,
        compaction=_compaction(args),
        max_kv_size=args.max_kv_tokens,
        kv_bits=args.kv_bits,
        memory_budget=args.memory_budget,
        prefix_cache_size=args.prefix_cache_size,
        max_queue=args.max_queue,
        max_body_size=args.max_body_size,
        max_prompt_tokens=args.max_prompt_tokens,
        limits=Limits(
            max_images=args.max_images, max_image_pixels=args.max_image_pixels, max_messages=args.max_messages
        ),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        _say(f"warning: serving on {args.host} without --api-key: anyone who reaches this address can use the model")
    _say(f"serving {name} on http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)")
    serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# ---------------------------------------------------------------- batch


def add_batch_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="answer a prompt about every image of a folder, one JSON line each, resumably",
        description="Answer a prompt about each image of a folder (or glob), with a progress bar: one JSON line per "
        "image (file, answer, visual tokens kept, timings) appended to --out as it is done. An image that cannot be "
        "read is reported in one line and skipped; the batch goes on (exit code 2 at the end when any was skipped). "
        "--resume continues an interrupted batch without redoing the images already in --out. Memory is planned "
        "once, for the largest image, before anything runs.",
    )
    _add_model(p)
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR|GLOB",
        help="a folder of images (in name order) or a glob such as 'photos/**/*.jpg'",
    )
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", default=None, help="the prompt for every image")
    prompt.add_argument(
        "--prompts", default=None, metavar="FILE", help="a text file with one prompt per image, in the images' order"
    )
    p.add_argument("--out", default="results.jsonl", metavar="FILE", help="the JSON Lines output (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue --out: skip the images it already answers")
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        metavar="P",
        help="shrink each image to at most P pixels (fewer visual tokens, faster); default: the model's own limit",
    )
    _add_compaction(p)
    _add_cache(p)
    _add_sampling(p)
    _add_memory(p, fit=False)
    p.set_defaults(run=run_batch)


def run_batch(args) -> int:
    from tqdm import tqdm

    from mlx_compact.batch import list_images, read_prompts
    from mlx_compact.batch import run_batch as batch
    from mlx_compact.loader import load

    _check_cache_args(args)
    c = _compaction(args)
    files = list_images(args.images)
    prompts = read_prompts(args.prompts, len(files)) if args.prompts else [args.prompt] * len(files)
    model, processor = load(args.model, memory_budget=args.memory_budget)

    def report(file: str, message: str) -> None:
        tqdm.write(f"mlx-compact batch: skipped {file}: {message}", file=sys.stderr)

    counts = batch(
        model,
        processor,
        files,
        prompts,
        args.out,
        resume=args.resume,
        on_error=report,
        progress=sys.stderr.isatty(),
        **_sampling(args),
        seed=args.seed,
        max_pixels=args.max_pixels,
        compaction=c,
        max_kv_size=args.max_kv_tokens,
        kv_bits=args.kv_bits,
        memory_budget=args.memory_budget,
    )
    resumed = f", {counts['resumed']} already in {args.out}" if counts["resumed"] else ""
    _say(f"{counts['answered']} answered, {counts['skipped']} skipped{resumed}: {args.out}")
    return EXIT_USAGE if counts["skipped"] else 0


# Subcommands, in help order.
SUBCOMMANDS = [
    add_generate_parser,
    add_chat_parser,
    add_plan_parser,
    add_convert_parser,
    add_serve_parser,
    add_batch_parser,
]


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlx-compact",
        description="Qwen-VL vision-language models on MLX, with compact visual "
        "tokens, a fixed-size KV cache and a memory plan before every run.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {mlx_compact.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    """Run the `mlx-compact` command line; return the exit code."""
    args = build_parser().parse_args(argv)
    from mlx_compact.convert import ConvertError
    from mlx_compact.loader import LoadError
    from mlx_compact.memory import MemoryPlanError
    from mlx_compact.pipeline import EXIT_LOST, PipelineError, process_rank

    try:
        return args.run(args)
    except (InputError, LoadError, ConvertError, MemoryPlanError, FileNotFoundError, PermissionError) as e:
        if not getattr(args, "pipeline", False) or process_rank() == 0:  # each rank refuses; rank 0 says why
            print(f"mlx-compact {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineError as e:
        print(f"mlx-compact {args.command}: {_one_line(e)}", file=sys.stderr)
        return EXIT_LOST
    except KeyboardInterrupt:
        print(f"\nmlx-compact {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mlx-compact generate ... | head -1`
        sys.stderr.close()
        return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
