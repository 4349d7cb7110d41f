"""`mlx-compact serve` under load, on loopback: concurrent conversations with images and compaction, hostile
requests and clients that leave mid-stream; then the second request of a conversation against its first.

    taskset -c 1 python benchmarks/bench_serve.py   # server and clients on one core

The server is started as a subprocess (`mlx-compact serve`, the bundled model unless --model, --keep 0.5) and
stopped at the end. Load: --clients concurrent clients, each holding one conversation of --requests streamed
requests (the first with its own image as a base64 data URI, the next ones continuing the conversation with
the previous answers), run --passes times (the first pass is the warm-up); every 8th request of a client is
replaced by a hostile one (malformed JSON, broken base64, a remote URL, max_tokens -1, too many images) and
every 5th client leaves each stream after its first chunk. Reported: status counts (5xx must be zero), the
server alive at the end, requests/s, p50/p95 time to first token (first content chunk, client side), the
server's resident memory (VmRSS) sampled every 0.25 s with the value at the end of each pass. Then, with one
client and nothing else running, --pairs conversations alternate a first request (new image) and its second
request: the ratio of the medians of their time to first token (target <= 0.2 on the bundled model), beside the
time to first token of a new text-only conversation as long as the second request's new part (the floor a
request costs without any image or cached prefix).
"""

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ("square", "circle", "triangle")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene(seed: int, size: int) -> str:
    """A PNG data URI: a few coloured blocks on white (the bundled model's kind of picture)."""
    rng = np.random.default_rng(seed)
    a = np.full((size, size, 3), 255, np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        x, y = (int(v) for v in rng.integers(0, size - size // 4, 2))
        a[y : y + size // 4, x : x + size // 4] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Client:
    def __init__(self, port: int):
        self.port = port

    def post(self, body: bytes, stream: bool, leave: bool = False) -> dict:
        """One request; for a stream, the time to the first content chunk and the answer."""
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            out = {"status": r.status, "ttft": None, "text": ""}
            if r.status != 200 or not stream:
                out["body"] = r.read()
                return out
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["status"] = 500
                    break
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if out["ttft"] is None and (delta.get("content") or chunk["choices"][0].get("finish_reason")):
                    out["ttft"] = time.perf_counter() - t0
                out["text"] += delta.get("content") or ""
                out["usage"] = chunk.get("usage") or out.get("usage")
                if leave:
                    out["left"] = True
                    break
            return out
        finally:
            conn.close()


def user(text, image=None):
    content = ([{"type": "image_url", "image_url": {"url": image}}] if image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


QUESTIONS = ("how many shapes are there?", "what colour is the shape?", "is there a circle?", "where is the square?")


def hostile(i: int) -> bytes:
    bad = [
        b'{"messages": [{"role": "user", "content": "unterminated',
        json.dumps({"messages": [user("what is it?", "data:image/png;base64,@@@@")]}).encode(),
        json.dumps({"messages": [user("what is it?", "https://example.com/cat.png")]}).encode(),
        json.dumps({"messages": [user("hello")], "max_tokens": -1}).encode(),
        json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}] * 20}]}
        ).encode(),
    ]
    return bad[i % len(bad)]


def conversation(client: Client, cid: int, n: int, results: list, leave: bool, lock: threading.Lock) -> None:
    messages = [user(QUESTIONS[cid % 4], scene(cid, 160 + 32 * (cid % 4)))]
    for k in range(n):
        if k % 8 == 7:
            r = client.post(hostile(cid + k), stream=False)
            r["kind"] = "hostile"
        else:
            body = {"messages": messages, "max_tokens": 32, "stream": True, "temperature": 0}
            r = client.post(json.dumps(body).encode(), stream=True, leave=leave)
            r["kind"] = "first" if k == 0 else "follow"
            if r["status"] == 200:
                messages = messages + [{"role": "assistant", "content": r["text"]}, user(QUESTIONS[(cid + k + 1) % 4])]
        r.pop("body", None)
        with lock:
            results.append(r)


def get_json(port: int, path: str) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    return json.loads(c.getresponse().read())


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else None


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--passes", type=int, default=3, help="load passes; the first is the warm-up")
    ap.add_argument("--pairs", type=int, default=20, help="first/second request pairs for the TTFT ratio, per size")
    ap.add_argument(
        "--pair-sizes",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[192, 448],
        help="image sides of the pairs",
    )
    ap.add_argument("--keep", default="0.5")
    ap.add_argument("--prefix-cache-size", default="32MB")
    ap.add_argument("--server-cpu", default=None, help="pin the server to this core (taskset -c); default: inherited")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "mlx_compact.cli", "serve", "--port", str(port), "--keep", args.keep]
    cmd += [
        "--max-queue",
        str(2 * args.clients),
        "--prefix-cache-size",
        args.prefix_cache_size,
        "--log-level",
        "warning",
    ]
    if args.model:
        cmd += ["--model", args.model]
    if args.server_cpu is not None:
        cmd = ["taskset", "-c", args.server_cpu] + cmd
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples, stop = [], threading.Event()
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        t_start = time.perf_counter()

        def sample():
            while not stop.is_set():
                samples.append((time.perf_counter() - t_start, rss(server.pid)))
                stop.wait(0.25)

        threading.Thread(target=sample, daemon=True).start()
        client, lock = Client(port), threading.Lock()
        passes = []
        for p in range(args.passes):
            results = []
            t0 = time.perf_counter()
            threads = [
                threading.Thread(
                    target=conversation, args=(client, 1000 * p + i, args.requests, results, i % 5 == 4, lock)
                )
                for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            ok = [r for r in results if r["kind"] != "hostile"]
            ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
            statuses = {}
            for r in results:
                statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
            passes.append(
                {
                    "pass": p,
                    "requests": len(results),
                    "wall_s": wall,
                    "requests_per_s": len(results) / wall,
                    "statuses": statuses,
                    "server_errors": sum(1 for r in results if r["status"] >= 500),
                    "left_mid_stream": sum(1 for r in results if r.get("left")),
                    "ttft_p50_s": pct(ttft, 0.5),
                    "ttft_p95_s": pct(ttft, 0.95),
                    "rss_end_bytes": rss(server.pid),
                }
            )
            print(f"pass {p}: {passes[-1]}", flush=True)

        # second request vs first, one client, nothing else running, alternating
        pairs = {}
        for size in args.pair_sizes:
            firsts, seconds, cached, floor = [], [], [], []
            for i in range(args.pairs):
                # the floor: a new conversation without an image, as long as the second request's new part
                r0 = client.post(
                    json.dumps(
                        {"messages": [user(f"{i}: " + QUESTIONS[(i + 1) % 4])], "max_tokens": 32, "stream": True}
                    ).encode(),
                    stream=True,
                )
                floor.append(r0["ttft"])
                messages = [user(QUESTIONS[i % 4], scene(10_000 + i, size))]
                body = {
                    "messages": messages,
                    "max_tokens": 32,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                r1 = client.post(json.dumps(body).encode(), stream=True)
                messages += [{"role": "assistant", "content": r1["text"]}, user(QUESTIONS[(i + 1) % 4])]
                r2 = client.post(json.dumps({**body, "messages": messages}).encode(), stream=True)
                firsts.append(r1["ttft"])
                seconds.append(r2["ttft"])
                cached.append((r1["usage"]["prompt_tokens"], r2["usage"]["prompt_tokens_details"]["cached_tokens"]))
            pairs[size] = {
                "ttft_first_median_s": statistics.median(firsts),
                "ttft_second_median_s": statistics.median(seconds),
                "ratio": statistics.median(seconds) / statistics.median(firsts),
                "ttft_text_only_median_s": statistics.median(floor),
                "first_prompt_tokens": cached[0][0],
                "second_cached_tokens": cached[0][1],
            }
        health = get_json(port, "/health")
        alive = server.poll() is None
    finally:
        stop.set()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    warm = [b for t, b in samples if t >= passes[0]["wall_s"]]
    curve = samples[:: max(1, len(samples) // 40)]
    out = {
        "command": " ".join(["python", *sys.argv]),
        "server_command": " ".join("python" if c == sys.executable else c for c in cmd),
        "server_cpu": args.server_cpu,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "passes": passes,
        "server_alive": alive,
        "health": health,
        "rss_after_warmup_min_bytes": min(warm) if warm else None,
        "rss_after_warmup_max_bytes": max(warm) if warm else None,
        "rss_curve": [(round(t, 2), b) for t, b in curve],
        "second_request_vs_first": pairs,
        "cpu_count": os.cpu_count(),
    }
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    mib = 2**20
    print("\n| pass | requests | req/s | TTFT p50 | TTFT p95 | 5xx | left mid-stream | statuses | RSS at end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in passes:
        print(
            f"| {p['pass']}{' (warm-up)' if p['pass'] == 0 else ''} | {p['requests']} | {p['requests_per_s']:.1f} | "
            f"{p['ttft_p50_s'] * 1e3:.0f} ms | {p['ttft_p95_s'] * 1e3:.0f} ms | {p['server_errors']} | "
            f"{p['left_mid_stream']} | {p['statuses']} | {p['rss_end_bytes'] / mib:.0f} MiB |"
        )
    print(
        f"\nRSS after warm-up: {out['rss_after_warmup_min_bytes'] / mib:.0f} to {out['rss_after_warmup_max_bytes'] / mib:.0f} MiB; "
        f"server alive: {alive}; prefix cache: {health['prefix_cache']}"
    )
    print(f"\nsecond request of a conversation vs its first (median of {args.pairs} pairs each, target <= 0.2):")
    print(
        "| image | first: prompt tokens | TTFT first | second: cached tokens | TTFT second | ratio | "
        "TTFT of a text-only first request |\n|---|---|---|---|---|---|---|"
    )
    for size, r in pairs.items():
        print(
            f"| {size}x{size} | {r['first_prompt_tokens']} | {r['ttft_first_median_s'] * 1e3:.1f} ms | "
            f"{r['second_cached_tokens']} | {r['ttft_second_median_s'] * 1e3:.1f} ms | {r['ratio']:.3f} | "
            f"{r['ttft_text_only_median_s'] * 1e3:.1f} ms |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
