"""Pipeline parallelism on this machine: each rank's memory, and tokens/s against one process.

A converted directory at Qwen2.5-VL-3B widths and reduced depth (`bench_port.write_e2e_checkpoint`: random
weights, the tied embeddings limited to word tokens so no reply ends early) is run by the public API,
``mlx_compact.load`` + ``stream_generate`` with an image, alternately in one process and as a two-rank
pipeline (``mlx.launch --backend ring -n 2`` over 127.0.0.1), both pinned to ONE core (``taskset -c 1``), after
one warm-up generation each run. Per rank: the bytes of its parameters (its LLM layers apart), MLX's peak
memory and the process's peak resident memory; per run: time to first token and decode tokens/s.

Both ranks share the one core, so the pipeline cannot be faster here: the tokens/s ratio measures the pipeline's
overhead (messages, waiting, two processes on one core), not the speedup two Macs give (none for one sequence:
the ranks take turns; what two Macs buy is memory).

    python benchmarks/bench_pipeline.py [--llm-layers 8] [--repeats 3] [--tokens 32]

writes benchmarks/results/bench_pipeline.json and prints a table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (imports mlx_compact before mlx.core)

HERE = Path(__file__).resolve()
MiB = common.MiB
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"  # mlx.launch


def side(args) -> None:
    """One run (in one process, or on one rank of a pipeline): write this rank's figures as JSON."""
    import mlx_compact
    from mlx_compact.pipeline import memory_report, pipeline_of, process_rank

    rank = process_rank() if args.pipeline else 0
    out = Path(args.out) / f"rank{rank}.json"
    model, processor = mlx_compact.load(args.dir, pipeline=args.pipeline)  # ranks > 0 serve inside, then exit
    image = str(Path(args.dir) / "image.png")

    def run(n):
        last = None
        for r in mlx_compact.stream_generate(
            model, processor, "what is in the picture?", [image], max_tokens=n, max_pixels=args.max_pixels
        ):
            last = r
        return last.stats

    run(2)  # warm-up
    stats = run(args.tokens)
    pipe = pipeline_of(model)
    ranks = [(0, *memory_report(model))] + (pipe.memory() if pipe is not None else [])
    result = {
        "split": pipe.split if pipe else None,
        "ttft_s": sum(stats["ttft_s"].values()),
        "decode_tok_s": stats["decode_tokens_per_s"],
        "generated": stats["generation_tokens"],
        "ranks": {
            str(r): {"peak_mib": peak / MiB, "rss_mib": rss / MiB, "param_mib": par / MiB, "llm_layer_mib": lay / MiB}
            for r, peak, rss, par, lay in ranks
        },
    }
    out.write_text(json.dumps(result))


def one_run(args, pipeline: bool, work: Path) -> dict:
    cmd = ["taskset", "-c", "1"]
    if pipeline:
        cmd += [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(args.port), "--"]
    cmd += [sys.executable, str(HERE), "--side", "--dir", str(args.dir), "--out", str(work)]
    cmd += ["--tokens", str(args.tokens), "--max-pixels", str(args.max_pixels)] + (["--pipeline"] if pipeline else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((work / "rank0.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-layers", type=int, default=8)
    p.add_argument("--vit-layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--max-pixels", type=int, default=128 * 28 * 28, help="the image's size (about 128 visual tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=43210)
    p.add_argument("--dir", default=None, help="keep (and reuse) the converted directory here")
    p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return side(args)
    import bench_port

    args.dir = Path(args.dir or tempfile.mkdtemp(prefix="mlx-compact-pipeline-"))
    bench_port.write_e2e_checkpoint("qwen2_5_vl", args, args.dir)
    runs = {"one": [], "pipeline": []}
    for i in range(args.repeats):
        for name in ("one", "pipeline"):  # alternating
            with tempfile.TemporaryDirectory() as work:
                runs[name].append(one_run(args, name == "pipeline", Path(work)))
            print(f"run {i + 1}/{args.repeats} {name}: {runs[name][-1]['decode_tok_s']:.2f} tok/s", flush=True)
    med = {n: statistics.median(r["decode_tok_s"] for r in rs) for n, rs in runs.items()}
    ttft = {n: statistics.median(r["ttft_s"] for r in rs) for n, rs in runs.items()}
    result = {
        "config": {**vars(args), "dir": None, "widths": "Qwen2.5-VL-3B", "pinned": "taskset -c 1"},
        "environment": common.environment(),
        "decode_tok_s_median": med,
        "ttft_s_median": ttft,
        "decode_ratio_pipeline_over_one": med["pipeline"] / med["one"],
        "memory": {"one": runs["one"][-1]["ranks"], "pipeline": runs["pipeline"][-1]["ranks"]},
        "split": runs["pipeline"][-1]["split"],
        "runs": runs,
    }
    common.write_json("bench_pipeline.json", result)
    print(table(result))


def table(res: dict) -> str:
    rows = ["| | params MiB | of which LLM layers | MLX peak MiB | peak RSS MiB |", "|---|---|---|---|---|"]
    one = res["memory"]["one"]["0"]
    rows.append(
        f"| one process | {one['param_mib']:.0f} | {one['llm_layer_mib']:.0f} | {one['peak_mib']:.0f} | "
        f"{one['rss_mib']:.0f} |"
    )
    for r, m in sorted(res["memory"]["pipeline"].items()):
        rows.append(
            f"| rank {r} | {m.get('param_mib', 0):.0f} | {m.get('llm_layer_mib', 0):.0f} | "
            f"{m['peak_mib']:.0f} | {m['rss_mib']:.0f} |"
        )
    med, ttft = res["decode_tok_s_median"], res["ttft_s_median"]
    rows += [
        "",
        f"layer split {res['split']}; decode {med['one']:.2f} tok/s one process, {med['pipeline']:.2f} pipelined "
        f"(ratio {res['decode_ratio_pipeline_over_one']:.2f}: overhead, both ranks on one core); TTFT "
        f"{ttft['one']:.2f} s / {ttft['pipeline']:.2f} s (medians of {res['config']['repeats']})",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
