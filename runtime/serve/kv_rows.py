"""Rows of a running batch's KV cache: joining a new row, keeping some rows, cutting one row out.

Where it stands: ``runtime.serve.scheduler`` keeps one batch cache for every active request. With the portable
graph's Concat cache every row of a batch has the same past length, so rows of different lengths are aligned on
the right (left padding), exactly as ``runtime.steps.left_pad`` aligns prompts::

    cache tensors   [batch, kv_heads, past, head_dim]   a row's real positions are its last ``real[r]`` columns
    attention_mask  [batch, past]                        0 on the pad columns on the left, 1 on the real ones

so a joining row (its own prefill: [1, kv_heads, n, head_dim]) is padded on the left to the batch's past (or the
batch is padded to the row's, when the row is longer), its mask is 0 there, and position ids keep following each
row's ``cumsum(mask) - 1``. When rows leave, columns that are padding in every remaining row are cut off.

The work is done on host copies (``cache_to_numpy``) and placed back with the backend's ``cache_from_numpy``: one
copy of the cache per join or leave, which is what ``DecoderBackend.select_rows`` already costs. A backend with a
shared max-length buffer (onnxruntime's GroupQueryAttention, issue 10) would instead write the row into a free slot
of its buffer: that backend implements :class:`RowBackend` with in-place versions of these three operations.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from runtime.backends.base import DecoderBackend, KVCache

try:
    from typing import Protocol
except ImportError:  # pragma: no cover - Python < 3.8 is not supported
    Protocol = object  # type: ignore


class RowBackend(DecoderBackend, Protocol):
    """What the scheduler needs beyond ``DecoderBackend``: host copies in, a native cache out."""

    def cache_from_numpy(self, arrays: List[np.ndarray], length: int) -> KVCache:
        ...


def supports_rows(backend: object) -> bool:
    return callable(getattr(backend, "cache_from_numpy", None)) and callable(getattr(backend, "cache_to_numpy", None))


def _pad_left(a: np.ndarray, columns: int) -> np.ndarray:
    """[b, h, t, d] -> [b, h, columns + t, d] with zeros first."""
    if columns == 0:
        return a
    pad = np.zeros(a.shape[:2] + (columns,) + a.shape[3:], dtype=a.dtype)
    return np.concatenate([pad, a], axis=2)


def join_row(backend: RowBackend, batch: Optional[KVCache], mask: Optional[np.ndarray], row: KVCache,
             row_mask: np.ndarray) -> Tuple[KVCache, np.ndarray]:
    """The batch cache and mask with ``row`` appended as its last row. ``mask`` [batch, past] (None with ``batch``:
    no batch yet), ``row_mask`` [1, n]. -> (cache [batch + 1, .., max(past, n), ..], mask [batch + 1, max(past, n)])."""
    if batch is None or mask is None:
        return row, np.ascontiguousarray(row_mask, dtype=np.int64)
    new_rows = backend.cache_to_numpy(row)
    width = max(batch.length, row.length)
    row_mask = np.concatenate([np.zeros((1, width - row.length), np.int64), row_mask.astype(np.int64)], axis=1)
    old = backend.cache_to_numpy(batch)
    joined = [np.concatenate([_pad_left(a, width - batch.length), _pad_left(b, width - row.length)], axis=0)
              for a, b in zip(old, new_rows)]
    mask = np.concatenate([np.zeros((mask.shape[0], width - batch.length), np.int64), mask], axis=1)
    return backend.cache_from_numpy(joined, width), np.concatenate([mask, row_mask], axis=0)


def keep_rows(backend: RowBackend, batch: KVCache, mask: np.ndarray,
              rows: Sequence[int]) -> Tuple[KVCache, np.ndarray]:
    """Only ``rows`` of the batch, in that order, with the columns that are padding in all of them cut off."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise ValueError("keep_rows needs at least one row; an empty batch is no batch")
    mask = mask[rows]
    real = mask.any(axis=0)
    start = int(np.argmax(real)) if real.any() else mask.shape[1]
    kept = [np.ascontiguousarray(a[rows][:, :, start:, :]) for a in backend.cache_to_numpy(batch)]
    return backend.cache_from_numpy(kept, batch.length - start), np.ascontiguousarray(mask[:, start:])


def row_arrays(backend: RowBackend, batch: KVCache, mask: np.ndarray, row: int) -> List[np.ndarray]:
    """Host copies of one row's real positions: [1, kv_heads, real, head_dim] per tensor (for the prefix cache)."""
    real = int(mask[row].sum())
    return [np.ascontiguousarray(a[row:row + 1, :, a.shape[2] - real:, :]) for a in backend.cache_to_numpy(batch)]
