"""Conversation states kept between requests: a bounded LRU by bytes, keyed by what was fed.

A state is a `PromptCache` taken at the end of a request's prompt (before its answer is decoded). A later
request reuses it only when its own prompt *extends* it exactly at that boundary (same key), so a state is
only ever continued, never trimmed: that holds for every cache of the protocol, KV caches and the fixed
recurrent states of hybrid models alike. States are deep copies (`copy.deepcopy` of each layer's cache,
as mlx-lm's server does), so a request that continues one never changes what is stored.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

from mlx.utils import tree_flatten

from ..generate import PromptCache


def copy_state(state: PromptCache) -> PromptCache:
    """An independent copy of a conversation state: its layer caches, position and bookkeeping."""
    out = PromptCache(copy.deepcopy(list(state)), state.position, state.turns, state.closed)
    out.text, out.messages = state.text, copy.deepcopy(state.messages)
    return out


def state_bytes(state: PromptCache) -> int:
    """Bytes a state's layer caches hold: their ``nbytes`` (the cache protocol's), else their state's arrays."""
    return sum(
        int(c.nbytes) if hasattr(c, "nbytes") else sum(a.nbytes for _, a in tree_flatten(c.state)) for c in state
    )


class PrefixCache:
    """States by key, least recently used evicted first once they hold more than ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._states: OrderedDict[str, tuple[PromptCache, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._states.values())

    def put(self, key: str, state: PromptCache) -> bool:
        """Keep a copy of ``state`` under ``key``; False when it alone is larger than the cache."""
        if self.max_bytes <= 0 or state_bytes(state) > self.max_bytes:
            return False
        kept = copy_state(state)
        with self._lock:
            self._states.pop(key, None)
            self._states[key] = (kept, state_bytes(kept))
            while sum(n for _, n in self._states.values()) > self.max_bytes:
                self._states.popitem(last=False)
                self.evictions += 1
        return True

    def get(self, key: str) -> PromptCache | None:
        """A copy of the state under ``key`` (to continue freely), or None."""
        with self._lock:
            entry = self._states.get(key)
            if entry is not None:
                self._states.move_to_end(key)
        if entry is None:
            return None
        return copy_state(entry[0])

    def longest(self, keys: list[str]) -> tuple[int, PromptCache | None]:
        """The longest stored prefix among ``keys`` (key i: the first i + 1 segments): (segments, state copy);
        (0, None) when none is stored. Counts one hit or miss."""
        for i in range(len(keys) - 1, -1, -1):
            state = self.get(keys[i])
            if state is not None:
                self.hits += 1
                return i + 1, state
        self.misses += 1
        return 0, None

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
