"""Pipeline parallelism (`mlx_compact.pipeline`): two ranks on this machine over MLX's ring backend on 127.0.0.1.

One ``mlx.launch --backend ring -n 2`` runs every architecture's checks (tests/pipeline_runs.py), compared here
with the same runs in this one process; the failure tests start the two ranks as mlx.launch does on one machine
(MLX_RANK and MLX_HOSTFILE) but without its supervisor, which would end the survivor itself: what ends it here
is the pipeline's own detection.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mlx_compact.generate import make_prompt_cache
from mlx_compact.loader import DEFAULT_MODEL, load_model
from mlx_compact.pipeline import fitting_split, layer_split, owners, parse_split
from mlx_compact.processor import Processor

HERE = Path(__file__).parent
RUNS = str(HERE / "pipeline_runs.py")
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"  # the mlx.launch command
ARCHS = (("qwen2_vl", {"tie_word_embeddings": True}), ("qwen2_5_vl", {}), ("qwen3_vl", {}), ("qwen3_vl_moe", {}))


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no two consecutive free ports")


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    env.pop("MLX_RANK", None)
    return env


def test_layer_split_is_by_bytes_and_in_proportion_to_memory():
    layers = [10] * 8
    assert layer_split(layers, [0, 0], [1, 1]) == [4, 4]
    assert layer_split(layers, [20, 0], [1, 1]) == [3, 5]  # rank 0 also holds the vision tower (20)
    assert layer_split(layers, [0, 0], [3, 1]) == [6, 2]  # a Mac with 3x the memory takes 3x the bytes
    assert layer_split(layers, [0, 0, 0], [1, 1, 1]) == [3, 2, 3]  # each layer to the rank holding its middle byte
    assert layer_split(layers, [1000, 0], [1, 1]) == [1, 7]  # never fewer than one layer a rank
    with pytest.raises(ValueError, match="too few"):
        layer_split([10], [0, 0], [1, 1])


def test_fitting_split_fills_each_rank_to_its_budget():
    assert fitting_split([10] * 8, [5, 0], [40, 100]) == [3, 5]
    assert fitting_split([10] * 8, [5, 0], [40, 40]) is None
    assert fitting_split([10] * 4, [0, 0], [100, 100]) == [3, 1]  # a layer is left for the last rank


def test_layer_split_option_and_owners():
    assert parse_split("20,12") == [20, 12] and parse_split(None) is None
    for bad in ("a,b", "3,0", "3,-1"):
        with pytest.raises(ValueError, match="--layer-split"):
            parse_split(bad)
    split = [2, 3]
    assert owners("language_model.model.layers.1.mlp.up_proj.weight", split, False) == {0}
    assert owners("language_model.model.layers.2.mlp.up_proj.weight", split, False) == {1}
    assert owners("vision_tower.blocks.0.attn.qkv.weight", split, False) == {0}
    assert owners("language_model.model.embed_tokens.weight", split, False) == {0}
    assert owners("language_model.model.embed_tokens.weight", split, True) == {0, 1}
    assert owners("language_model.lm_head.weight", split, False) == {1}


def test_one_process_pipeline_option_changes_nothing(tiny_checkpoint):
    model = load_model(tiny_checkpoint("qwen2_vl"), pipeline=True)  # not launched: one rank
    assert model.language_model.pipeline is None and len(make_prompt_cache(model)) == len(model.layers)


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Every architecture: the tiny random checkpoints (the hybrids' first attention layer is layer 1, so rank 0
    takes two of their four layers) and the bundled model."""
    from tiny_hybrid import HYBRIDS, make_checkpoint

    hybrids = [str(make_checkpoint(arch, tmp_path_factory.mktemp(arch))) for arch in HYBRIDS]
    return [str(tiny_checkpoint(arch, **variant)) for arch, variant in ARCHS] + hybrids + [DEFAULT_MODEL]


@pytest.fixture(scope="module")
def launched(checkpoints, tmp_path_factory):
    """What rank 0 of one ``mlx.launch --backend ring -n 2`` run got for every checkpoint."""
    out = tmp_path_factory.mktemp("pipeline") / "runs.json"
    port = _free_port_pair()
    cmd = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(port)]
    cmd += ["--", sys.executable, RUNS, str(out), *checkpoints]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_ranks_give_the_one_process_answers_and_logits(launched, checkpoints):
    import pipeline_runs

    for path in checkpoints:
        got = launched[path]
        assert len(got["split"]) == 2 and min(got["split"]) >= 1, got["split"]
        ref = pipeline_runs.runs(load_model(path), Processor.from_pretrained(path))
        for name in ("image", "compaction", "fixed", "chat"):
            for a, b in zip(*(x[name] if name == "chat" else [x[name]] for x in (ref, got))):
                assert a["tokens"] == b["tokens"], (path, name)
                np.testing.assert_allclose(np.array(b["logprobs"]), np.array(a["logprobs"]), atol=1e-6, rtol=0)
                assert a["evicted"] == b["evicted"]
        (rank1,) = got["image"]["ranks"]  # reported after the run by the other rank
        assert rank1["rank"] == 1 and rank1["weights_bytes"] > 0 and rank1["peak_memory_bytes"] > 0
        if path != DEFAULT_MODEL:  # the shipped model answers in one word: only the tiny ones rotate
            assert got["fixed"]["evicted"] > 0


def test_every_rank_plans_and_refuses_with_one_message_naming_the_rank(launched, checkpoints):
    for path in checkpoints:
        got = launched[path]
        assert "rank 0 would hold" in got["refused"] and "the vision tower and embeddings" in got["refused"]
        assert "what would fit" in got["refused"]
        if got["split"][1] > got["split"][0]:  # rank 1 holds more layers, so more KV
            plan = got["plan"]
            assert plan["peak0"] <= plan["budget"] < plan["peak1"]
            assert plan["message"].startswith("rank 1 of the pipeline would need")
            assert "kv_bits=" in plan["message"]  # a quantized cache is what would fit


def _start_pair(checkpoint: str, timeout: float, tmp_path) -> list:
    """Both ranks of ``mlx-compact generate --pipeline`` on a long answer, once rank 0 is printing it."""
    port = _free_port_pair()
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    cmd = [sys.executable, "-m", "mlx_compact.cli", "generate", "--pipeline", "--model", checkpoint]
    cmd += ["--layer-split", "1,2", "--pipeline-timeout", str(timeout), "--prompt", "Tell a long story."]
    cmd += ["--max-tokens", "100000"]  # the tiny random model never ends on its own
    procs, answer = [], tmp_path / "answer.txt"
    for rank in (0, 1):
        env = dict(_env(), MLX_RANK=str(rank), MLX_HOSTFILE=str(hosts))
        out = open(answer, "wb") if rank == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE))
    t = time.monotonic()
    while answer.stat().st_size < 64:  # rank 0 is streaming its answer
        assert procs[0].poll() is None and time.monotonic() - t < 60, procs[0].stderr.read()[-2000:]
        time.sleep(0.05)
    return procs


def _ends_within(proc, bound: float) -> tuple:
    t = time.monotonic()
    try:
        proc.wait(timeout=bound)
    finally:
        proc.kill()
    return proc.returncode, time.monotonic() - t, proc.stderr.read().decode().strip().splitlines()


def test_a_killed_rank_ends_the_other_within_seconds_with_one_line(tiny_checkpoint, tmp_path):
    procs = _start_pair(str(tiny_checkpoint("qwen3_vl_moe")), 30.0, tmp_path)
    os.kill(procs[1].pid, signal.SIGKILL)  # MLX's ring backend fails rank 0's pending transfer
    rc, waited, lines = _ends_within(procs[0], bound=15)  # 1.0 s here on a quiet machine, 5.5 s at load 12
    procs[1].wait()
    print(f"rank 1 killed: rank 0 ended after {waited:.2f} s")
    assert rc == 1 and len(lines) == 1, (rc, lines)
    assert lines[0].startswith("mlx-compact generate: rank 0: lost the connection to rank 1"), lines


def test_a_rank_that_stops_answering_ends_the_others_within_the_timeout(tiny_checkpoint, tmp_path):
    timeout = 2.0
    procs = _start_pair(str(tiny_checkpoint("qwen3_vl_moe")), timeout, tmp_path)
    os.kill(procs[1].pid, signal.SIGSTOP)  # a link that breaks without closing: nothing tells rank 0
    rc, waited, lines = _ends_within(procs[0], bound=timeout + 8)
    print(f"rank 1 stopped: rank 0 ended after {waited:.2f} s")
    assert rc == 1 and waited >= timeout and len(lines) == 1, (rc, waited, lines)
    assert "rank 0: waiting for the logits from rank 1 got no answer in 2 s; ending" in lines[0], lines
    os.kill(procs[1].pid, signal.SIGCONT)  # rank 1 finds rank 0 gone (or its own wait too long), and says so
    rc, waited, lines = _ends_within(procs[1], bound=10)
    print(f"rank 0 gone: rank 1 ended after {waited:.2f} s")
    assert rc == 1 and len(lines) == 1, (rc, lines)
    assert lines[0].startswith("mlx-compact: rank 1: ") and "rank 0" in lines[0] and lines[0].endswith("ending")


def test_ranks_other_than_0_leave_the_images_to_rank_0(tiny_checkpoint, tmp_path, monkeypatch):
    """An image need only exist on the first Mac: the other ranks never read it (rank 0 encodes it)."""
    import mlx_compact.pipeline
    from mlx_compact import cli

    args = cli.build_parser().parse_args(
        ["generate", "--pipeline", "--model", str(tiny_checkpoint("qwen2_vl")), "--prompt", "Hi"]
        + ["--image", str(tmp_path / "only-on-the-first-mac.png")]
    )
    monkeypatch.setattr(mlx_compact.pipeline, "process_rank", lambda: 1)
    _, _, _, images, videos = cli._load_checked(args)  # not launched: one process, which loads normally
    assert images == [] and videos == []
    monkeypatch.setattr(mlx_compact.pipeline, "process_rank", lambda: 0)
    with pytest.raises(cli.InputError, match="only-on-the-first-mac"):
        cli._load_checked(args)
