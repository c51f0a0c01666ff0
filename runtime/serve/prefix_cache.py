"""Prefix reuse across turns: an LRU of finished conversations' KV caches, bounded in bytes.

Where it stands: ``runtime.serve.scheduler`` stores a request's cache when it finishes (the ids whose KV it holds:
the prompt and every generated token but the last, which was never fed) and looks up the longest stored prefix of
each new prompt. The cache is causal, so the first k columns of a stored cache are exactly the cache of its first
k ids: any common prefix can be reused, not only a whole stored entry. A chat's next turn repeats the previous turn's
prompt, then the assistant's reply as the chat format renders it (which may tokenize differently from the ids the
model produced) and the new user message: the reuse covers everything up to the first id that differs.

Entries are host arrays [1, kv_heads, length, head_dim] per layer tensor (graph output order); the bound counts
their bytes. Only the scheduler thread touches it, so it takes no lock.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

MIN_REUSE = 2  # fewer common ids than this is not worth a cache copy


class PrefixHit(NamedTuple):
    length: int  # how many leading prompt ids the arrays cover
    arrays: List[np.ndarray]  # [1, kv_heads, length, head_dim] each (views of the stored entry)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
    return int(np.argmax(x)) if x.any() else n


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries = OrderedDict()  # type: OrderedDict[Tuple[int, ...], List[np.ndarray]]
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> Optional[PrefixHit]:
        """The stored cache sharing the longest prefix with ``prompt``, cut to that prefix; at least one prompt id
        is always left to prefill (the model needs a forward to give the next token's logits)."""
        if not self.enabled:
            return None
        best_key, best = None, 0
        for key in self._entries:
            n = min(common_prefix(key, prompt), len(prompt) - 1)
            if n > best:
                best_key, best = key, n
        if best_key is None or best < MIN_REUSE:
            self.misses += 1
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        return PrefixHit(best, [a[:, :, :best, :] for a in self._entries[best_key]])

    def store(self, ids: Sequence[int], arrays: List[np.ndarray]) -> None:
        """Keep ``arrays`` (the KV of exactly ``ids``) as the most recent entry, evicting the oldest to fit."""
        if not self.enabled or not ids:
            return
        if arrays and arrays[0].shape[2] != len(ids):
            raise ValueError(f"prefix cache: {arrays[0].shape[2]} cached positions for {len(ids)} ids")
        size = sum(int(a.nbytes) for a in arrays)
        if size > self.max_bytes:
            return
        key = tuple(int(i) for i in ids)
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= sum(int(a.nbytes) for a in old)
        # an entry that is a prefix of the new one adds nothing the new one does not hold
        for k in [k for k in self._entries if len(k) <= len(key) and key[: len(k)] == k]:
            self.bytes -= sum(int(a.nbytes) for a in self._entries.pop(k))
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= sum(int(a.nbytes) for a in evicted)
        self._entries[key] = arrays
        self.bytes += size
