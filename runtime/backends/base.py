"""The protocol every execution backend implements, and the KV cache handle they pass around.

Where it stands: ``runtime.generate`` drives a backend through :class:`DecoderBackend` only, so onnxruntime and
TensorRT are interchangeable. A backend keeps the KV cache in whatever form is cheapest for it (onnxruntime:
``OrtValue`` on the device); the generation loop never looks inside a :class:`KVCache`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

import numpy as np


@dataclass
class KVCache:
    """The present tensors of one step, in graph output order (layer 0 key, layer 0 value, layer 1 key, ...).

    ``tensors`` hold backend-native values (numpy arrays, ``OrtValue``s, device buffers); ``length`` is how many
    positions they cover, for ``batch`` rows.
    """

    tensors: List[Any]
    batch: int
    length: int


class Backend(Protocol):
    """Names in, arrays out, a context-managed lifetime."""

    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """One plain inference: every graph input by name -> every graph output by name, as numpy arrays."""
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> "Backend":
        ...

    def __exit__(self, *exc: Any) -> None:
        ...


class DecoderBackend(Backend, Protocol):
    """A backend that runs the decoder with a KV cache it owns."""

    num_layers: int
    kv_dtype: np.dtype

    def empty_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:
        """A cache of zero length for ``batch`` rows (prefill from empty past). ``capacity``: how many positions
        the generation will need at most (prompt + new tokens); a backend with a preallocated cache sizes it so,
        the others ignore it."""
        ...

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache
    ) -> Tuple[np.ndarray, KVCache]:
        """input_ids, position_ids [batch, seq] int64; attention_mask [batch, cache.length + seq] int64.

        Returns the last position's logits [batch, vocab] float32 and the cache grown by ``seq``. The old cache
        must not be used again.
        """
        ...

    def select_rows(self, cache: KVCache, rows: np.ndarray) -> KVCache:
        """A cache holding only ``rows`` (indices into the batch), in that order. Called when sequences of a batch
        finish, so the remaining ones stop paying for them; one copy of the cache per call."""
        ...

    def cache_to_numpy(self, cache: KVCache) -> List[np.ndarray]:
        """Copies of the cache tensors on the host (for tests and debugging, never in the loop)."""
        ...


def check_feed_shapes(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                      cache: KVCache) -> None:
    """Shape agreement of one forward call; a mismatch here is a bug in the caller, not a user error."""
    b, s = input_ids.shape
    if position_ids.shape not in ((b, s), (b, 2, s)):  # [batch, seq]; ChatGLM-6B's 2D: [batch, 2, seq]
        raise ValueError(f"position_ids {position_ids.shape} != input_ids {input_ids.shape}")
    if attention_mask.shape != (b, cache.length + s):
        raise ValueError(f"attention_mask {attention_mask.shape} != ({b}, {cache.length} + {s})")
    if cache.batch != b:
        raise ValueError(f"cache holds {cache.batch} rows, input has {b}")


def as_int64(a: Any) -> np.ndarray:
    """A C-contiguous int64 array of ``a`` (no copy when it already is one): how token inputs reach a graph."""
    return np.ascontiguousarray(a, dtype=np.int64)
