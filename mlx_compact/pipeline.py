"""One model across several Macs: pipeline-parallel LLM layers over ``mx.distributed``.

Under ``mlx.launch`` every rank runs the same command; ``load(..., pipeline=True)`` gives each rank a contiguous
share of the LLM layers (split by bytes, in proportion to each rank's memory, or as ``layer_split`` says) and reads
only its own tensors. Rank 0 also holds the vision tower and the embeddings: it preprocesses, encodes, compacts and
assembles, runs its layers, and sends the hidden states on; each rank runs its layers over its own caches and sends
on; the last rank holds the final norm and LM head and sends the logits back to rank 0, which samples. Ranks other
than 0 print nothing: they serve rank 0's requests (`serve`) until rank 0 ends.

Only MLX's own engine carries data (``mx.distributed.send`` / ``recv`` to ring neighbours, ``all_sum`` while
loading). Every message starts with a fixed-size header; rank 0 drives, in this order, to rank 1, rank 1 to
rank 2, ..., and the last rank answers rank 0. Caches live on the rank that owns the layer: on rank 0 a
conversation's cache list is its own layers' caches plus one `RemoteCaches`, which stands for the other ranks'
caches in every operation the runtime applies to the list (pin, trim, bytes).

Failure: a rank that dies closes its connections, and MLX's ring backend fails the pending send / recv of its
neighbours within about a second; a peer that stops answering is caught by a watchdog once a transfer has waited
``timeout`` seconds. Either way the rank prints one line (rank 0 for every rank it lost, another rank only when it
lost rank 0) and exits with status 1.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence

import mlx.core as mx

from .files import InputError

EXIT_LOST = 1
DEFAULT_TIMEOUT = 300.0  # seconds one transfer may wait, compute of the ranks after it included

# message ops (the first entry of every header)
FORWARD, CREATE, FREE, PIN, TRIM, TRIMMABLE, NBYTES, PLAN, MEMORY, CLOSE = range(1, 11)
HEADER = 10  # int32 entries of a header
ANSWER = 4  # int64 entries of each rank's answer to a query
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


class PipelineError(RuntimeError):
    """A rank of the pipeline was lost (it died, or the connection to it broke or stopped answering)."""


def group_size() -> int:
    """Ranks of the distributed group this process was launched in (1 when not under ``mlx.launch``)."""
    if not mx.distributed.is_available():
        return 1
    return mx.distributed.init().size()


def process_rank() -> int:
    """This process's rank under ``mlx.launch`` (0 when not launched)."""
    return mx.distributed.init().rank() if mx.distributed.is_available() else 0


def parse_split(text: str | Sequence[int] | None) -> list[int] | None:
    """``"20,12"`` (or a list) -> [20, 12]: the layers of each rank, in rank order; None stays None."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        split = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise InputError(f"--layer-split must be whole numbers separated by commas, like 20,12; got {text!r}") from None
    if any(s < 1 for s in split):
        raise InputError(f"--layer-split gives every rank at least one layer; got {text!r}")
    return split


def layer_split(
    layer_bytes: Sequence[int], fixed: Sequence[int], memory: Sequence[int], min_first: int = 1
) -> list[int]:
    """Contiguous layer counts per rank, so that each rank's bytes (``fixed[r]``: what it holds besides layers,
    such as rank 0's vision tower and embeddings) are in proportion to its ``memory``. Every rank gets at least
    one layer, rank 0 at least ``min_first``."""
    n, size = len(layer_bytes), len(memory)
    if n < size or min_first > n - (size - 1):
        raise InputError(f"the model has {n} LLM layers: too few for {size} ranks")
    total = sum(layer_bytes) + sum(fixed)
    weight = sum(memory) or size
    split, i, acc, bound = [], 0, 0, 0.0
    for r in range(size):
        bound += total * ((memory[r] or 1) if sum(memory) else 1) / weight
        acc += fixed[r]
        left = size - 1 - r
        count = 0
        while i < n - left and (
            r == size - 1 or count < (min_first if r == 0 else 1) or acc + layer_bytes[i] / 2 <= bound
        ):
            acc += layer_bytes[i]
            i += 1
            count += 1
        split.append(count)
    return split


def fitting_split(layer_bytes: Sequence[int], fixed: Sequence[int], budgets: Sequence[int], min_first: int = 1):
    """A layer split under which every rank's bytes are within its budget (ranks filled in order, each as far
    as it fits while leaving a layer to each rank after it), or None when there is none."""
    n, size = len(layer_bytes), len(budgets)
    split, i = [], 0
    for r in range(size):
        acc, count, left = fixed[r], 0, size - 1 - r
        while i < n - left and (acc + layer_bytes[i] <= budgets[r] or r == size - 1):
            acc += layer_bytes[i]
            i += 1
            count += 1
        if count < (min_first if r == 0 else 1) or acc > budgets[r]:
            return None
        split.append(count)
    return split


LAYER_PREFIX = "language_model.model.layers."


def layer_of(name: str) -> int | None:
    """The LLM layer a parameter name belongs to, or None."""
    return int(name[len(LAYER_PREFIX) :].split(".")[0]) if name.startswith(LAYER_PREFIX) else None


def owners(name: str, split: Sequence[int], tied: bool) -> set[int]:
    """The ranks that hold parameter ``name``: a layer's rank; the vision tower and the embeddings on rank 0;
    the final norm and LM head on the last rank (the embeddings too when tied)."""
    last, layer = len(split) - 1, layer_of(name)
    if layer is not None:
        stops = list(itertools.accumulate(split))
        return {next(r for r, stop in enumerate(stops) if layer < stop)}
    if name.startswith("language_model.model.embed_tokens."):
        return {0, last} if tied else {0}
    if name.startswith(("language_model.model.norm.", "language_model.lm_head.")):
        return {last}
    return {0}  # the vision tower


def gather(values: Sequence[int], group) -> list[list[int]]:
    """Every rank's ``values`` (the same count on each), by one ``all_sum`` of a row per rank."""
    rows = mx.zeros((group.size(), len(values)), dtype=mx.int64)
    rows[group.rank()] = mx.array([int(v) for v in values], dtype=mx.int64)
    total = mx.distributed.all_sum(rows, group=group, stream=mx.cpu)
    mx.eval(total)
    return total.tolist()


class Watchdog:
    """Ends the process with one line when a transfer waits past its deadline (a peer that stopped answering:
    a broken link never closes the socket, so MLX's ring backend would wait for ever). While a transfer runs,
    file descriptor 2 points at /dev/null: MLX's ring backend reports every retry there, and the one line this
    module prints says what happened."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.deadline, self.what = None, ""
        self._stderr = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        threading.Thread(target=self._watch, daemon=True, name="pipeline-watchdog").start()

    def say(self, line: str) -> None:
        """One line on the real stderr (even while fd 2 is muted)."""
        sys.stdout.flush()
        os.write(self._stderr, (line.rstrip("\n") + "\n").encode())

    def _watch(self) -> None:
        while True:
            time.sleep(0.2)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                self.say(f"mlx-compact: rank {self.rank}: {self.what} got no answer in {self.timeout:g} s; ending")
                os._exit(EXIT_LOST)

    @contextlib.contextmanager
    def transfer(self, what: str, bounded: bool = True):
        self.what = what
        self.deadline = time.monotonic() + self.timeout if bounded else None
        sys.stderr.flush()
        os.dup2(self._null, 2)
        try:
            yield
        finally:
            os.dup2(self._stderr, 2)
            self.deadline = None


class Pipeline:
    """This rank's place in the pipeline: ``split`` (layers per rank), ``rank``, ``size``, the group, and the
    messages between ranks. Rank 0 calls `forward` (from the language model) and the cache commands; every
    other rank runs `serve`."""

    def __init__(self, group, split: Sequence[int], timeout: float = DEFAULT_TIMEOUT):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.split = list(split)
        self.stops = list(itertools.accumulate(self.split))
        self.first = self.stops[self.rank] - self.split[self.rank]
        self.stop = self.stops[self.rank]
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.last = self.rank == self.size - 1
        self.watchdog = Watchdog(self.rank, timeout)
        self._ids = itertools.count(1)
        self._freed: list[int] = []
        self.closed = False
        self.broken: str | None = None  # why the pipeline stopped (a lost rank): nothing is sent after it

    def layers_of(self, rank: int) -> range:
        return range(self.stops[rank] - self.split[rank], self.stops[rank])

    # ------------------------------------------------------------ transfers

    def _lost(self, peer: int, e: Exception):
        line = f"mlx-compact: rank {self.rank}: lost the connection to rank {peer} ({e}); ending"
        if self.rank == 0:
            # MLX's ring backend fails the pending transfer, but a later one on the lost connection would wait for
            # ever: this pipeline sends and receives nothing more
            self.broken = line.removeprefix("mlx-compact: ")
            raise PipelineError(self.broken) from None
        if peer == 0:  # rank 0 can no longer say it
            self.watchdog.say(line)
        os._exit(EXIT_LOST)

    def _send(self, x: mx.array, what: str = "sending") -> None:
        if self.broken:
            raise PipelineError(self.broken)
        try:
            with self.watchdog.transfer(f"{what} to rank {self.next}"):
                mx.eval(mx.distributed.send(x, self.next, group=self.group))
        except RuntimeError as e:
            self._lost(self.next, e)

    def _recv(self, shape, dtype, src: int, what: str = "waiting", bounded: bool = True) -> mx.array:
        if self.broken:
            raise PipelineError(self.broken)
        try:
            with self.watchdog.transfer(f"{what} from rank {src}", bounded):
                y = mx.distributed.recv(tuple(shape), dtype, src, group=self.group)
                mx.eval(y)
        except RuntimeError as e:
            self._lost(src, e)
        return y

    def _header(self, op: int, *values: int) -> mx.array:
        h = [op, *values] + [0] * (HEADER - 1 - len(values))
        return mx.array(h, dtype=mx.int32)

    def command(self, op: int, *values: int) -> None:
        """Rank 0: a command that every other rank applies in turn (no answer)."""
        self._flush()
        self._send(self._header(op, *values))

    def query(self, op: int, *values: int) -> list[list[int]]:
        """Rank 0: a command every other rank answers with `ANSWER` numbers (row r: rank r's; row 0 unused)."""
        self._flush()
        self._send(self._header(op, *values))
        self._send(mx.zeros((self.size, ANSWER), dtype=mx.int64))
        return self._recv((self.size, ANSWER), mx.int64, self.size - 1, "waiting for the answer").tolist()

    def _flush(self) -> None:
        while self._freed:
            self._send(self._header(FREE, self._freed.pop()))

    # ------------------------------------------------------------ rank 0

    def forward(self, lm, h, positions, cache, deepstack, last_only: bool, key_bias) -> mx.array:
        """Rank 0: send this rank's hidden states [1, L, D] (and what the other ranks need of the call) on, and
        return the logits the last rank sends back ([1, L | 1, V])."""
        remote = cache[-1] if cache and isinstance(cache[-1], RemoteCaches) else None
        if remote is None:
            raise ValueError("a pipelined model runs over a cache from make_prompt_cache (it holds the other ranks')")
        self._flush()
        L = h.shape[1]
        ds = list(deepstack[self.stop :]) if deepstack is not None else []
        flags = int(last_only) | (key_bias is not None) << 1
        self._send(self._header(FORWARD, remote.id, L, flags, len(ds), DTYPES.index(h.dtype), self.stop))
        self._send(positions.astype(mx.int32))
        if key_bias is not None:
            self._send(key_bias.astype(mx.float32))
        for d in ds:
            self._send(d.astype(h.dtype))
        self._send(h, "sending hidden states")
        V = lm.cfg.vocab_size
        return self._recv((h.shape[0], 1 if last_only else L, V), h.dtype, self.size - 1, "waiting for the logits")

    def plan_ranks(self, *values: int) -> list[tuple[int, int, int]]:
        """Rank 0: (rank, peak, budget) of every other rank for a run (`memory.stage_plan`'s arguments)."""
        rows = self.query(PLAN, *values)
        return [(r, rows[r][0], rows[r][1]) for r in range(1, self.size)]

    def memory(self, reset: bool = False) -> list[tuple[int, ...]]:
        """Rank 0: (rank, MLX peak, peak resident set, parameter bytes, LLM layer bytes) of every other rank; the
        MLX peaks since the last ``reset`` (or the start), which ``reset`` then starts again."""
        rows = self.query(MEMORY, int(reset))
        return [(r, *rows[r]) for r in range(1, self.size)]

    def close(self) -> None:
        """Rank 0: end every other rank's `serve` (they exit)."""
        if not self.closed and self.rank == 0:
            self.closed = True
            with contextlib.suppress(PipelineError):
                self.command(CLOSE)

    # ------------------------------------------------------------ the other ranks

    def serve(self, model) -> None:
        """Ranks other than 0: apply rank 0's messages to this rank's layers and caches until rank 0 closes."""
        from .generate import model_caches

        lm = model.language_model
        caches: dict[int, list] = {}
        while True:
            head = self._recv((HEADER,), mx.int32, self.prev, "waiting for work", bounded=False).tolist()
            op, cid = head[0], head[1]
            if op == FORWARD:
                self._serve_forward(lm, caches[cid], head)
                continue
            if op == CREATE:
                max_kv, bits, group = head[2:5]
                caches[cid] = model_caches(model, max_kv or None, bits or None, group or None)
            elif op == FREE:
                caches.pop(cid, None)
            elif op == PIN:
                for c in caches[cid]:
                    if hasattr(c, "pin"):  # a fixed-size KV cache (not a linear state)
                        c.pin(head[2])
            elif op == TRIM:
                for c in caches[cid]:
                    c.trim(head[2])
            if not self.last:
                self._send(mx.array(head, dtype=mx.int32))
            if op in (TRIMMABLE, NBYTES, PLAN, MEMORY):
                rows = self._recv((self.size, ANSWER), mx.int64, self.prev, "waiting for the answer")
                rows[self.rank] = mx.array(self._answer(op, model, caches.get(cid), head), dtype=mx.int64)
                self._send(rows, "answering")  # the last rank's next is rank 0
            if op == CLOSE:
                return

    def _answer(self, op: int, model, caches, head) -> list[int]:
        if op == TRIMMABLE:
            return [int(all(c.is_trimmable() for c in caches)), 0, 0, 0]
        if op == NBYTES:
            return [sum(c.nbytes for c in caches), sum(getattr(c, "used_bytes", c.nbytes) for c in caches), 0, 0]
        if op == MEMORY:
            report = memory_report(model)
            if head[1]:
                mx.reset_peak_memory()
            return report
        from .memory import stage_plan

        return list(stage_plan(model, *head[1:9])) + [0, 0]

    def _serve_forward(self, lm, cache: list, head: list) -> None:
        _, cid, L, flags, n_ds, dtype, base = head[:7]
        dtype, D = DTYPES[dtype], lm.cfg.hidden_size
        positions = self._recv((3, 1, L), mx.int32, self.prev)
        key_bias = self._recv((1, L), mx.float32, self.prev) if flags & 2 else None
        ds = [self._recv((1, L, D), dtype, self.prev) for _ in range(n_ds)]  # DeepStack of layers base, base + 1, ..
        h = self._recv((1, L, D), dtype, self.prev, "waiting for hidden states")
        last_only = bool(flags & 1)
        h = lm.stage(h, positions, cache, [None] * base + ds if ds else None, None, last_only, key_bias)
        if self.last:
            self._send(lm.head(h, last_only).astype(dtype), "sending the logits")
        else:
            ds = ds[max(0, self.stop - base) :]  # the next ranks' DeepStack rows only
            self._send(self._header(FORWARD, cid, L, flags, len(ds), head[5], max(base, self.stop)))
            self._send(positions)
            if key_bias is not None:
                self._send(key_bias)
            for d in ds:
                self._send(d)
            self._send(h, "sending hidden states")
        mx.eval([c.state for c in cache])


class RemoteCaches:
    """On rank 0, the caches of every other rank's layers for one conversation, as the last element of the cache
    list: the list-wide operations of the runtime (pin, trim, is_trimmable, nbytes, state) reach them through it."""

    def __init__(self, pipe: Pipeline, max_kv_size=None, kv_bits=None, kv_group_size=None):
        self.pipe, self.id = pipe, next(pipe._ids)
        pipe.command(CREATE, self.id, max_kv_size or 0, kv_bits or 0, kv_group_size or 0)
        weakref.finalize(self, pipe._freed.append, self.id)

    @property
    def state(self) -> list:
        return []  # nothing of theirs lives here

    def pin(self, n: int) -> None:
        self.pipe.command(PIN, self.id, n)

    def is_trimmable(self) -> bool:
        return all(row[0] for row in self.pipe.query(TRIMMABLE, self.id)[1:])

    def trim(self, n: int) -> int:
        self.pipe.command(TRIM, self.id, n)
        return n

    def _bytes(self, column: int) -> int:
        return sum(row[column] for row in self.pipe.query(NBYTES, self.id)[1:])

    @property
    def nbytes(self) -> int:
        return self._bytes(0)

    @property
    def used_bytes(self) -> int:
        return self._bytes(1)


def memory_report(model) -> list[int]:
    """[MLX peak memory, peak resident set, parameter bytes, LLM layer bytes] of this process."""
    import resource

    from mlx.utils import tree_flatten

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    layers = sum(v.nbytes for layer in model.layers for _, v in tree_flatten(layer.parameters()))
    return [mx.get_peak_memory(), rss, params, layers]


def pipeline_of(model) -> Pipeline | None:
    """The model's pipeline, or None for a model that runs in one process."""
    lm = getattr(model, "language_model", None)
    return getattr(lm, "pipeline", None)
