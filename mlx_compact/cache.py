"""KV caches for the language model: a growing one and a fixed-size, pinned, rotating one; and the fixed
state of a hybrid model's linear (Gated DeltaNet) layers, `LinearCache`.

All caches follow mlx-lm's cache protocol (``update_and_fetch``, ``offset``, ``state``,
``meta_state``, ``nbytes``, ``trim``, ``is_trimmable``, ``make_mask``, ``size``, ``empty``).
Keys and values are ``[B, n_kv_heads, L, head_dim]`` and already RoPE-rotated with their
absolute positions, so keys are stored once and never re-rotated.

Call order (one attention layer, ``L`` new tokens)::

    mask = cache.make_mask(L)                      # 1. BEFORE the update (reads cache.offset)
    keys, values = cache.update_and_fetch(k, v)    # 2. writes the L tokens, returns every key held
    out = attend(q, keys, values, scale, mask)     # 3. a float cache; a quantized one (keys and values
    # are (packed, scales, biases) tuples): quantized_attend(q, keys, values, scale, mask, cache.group_size,
    # cache.bits). Both live in mlx_compact.models (vision.attend, language.quantized_attend): the model's own.

``make_mask(L)`` never changes the cache: it describes the keys that the *next*
``update_and_fetch`` of ``L`` tokens will return. Every layer sees the same positions, so a
model may call it once (on its first attention layer's cache, `models.language.attention_cache`)
before its layer loop, as mlx-lm models do. A mask
is ``None`` (every returned key visible), ``"causal"`` (plain causal mask, queries aligned to
the last keys) or a bool array ``[L, n_keys]`` (True = attend).

``FixedKVCache`` semantics (``P`` pinned tokens, ring of ``R = max_tokens - P`` slots,
``window = R - max_chunk + 1``): the query at absolute position ``q`` attends to every
pinned token and to the unpinned tokens in ``(q - window, q]``. The answer does not depend
on how the input was split into chunks. A chunk may hold at most ``max_chunk`` tokens once
it would overwrite something (``offset + L > max_tokens``); before that any size fits.
The window is ``max_chunk - 1`` shorter than the ring because the ring must still hold the
oldest token the first query of a chunk needs after the chunk's last token is written.

Buffers are updated in place by MLX slice assignment. That only stays in place while no
other array or view references the buffer: drop the arrays returned by ``update_and_fetch``
and ``state`` before the next update (a model's forward pass does this naturally).
"""

import json
import os
import stat
import tempfile
from collections.abc import Sequence

import mlx.core as mx

from . import memory
from .files import SAFETENSORS_DTYPES, InputError, checked_file, open_regular, safetensors_header
from .kernels import quantize_rows
from .models.language import attention_cache
from .models.vision import causal_mask

__all__ = [
    "KVCache",
    "FixedKVCache",
    "LinearCache",
    "kv_cache",
    "save_cache",
    "load_cache",
    "read_cache_file",
    "SessionError",
]


def _no_window(window_size: int | None) -> None:
    if window_size is not None:
        raise ValueError("window_size is not supported; FixedKVCache has its own window")


class KVCache:
    """Growing float cache: keeps every token; grows its buffers in steps of 256 tokens."""

    step = 256
    meta_state = ()

    def __init__(self) -> None:
        self.keys = self.values = None  # [B, H, capacity, D]
        self.bias = None  # [B, capacity] float32 key bias, allocated by the first biased update
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        """Append keys/values [B, H, L, D]; return all held [B, H, offset, D]."""
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            grow = (prev + L + self.step - 1) // self.step * self.step - prev
            new_k = mx.zeros((*keys.shape[:2], grow, keys.shape[3]), keys.dtype)  # [B, H, grow, D]
            new_v = mx.zeros((*values.shape[:2], grow, values.shape[3]), values.dtype)
            if self.keys is not None:
                new_k = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)  # [B, H, cap, D]
                new_v = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            self.keys, self.values = new_k, new_v
        self.offset = prev + L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.state

    def update_bias(self, bias: mx.array | None, n: int) -> mx.array | None:
        """Write the key bias [B, n] of the next `n` tokens (None: 0) BEFORE their `update_and_fetch`; return
        the bias of every key held after it [B, offset + n], or None when no bias was ever given.

        A model keeps its tokens' key bias (proportional attention) in its first layer's cache, once for
        every layer; it grows in steps of 256 like the keys."""
        if bias is None and self.bias is None:
            return None
        prev = self.offset
        if self.bias is None or self.bias.shape[1] < prev + n:
            B = bias.shape[0] if bias is not None else self.bias.shape[0]
            old = mx.zeros((B, 0), mx.float32) if self.bias is None else self.bias[:, :prev]
            grow = -(-(prev + n) // self.step) * self.step
            self.bias = mx.concatenate([old, mx.zeros((B, grow - old.shape[1]), mx.float32)], axis=1)  # [B, cap]
        self.bias[:, prev : prev + n] = 0.0 if bias is None else bias.astype(mx.float32)
        return self.bias[:, : prev + n]

    @property
    def key_bias(self) -> mx.array | None:
        """[B, offset] key bias of the held tokens, or None when none was given."""
        return None if self.bias is None else self.bias[:, : self.offset]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """Mask for the next `n` queries; call before `update_and_fetch`."""
        _no_window(window_size)
        return causal_mask(n, self.offset + n) if return_array else None if n == 1 else "causal"

    @property
    def state(self):
        if self.keys is None:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, v):
        self.keys, self.values = v if v else (None, None)
        self.bias = None
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    @key_bias.setter
    def key_bias(self, bias):
        """Restore from `key_bias` (after `state`)."""
        self.bias = None if bias is None else mx.array(bias, dtype=mx.float32)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the buffers grow in steps of 256 tokens)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes + (0 if self.bias is None else self.bias.nbytes)

    @property
    def used_bytes(self) -> int:
        """Bytes of the tokens held."""
        return 0 if self.keys is None else self.nbytes * self.offset // self.keys.shape[2]

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


class FixedKVCache:
    """Fixed-size KV cache: a pinned prefix plus a ring over the rest, float or quantized.

    Args:
        max_tokens: slots per layer; the buffers are allocated once, at this size, on the
            first update (batch, heads, head_dim and dtype come from the first keys).
        pinned: number of leading tokens that are never evicted (system prompt, image
            tokens). ``pin()`` sets it later instead.
        bits: ``None`` stores keys/values as given; ``8`` or ``4`` stores them quantized
            like mlx-lm's ``QuantizedKVCache``: ``update_and_fetch`` then returns tuples
            ``(wq, scales, biases)`` and ``bits``/``group_size`` select the quantized attention.
        group_size: quantization group size along head_dim.
        max_chunk: the most tokens one ``update_and_fetch`` may write once the ring is full
            (larger chunks raise ``ValueError``). Each query sees the pinned tokens and the
            ``window = max_tokens - pinned - max_chunk + 1`` most recent unpinned tokens.
            Default ``min(512, max_tokens // 4)``. ``max_chunk=1`` makes the window the
            whole ring (then, once full, the cache takes one token at a time).

    Token ``t`` lives in slot ``t`` if ``t < pinned``, else in ``pinned + (t - pinned) % ring``.
    """

    def __init__(
        self,
        max_tokens: int,
        pinned: int | None = None,
        bits: int | None = None,
        group_size: int = 64,
        max_chunk: int | None = None,
    ) -> None:
        if bits not in (None, 4, 8):
            raise ValueError(f"bits must be None, 4 or 8, got {bits}")
        self.max_tokens = int(max_tokens)
        self._max_chunk = int(max_chunk or min(512, max(1, self.max_tokens // 4)))
        self._bits = bits
        self.group_size = int(group_size)
        self.keys = self.values = None  # lists of full buffers: [K] or [wq, scales, biases]
        self.bias = None  # [B, max_tokens] float32 key bias per slot, allocated by the first biased update
        self.offset = 0  # tokens ever written (absolute position of the next token)
        self.pinned = 0
        self.pin(pinned or 0)

    # ----- configuration -------------------------------------------------------------

    @property
    def bits(self) -> int:
        """Quantization bits; absent (AttributeError) on a float cache, so that
        ``hasattr(cache, "bits")`` dispatch (mlx-lm) picks the float attention."""
        if self._bits is None:
            raise AttributeError("float FixedKVCache has no 'bits'")
        return self._bits

    @property
    def max_chunk(self) -> int:
        """Largest chunk one `update_and_fetch` may write once the ring is full."""
        return self._max_chunk

    @property
    def ring(self) -> int:
        """Slots for unpinned tokens."""
        return self.max_tokens - self.pinned

    @property
    def window(self) -> int:
        """How many most recent unpinned tokens each query attends to."""
        return self.ring - self._max_chunk + 1

    def pin(self, n: int | None = None) -> None:
        """Pin the first `n` tokens (default: every token written so far).

        Only possible while nothing has been overwritten (``offset <= max_tokens``), and
        the ring left (``max_tokens - n``) must hold at least ``max_chunk`` tokens. The
        window shrinks by the newly pinned count, so pin before the window matters.
        """
        n = self.offset if n is None else int(n)
        if self.offset > self.max_tokens and n != self.pinned:
            raise ValueError("cannot change the pinned prefix after the ring has wrapped")
        if not 0 <= n <= self.max_tokens - self._max_chunk:
            raise ValueError(
                f"pinning {n} tokens leaves a ring of {self.max_tokens - n} slots; it needs at "
                f"least max_chunk={self._max_chunk} (max_tokens={self.max_tokens})"
            )
        self.pinned = n

    # ----- protocol ------------------------------------------------------------------

    def size(self) -> int:
        """Number of tokens held."""
        return min(self.offset, self.max_tokens)

    def empty(self) -> bool:
        return self.keys is None

    def _runs(self, start: int, L: int) -> list:
        """(slot, chunk_index, length) runs for tokens start .. start+L-1."""
        runs, t, end = [], start, start + L
        while t < end:
            s = t if t < self.pinned else self.pinned + (t - self.pinned) % self.ring
            limit = self.pinned if t < self.pinned else self.max_tokens
            n = min(end - t, limit - s)
            runs.append((s, t - start, n))
            t += n
        return runs

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        """Write keys/values [B, H, L, D] in place; return every key/value held.

        Returns views ``[B, H, size, D]`` in slot order (not time order once the ring has
        wrapped: use ``make_mask``), or for a quantized cache tuples ``(wq, scales, biases)``.
        """
        L = keys.shape[2]
        if L > self._max_chunk and self.offset + L > self.max_tokens:
            raise ValueError(
                f"chunk of {L} tokens would overwrite the ring; feed chunks of at most "
                f"max_chunk={self._max_chunk} tokens once offset + L > max_tokens "
                f"(offset={self.offset}, max_tokens={self.max_tokens})"
            )
        if self._bits is None:
            new_k, new_v = [keys], [values]
        else:  # [B, H, L, D*bits/32] uint32, [B, H, L, D/group_size] scales and biases
            new_k = quantize_rows(keys, group_size=self.group_size, bits=self._bits)
            new_v = quantize_rows(values, group_size=self.group_size, bits=self._bits)
        if self.keys is None:
            self._allocate(new_k, new_v)
        for s, a, n in self._runs(self.offset, L):
            for buf, new in ((self.keys, new_k), (self.values, new_v)):
                for i in range(len(buf)):
                    buf[i][..., s : s + n, :] = new[i][..., a : a + n, :]  # in place
        self.offset += L
        return self.state

    def update_bias(self, bias: mx.array | None, n: int) -> mx.array | None:
        """Write the key bias [B, n] of the next `n` tokens (None: 0) BEFORE their `update_and_fetch`, into
        their slots (pinned and rotated with them); return the held slots' bias [B, size after], or None
        when no bias was ever given. Allocated once, at ``max_tokens`` slots (see `KVCache.update_bias`)."""
        if bias is None and self.bias is None:
            return None
        if self.bias is None:
            self.bias = mx.zeros((bias.shape[0], self.max_tokens), mx.float32)  # [B, max_tokens]
        for s, a, m in self._runs(self.offset, n):
            self.bias[:, s : s + m] = 0.0 if bias is None else bias[:, a : a + m].astype(mx.float32)
        return self.bias[:, : min(self.offset + n, self.max_tokens)]

    @property
    def key_bias(self) -> mx.array | None:
        """[B, size] key bias of the held slots (slot order, like `state`), or None when none was given."""
        return None if self.bias is None else self.bias[:, : self.size()]

    @key_bias.setter
    def key_bias(self, bias):
        """Restore from `key_bias` (after `state`): the held slots' bias, zeros beyond."""
        self.bias = None
        if bias is not None:
            bias = mx.array(bias, dtype=mx.float32)
            self.bias = mx.zeros((bias.shape[0], self.max_tokens), mx.float32)
            self.bias[:, : bias.shape[1]] = bias

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """Mask for the next `n` queries; call BEFORE `update_and_fetch` of those tokens.

        Returns ``None`` (all returned keys visible), ``"causal"``, or a bool array
        ``[n, n_keys]`` with True = attend, correct after wrap-around. ``return_array``
        forces the array; ``window_size`` exists for mlx-lm callers and must be None.
        """
        _no_window(window_size)
        P, R, W = self.pinned, self.ring, self.window
        o, end = self.offset, self.offset + n
        wrapped = end > self.max_tokens
        if not return_array:
            if not wrapped and end - P <= W:  # time order, no window cut
                return None if n == 1 else "causal"
            if wrapped and n == 1 and W >= R:  # one query sees the whole ring
                return None
        if wrapped:  # absolute position held by each slot after the update
            head = (end - P) % R  # next ring slot to write
            ring_pos = end - R + (mx.arange(R) - head) % R  # [R]
            pos = mx.concatenate([mx.arange(P), ring_pos])  # [max_tokens]
        else:
            pos = mx.arange(end)  # [end]
        q = mx.arange(o, end)[:, None]  # [n, 1]
        pos = pos[None]  # [1, n_keys]
        return (pos <= q) & ((pos < P) | (pos > q - W))  # [n, n_keys]

    @property
    def state(self):
        """Views of the held region: (K, V), or ((wq, s, b), (wq, s, b)) when quantized.

        Always new arrays (never the buffers themselves), so what a caller holds does not
        change later; holding them across an update makes that update copy the buffers.
        """
        if self.keys is None:
            return ()
        n = self.size()
        k, v = ([x[..., :n, :] for x in b] for b in (self.keys, self.values))  # new views
        return (k[0], v[0]) if self._bits is None else (tuple(k), tuple(v))

    @state.setter
    def state(self, v):
        """Restore from `state` (set `meta_state` first); allocates the full buffers."""
        self.keys = self.values = self.bias = None
        if not v:
            return
        k, v = ([x] if self._bits is None else list(x) for x in v)
        n = k[0].shape[2]
        self._allocate(k, v)
        for buf, src in ((self.keys, k), (self.values, v)):
            for i in range(len(buf)):
                buf[i][..., :n, :] = src[i]

    def _allocate(self, k, v):
        """Allocate the full buffers once, shaped like the parts in `k` and `v`."""
        shape = lambda x: (*x.shape[:2], self.max_tokens, x.shape[3])  # noqa: E731  [B, H, C, *]
        self.keys = [mx.zeros(shape(x), x.dtype) for x in k]
        self.values = [mx.zeros(shape(x), x.dtype) for x in v]

    @property
    def meta_state(self):
        """Strings: max_tokens, pinned, max_chunk, bits (0 = float), group_size, offset."""
        meta = (self.max_tokens, self.pinned, self._max_chunk, self._bits or 0, self.group_size, self.offset)
        return tuple(map(str, meta))

    @meta_state.setter
    def meta_state(self, v):
        self.max_tokens, self.pinned, self._max_chunk, bits, self.group_size, self.offset = map(int, v)
        self._bits = bits or None
        self.keys = self.values = self.bias = None

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the full buffers)."""
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in self.keys + self.values) + (0 if self.bias is None else self.bias.nbytes)

    @property
    def used_bytes(self) -> int:
        """Bytes the held tokens occupy."""
        return self.nbytes * self.size() // self.max_tokens

    def is_trimmable(self) -> bool:
        """Trimming is possible until something has been overwritten."""
        return self.offset <= self.max_tokens

    def trim(self, n: int) -> int:
        """Forget the last `n` tokens (only while `is_trimmable()`); return how many.

        The pinned count is unchanged: re-written tokens below it land in pinned slots.
        """
        if not self.is_trimmable():
            return 0
        n = min(self.offset, n)
        self.offset -= n
        return n


class LinearCache:
    """The state of one linear-attention (Gated DeltaNet) layer: ``conv`` [B, K-1, C], the last K-1 inputs
    of its causal convolution (the model's dtype), and ``recurrent`` [B, Hv, dv, dk], the delta rule's state
    (float32). Its size is fixed: it summarises every token seen, however many (``offset``), so nothing
    rotates out of it, and it cannot be rewound: ``is_trimmable()`` is False and ``trim`` trims nothing.
    """

    def __init__(self) -> None:
        self.conv = self.recurrent = None
        self.offset = 0

    def update(self, conv: mx.array, recurrent: mx.array, n: int) -> None:
        """The state after ``n`` more tokens (what the layer computed)."""
        self.conv, self.recurrent = conv, recurrent
        self.offset += n

    @property
    def state(self):
        return () if self.conv is None else (self.conv, self.recurrent)

    @state.setter
    def state(self, v):
        self.conv, self.recurrent = v if v else (None, None)

    @property
    def meta_state(self):
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, v):
        (self.offset,) = map(int, v)

    @property
    def nbytes(self) -> int:
        return 0 if self.conv is None else self.conv.nbytes + self.recurrent.nbytes

    @property
    def used_bytes(self) -> int:
        return self.nbytes

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.conv is None

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0


def kv_cache(head_dim: int, max_kv_size: int | None = None, kv_bits: int | None = None, kv_group_size=None):
    """One attention layer's cache: a growing `KVCache`, or a `FixedKVCache` of ``max_kv_size`` slots
    (``kv_bits`` 8 / 4: quantized in groups of ``kv_group_size``, default `memory.kv_group_size`)."""
    if kv_group_size is None:
        kv_group_size = memory.kv_group_size(head_dim)
    if kv_bits is not None and head_dim % kv_group_size:
        raise InputError(
            f"a quantized KV cache (--kv-bits) needs a head size that is a multiple of {kv_group_size}; "
            f"this model's is {head_dim}"
        )
    if max_kv_size is None:
        return KVCache()
    return FixedKVCache(max_kv_size, bits=kv_bits, group_size=kv_group_size)


# ----- save / load -------------------------------------------------------------------

_CLASSES = {"KVCache": KVCache, "FixedKVCache": FixedKVCache}
MARKER = "mlx_compact.caches"  # the header entry that makes a safetensors file a session of this library
_FLOATS = ("F16", "BF16", "F32")
_LIMIT = 2**31  # token counts and positions are int32 in the model
_DTYPE_NAMES = {mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.uint32: "U32"}


class SessionError(InputError):
    """A session file that is not one of this library, is corrupt, or does not fit this model or chat."""


def save_cache(path: str | os.PathLike, caches: Sequence, metadata: dict | None = None) -> None:
    """Save a chat session's caches (one per layer) and a JSON-able `metadata` dict.

    `path` should end in ``.safetensors``. Only the held tokens are written; the caches
    keep working (their buffers are read, not moved). The file is written next to `path`
    and renamed onto it once complete. `SessionError` when `path` is a folder, a pipe, in
    a folder that does not exist, or an existing file that is not a session file (such a
    file is never overwritten; a previous session is).
    """
    path = os.fspath(path)
    folder = _save_folder(path)
    arrays, info = {}, []
    for i, c in enumerate(caches):
        parts = 0
        if isinstance(c, LinearCache):  # a hybrid model's linear layer: its fixed state
            arrays.update({f"{i}.{name}": x for name, x in zip(LINEAR_PARTS, c.state)})
            parts = len(c.state)
        for name, x in zip(("keys", "values"), () if isinstance(c, LinearCache) else c.state):
            x = x if isinstance(x, tuple) else (x,)
            arrays.update({f"{i}.{name}.{j}": a for j, a in enumerate(x)})
            parts = len(x)
        info.append({"class": type(c).__name__, "meta": list(c.meta_state), "parts": parts})
    first = attention_cache(caches)
    if first is not None and first.state and getattr(first, "key_bias", None) is not None:
        arrays["bias"] = (
            first.key_bias
        )  # proportional attention: the key bias per slot, kept by the first attention layer
    header = {MARKER: json.dumps(info), "metadata": json.dumps(metadata or {})}
    fd, tmp = tempfile.mkstemp(prefix=".session-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            mx.save_safetensors(f, arrays, header)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_folder(path: str) -> str:
    """The folder `path` is saved in, once sure that saving there overwrites no other kind of file."""
    if not path or path.endswith(os.sep):
        raise SessionError(f"cannot save to {path!r}: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        kind = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise SessionError(f"cannot save to {path}: {folder} {kind}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return folder
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise SessionError(f"cannot save to {path}: it is {kind}; give a file name")
    try:
        ours = MARKER in safetensors_header(path)["__metadata__"]
    except InputError:
        ours = False
    if not ours:
        raise SessionError(
            f"cannot save to {path}: it exists and is not a session file of mlx-compact; "
            "refusing to overwrite it: give another name"
        )
    return folder


def read_cache_file(path: str | os.PathLike) -> dict:
    """Check a file written by `save_cache` from its header alone (nothing is allocated); describe it.

    Returns a dict: ``class`` (the caches' class name, the same for every layer), ``meta`` (FixedKVCache's
    max_tokens, pinned, max_chunk, bits (0 = float), group_size, offset as ints; ``()`` for KVCache),
    ``parts`` (tensors per keys and per values), ``layers``, ``batch``, ``kv_heads``, ``head_dim`` and
    ``dtype`` (None when the caches are empty), ``metadata`` (what `save_cache` was given), ``tensors``
    ({name: (dtype, shape)}) and ``nbytes`` (what loading it allocates). Raises `SessionError`.
    """
    path = os.fspath(path)
    what = f"session file {path}"
    try:
        checked_file(path, what="session file")
    except FileNotFoundError:
        raise SessionError(f"no session file {path}") from None
    except InputError as e:
        raise SessionError(str(e)) from None
    try:
        header = safetensors_header(path)
    except InputError:
        raise SessionError(f"{what} is not a safetensors file, or it is truncated or corrupt") from None
    raw = header.pop("__metadata__")
    if MARKER not in raw:
        raise SessionError(f"{what} is not a session file of mlx-compact (no {MARKER!r} in its header)")

    def corrupt(why):
        return SessionError(f"{what} is corrupt: {why}")

    try:
        entries, metadata = json.loads(raw[MARKER]), json.loads(raw.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError):
        raise corrupt("its description is not JSON") from None
    if not isinstance(metadata, dict):
        raise corrupt("its metadata is not a JSON object")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise corrupt("it does not describe one cache per layer")
    linear = [i for i, e in enumerate(entries) if e.get("class") == "LinearCache"]  # a hybrid's linear layers
    attn = [i for i in range(len(entries)) if i not in linear]
    if not (attn and all(entries[i] == entries[attn[0]] for i in attn)):
        raise corrupt("it does not describe one cache per layer, all of the same kind")
    entry = entries[attn[0]]
    if not (set(entry) == {"class", "meta", "parts"}):
        raise corrupt("a layer's description is not {class, meta, parts}")
    cls, meta, parts = entry["class"], _cache_settings(entry, corrupt), entry["parts"]
    bias = "bias" in header and parts > 0
    linear_names = _linear_entries([entries[i] for i in linear], corrupt) and {
        f"{i}.{n}" for i in linear for n in LINEAR_PARTS
    }

    layers = len(entries)
    expected = 2 * parts * len(attn) + bias + len(linear_names or ())
    if len(header) != expected:
        raise corrupt(f"it holds {len(header)} tensors where its description says {expected}")
    names = {f"{i}.{n}.{j}" for i in attn for n in ("keys", "values") for j in range(parts)}
    biases = {"bias"} if bias else set()
    if set(header) != names | biases | (linear_names or set()):
        everything = names | biases | (linear_names or set())
        missing, extra = sorted(everything - set(header)), sorted(set(header) - everything)
        raise corrupt(f"tensor {missing[0]!r} is missing" if missing else f"it holds an unknown tensor {extra[0]!r}")
    state = _linear_layout(header, linear, corrupt) if linear_names else None
    first = [header[f"{attn[0]}.keys.{j}"][:2] for j in range(parts)]  # (dtype, shape) of each part
    if any(header[n][:2] != first[int(n.rsplit(".", 1)[1])] for n in names):
        raise corrupt("its layers' keys and values differ in dtype or shape")
    if biases and any(header[n][:2] != ("F32", (first[0][1][0], first[0][1][2])) for n in biases):
        raise corrupt("its key bias is not float32 [batch, tokens]")
    names |= biases | (linear_names or set())
    info = {
        "class": cls,
        "meta": meta,
        "parts": parts,
        "layers": layers,
        "linear_layers": linear,
        "linear_meta": entries[linear[0]]["meta"] if linear else None,
        "linear_state": state,
        "metadata": metadata,
        "bias": bias,
        "tensors": {n: header[n][:2] for n in names},
        "nbytes": sum(header[n][2] for n in names),
        **_layout(first, cls, meta, corrupt),
    }
    if cls == "FixedKVCache" and parts:  # the full buffers, allocated on load
        per_token = sum(SAFETENSORS_DTYPES[d] * s[0] * s[1] * s[3] for d, s in first)
        info["nbytes"] += 2 * len(attn) * meta[0] * per_token + (meta[0] * 4 * first[0][1][0] if bias else 0)
    return info


LINEAR_PARTS = ("conv", "recurrent")


def _linear_entries(entries: list, corrupt) -> bool:
    """Whether the linear layers' descriptions (all alike: tokens seen, parts 0 or 2) say they hold a state."""
    if not entries:
        return False
    e = entries[0]
    if not (
        all(x == e for x in entries)
        and set(e) == {"class", "meta", "parts"}
        and e["parts"] in (0, 2)
        and isinstance(e["meta"], list)
        and len(e["meta"]) == 1
        and isinstance(e["meta"][0], str)
        and e["meta"][0].isascii()
        and e["meta"][0].isdigit()
        and int(e["meta"][0]) < _LIMIT
    ):
        raise corrupt("its linear layers' descriptions are not all one state of {class, meta: [tokens], parts}")
    return e["parts"] == 2


def _linear_layout(header: dict, linear: list, corrupt) -> tuple:
    """(conv shape [B, K-1, C], recurrent shape [B, Hv, dv, dk]) of the linear layers' state, checked alike."""
    conv, rec = header[f"{linear[0]}.conv"][:2], header[f"{linear[0]}.recurrent"][:2]
    if any(header[f"{i}.conv"][:2] != conv or header[f"{i}.recurrent"][:2] != rec for i in linear):
        raise corrupt("its linear layers' states differ in dtype or shape")
    if conv[0] not in _FLOATS or len(conv[1]) != 3 or rec[0] != "F32" or len(rec[1]) != 4 or conv[1][0] != rec[1][0]:
        raise corrupt(
            "its linear state is not a float conv state [batch, K-1, C] and a float32 state [batch, Hv, dv, dk]"
        )
    return tuple(conv[1]), tuple(rec[1])


def _cache_settings(entry, corrupt):
    """A layer description's settings as ints (FixedKVCache) or () (KVCache), checked for range."""
    cls, meta, parts = entry["class"], entry["meta"], entry["parts"]
    if type(parts) is not int:
        raise corrupt(f"parts {parts!r} is not an integer")
    if cls == "KVCache":
        if meta != [] or parts not in (0, 1):
            raise corrupt("a KVCache layer has settings or more than one part")
        return ()
    if cls != "FixedKVCache":
        raise corrupt(f"unknown cache class {str(cls)[:40]!r}")
    if not (
        isinstance(meta, list)
        and len(meta) == 6
        and all(isinstance(s, str) and s.isascii() and s.isdigit() and len(s) <= 10 for s in meta)
    ):
        raise corrupt("FixedKVCache settings are not six integers")
    max_tokens, pinned, max_chunk, bits, group_size, offset = values = tuple(map(int, meta))
    if not (
        bits in (0, 4, 8)
        and group_size in (32, 64, 128)
        and 1 <= max_chunk <= max_tokens < _LIMIT
        and pinned <= max_tokens - max_chunk
        and offset < _LIMIT
    ):
        raise corrupt(f"FixedKVCache settings {meta} are out of range")
    if parts not in (0, 3 if bits else 1) or (parts == 0 and offset):
        raise corrupt(f"a FixedKVCache of {bits or 'float'} bits holding {offset} tokens cannot have {parts} parts")
    return values


def _layout(keys, cls, meta, corrupt):
    """batch, kv_heads, head_dim and dtype from layer 0's keys [(dtype, shape)], checked against `meta`."""
    if not keys:
        return dict(batch=None, kv_heads=None, head_dim=None, dtype=None)
    dtype, shape = keys[0]
    if len(shape) != 4 or 0 in (shape[0], shape[1], shape[3]):
        raise corrupt(f"its keys have shape {list(shape)}, not [batch, kv_heads, tokens, head_dim]")
    batch, kv_heads, tokens, width = shape
    if cls == "FixedKVCache" and tokens != min(meta[5], meta[0]):
        raise corrupt(f"it holds {tokens} tokens per layer where its settings say {min(meta[5], meta[0])}")
    bits = meta[3] if meta else 0
    if not bits:
        if dtype not in _FLOATS:
            raise corrupt(f"its keys have dtype {dtype}, not one of {', '.join(_FLOATS)}")
        return dict(batch=batch, kv_heads=kv_heads, head_dim=width, dtype=dtype)
    head_dim, group_size = width * 32 // bits, meta[4]
    scales = (batch, kv_heads, tokens, head_dim // group_size)
    float_dtype = keys[1][0]
    if (
        dtype != "U32"
        or head_dim % group_size
        or float_dtype not in _FLOATS
        or any(k != (float_dtype, scales) for k in keys[1:])
    ):
        raise corrupt(
            f"its {bits}-bit keys are not packed U32 words with float scales and biases of shape {list(scales)}"
        )
    return dict(batch=batch, kv_heads=kv_heads, head_dim=head_dim, dtype=float_dtype)


def load_cache(
    path: str | os.PathLike,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    linear_state: tuple | None = None,
) -> tuple:
    """Load what `save_cache` wrote; return ``(caches, metadata)``.

    The file is checked from its header first (`read_cache_file`): against the model when `layers`,
    `kv_heads` and `head_dim` are given (batch 1; a hybrid model: ``linear_state``, its linear layers' indexes
    and their state's shapes ``(conv [1, K-1, C], recurrent [1, Hv, dv, dk])``), and what loading allocates
    against the memory this device has available. Only then is it read. Raises `SessionError`.
    """
    path = os.fspath(path)
    info = read_cache_file(path)
    if layers is not None and info["layers"] != layers:
        raise SessionError(
            f"session file {path} holds {info['layers']} cache layers; this model has {layers}: "
            "it was saved with another model"
        )
    if layers is not None:
        indexes, shapes = linear_state or ([], None)
        if list(indexes) != info["linear_layers"] or (info["linear_state"] not in (None, shapes)):
            raise SessionError(
                f"session file {path} holds the linear states of layers {info['linear_layers']} "
                f"{info['linear_state'] or ''}; this model's are {list(indexes)} {shapes or ''}: it was saved with "
                "another model"
            )
    theirs, ours = (info["batch"], info["kv_heads"], info["head_dim"]), (1, kv_heads, head_dim)
    if info["parts"] and kv_heads is not None and theirs != ours:
        raise SessionError(
            f"session file {path} holds keys of batch {theirs[0]}, {theirs[1]} kv heads and head_dim "
            f"{theirs[2]}; this model's are {ours[0]}, {ours[1]} and {ours[2]}: it was saved with "
            "another model"
        )
    available = memory.device_budget()["available"]
    if available and info["nbytes"] > available:
        raise SessionError(
            f"loading session file {path} needs {memory.fmt_bytes(info['nbytes'])}, more than the "
            f"{memory.fmt_bytes(available)} this device has available"
        )
    with open_regular(path, what="session file") as f:
        arrays = mx.load(f, format="safetensors")
    if {n: (_DTYPE_NAMES.get(a.dtype), tuple(a.shape)) for n, a in arrays.items()} != info["tensors"]:
        raise SessionError(f"session file {path} changed while it was read; load it again")
    cls, parts = _CLASSES[info["class"]], info["parts"]
    caches = []
    for i in range(info["layers"]):
        if i in info["linear_layers"]:
            c = LinearCache()
            c.meta_state = info["linear_meta"]
            c.state = tuple(arrays[f"{i}.{n}"] for n in LINEAR_PARTS) if info["linear_state"] else ()
            caches.append(c)
            continue
        c = cls.__new__(cls)
        if info["meta"]:
            c.meta_state = info["meta"]
        k, v = (tuple(arrays[f"{i}.{name}.{j}"] for j in range(parts)) for name in ("keys", "values"))
        c.state = () if parts == 0 else (k[0], v[0]) if parts == 1 else (k, v)
        if info["bias"] and c is attention_cache(caches + [c]):
            c.key_bias = arrays["bias"]
        caches.append(c)
    mx.eval([c.state for c in caches])
    return caches, info["metadata"]
