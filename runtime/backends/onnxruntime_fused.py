"""onnxruntime backend for the fused graph (``model.fused.onnx``): a shared-buffer KV cache appended in place.

Where it stands: ``runtime.api`` opens it instead of :class:`OnnxRuntimeBackend` when the bundle's manifest lists a
"fused" graph (``runtime.manifest.GRAPH_FUSED``) and the provider is cpu or cuda; ``runtime.generate`` drives it
through the same ``DecoderBackend`` protocol.

The cache of one generation is one buffer per layer and key/value, ``[batch, kv_heads, capacity, head_dim]``,
allocated once (:meth:`empty_cache` with the capacity the generation needs: prompt + new tokens). Each forward binds
the same buffer as ``past_key_values.i.*`` input and ``present.i.*`` output, and GroupQueryAttention writes the new
positions into it in place: nothing is copied per step, in Python or in the graph, so a step's cost does not grow
with the context beyond attention itself. The buffer is only reallocated when a caller outgrows the capacity it
asked for (doubling, one copy) or when finished rows leave the batch (:meth:`select_rows`, one copy).

``logits_to_keep`` is fed 1: only the last position's logits are computed (the decode loop needs nothing else).
:meth:`run` takes the portable contract's feeds (``past_key_values.*`` of their actual length) and returns full
logits and presents of length past + seq, so the accuracy evaluation and the tests run either graph unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from runtime.backends.base import KVCache, as_int64, check_feed_shapes
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.errors import BackendError, BundleError
from runtime.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS

DEFAULT_CAPACITY = 256  # positions allocated when a caller does not say how long its generation runs
_LAST_ONLY = np.array([1], dtype=np.int64)
_ALL_POSITIONS = np.array([0], dtype=np.int64)


@dataclass
class SharedKVCache(KVCache):
    """``tensors``: one OrtValue per past/present name over a [batch, kv_heads, capacity, head_dim] buffer, of
    which the first ``length`` positions hold the cache. ``arrays``: the host arrays behind them (CPU), kept alive
    here; empty on a GPU."""

    capacity: int = 0
    arrays: List[np.ndarray] = field(default_factory=list)
    # the decode binding of these buffers (made on first use): pasts and presents bound once, logits into ``logits``
    binding: Any = None
    logits: Optional[np.ndarray] = None  # [batch, 1, vocab] float32, the last-position logits of each forward


class FusedOnnxRuntimeBackend(OnnxRuntimeBackend):
    """The fused graph (see ``exporter.fused_graph``) run by onnxruntime with a shared-buffer cache."""

    def __init__(self, model_path: str, spec, kv_dtype: str = "float32", provider: str = "cpu",
                 threads: Optional[int] = None, io_binding: bool = True, **kwargs: Any):
        if str(provider).lower().startswith("tensorrt"):
            raise BackendError("the fused graph uses onnxruntime contrib ops that TensorRT does not parse; "
                               "load the bundle's portable graph (graph='portable') for provider 'tensorrt'")
        super().__init__(model_path, spec, kv_dtype=kv_dtype, provider=provider, threads=threads,
                         io_binding=True, **kwargs)
        if LOGITS_TO_KEEP not in self.input_names:
            raise BundleError(f"{model_path}: not a fused glm-export graph (no {LOGITS_TO_KEEP} input)")
        self.graph_flavour = "fused"

    # ------------------------------------------------------------------------------------------------ buffers

    def _allocate(self, batch: int, capacity: int) -> SharedKVCache:
        shape = (batch, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        ort = self._ort
        if self.device_type == "cpu":
            arrays = [np.zeros(shape, dtype=self.kv_dtype) for _ in self._past_names]
            tensors = [ort.OrtValue.ortvalue_from_numpy(a, "cpu", 0) for a in arrays]
        else:
            arrays = []
            tensors = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device_type,
                                                                 self.device_id) for _ in self._past_names]
        return SharedKVCache(tensors, batch, 0, capacity=capacity, arrays=arrays)

    def empty_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:
        """Buffers for ``capacity`` positions (prompt + tokens to generate); grown by doubling if outgrown."""
        cap = int(capacity) if capacity else DEFAULT_CAPACITY
        if cap < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        return self._allocate(batch, cap)

    def _host_arrays(self, cache: SharedKVCache) -> List[np.ndarray]:
        return cache.arrays if cache.arrays else [t.numpy() for t in cache.tensors]

    def _grown(self, cache: SharedKVCache, needed: int) -> SharedKVCache:
        """A copy of ``cache`` in buffers of at least ``needed`` positions (the caller under-asked)."""
        capacity = max(needed, 2 * cache.capacity)
        bufs = []
        for a in self._host_arrays(cache):
            buf = np.zeros(a.shape[:2] + (capacity,) + a.shape[3:], dtype=self.kv_dtype)
            buf[:, :, : cache.length] = a[:, :, : cache.length]
            bufs.append(buf)
        return self._from_host(bufs, cache.length)

    def _from_host(self, arrays: List[np.ndarray], length: int) -> SharedKVCache:
        ort = self._ort
        tensors = [ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id) for a in arrays]
        keep = arrays if self.device_type == "cpu" else []
        return SharedKVCache(tensors, arrays[0].shape[0], length, capacity=arrays[0].shape[2], arrays=keep)

    # ------------------------------------------------------------------------------------------------ stepping

    def _bound_cache(self, binding, cache: SharedKVCache) -> None:
        for past, present, value in zip(self._past_names, self._present_names, cache.tensors):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same buffer: appended in place

    def _decode_binding(self, cache: SharedKVCache, vocab: int):
        """The binding of ``cache``'s buffers for last-position forwards, made once per cache: its pasts/presents
        and ``logits_to_keep`` stay bound, and logits land in ``cache.logits`` (preallocated), so a step binds
        only its three small inputs and wraps no output (one OrtValue per present would cost ~5% of an INT4 step)."""
        if cache.binding is None:
            binding = self.session.io_binding()
            self._bound_cache(binding, cache)
            binding.bind_cpu_input(LOGITS_TO_KEEP, _LAST_ONLY)
            cache.logits = np.empty((cache.batch, 1, vocab), dtype=np.float32)  # [batch, 1, vocab]
            binding.bind_ortvalue_output(LOGITS, self._ort.OrtValue.ortvalue_from_numpy(cache.logits))
            cache.binding = binding
        return cache.binding

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
              cache: SharedKVCache, last_only: bool) -> Tuple[np.ndarray, SharedKVCache]:
        """One forward into ``cache``'s buffers -> (logits [batch, 1 if ``last_only`` else seq, vocab], cache). Last
        positions on a CPU cache go through its decode binding: the logits are then a view of ``cache.logits``,
        overwritten by the next forward (callers copy)."""
        if self.session is None:
            raise BackendError("the backend was closed")
        new_len = cache.length + int(input_ids.shape[1])
        if new_len > cache.capacity:
            cache = self._grown(cache, new_len)
        decode = last_only and self.device_type == "cpu"
        if decode:
            binding = self._decode_binding(cache, self.spec.vocab_size)
        else:
            binding = self.session.io_binding()
            binding.bind_cpu_input(LOGITS_TO_KEEP, _LAST_ONLY if last_only else _ALL_POSITIONS)
            binding.bind_output(LOGITS, "cpu")
            self._bound_cache(binding, cache)
        binding.bind_cpu_input(INPUT_IDS, as_int64(input_ids))
        binding.bind_cpu_input(ATTENTION_MASK, as_int64(attention_mask))
        binding.bind_cpu_input(POSITION_IDS, as_int64(position_ids))
        self.session.run_with_iobinding(binding)
        logits = cache.logits if decode else binding.get_outputs()[0].numpy()  # (B, kept, V)
        cache.length = new_len
        return logits, cache

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache) -> Tuple[np.ndarray, KVCache]:
        check_feed_shapes(input_ids, attention_mask, position_ids, cache)
        if not isinstance(cache, SharedKVCache):
            raise ValueError("the fused backend takes the caches its empty_cache made")
        logits, cache = self._step(input_ids, attention_mask, position_ids, cache, last_only=True)
        return np.array(logits[:, -1, :], dtype=np.float32), cache  # a copy: the buffer is the next step's

    def forward_all(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                    cache: KVCache) -> Tuple[np.ndarray, KVCache]:
        """:meth:`forward` with every position's logits [batch, seq, vocab] (teacher forcing, tests)."""
        check_feed_shapes(input_ids, attention_mask, position_ids, cache)
        if not isinstance(cache, SharedKVCache):
            raise ValueError("the fused backend takes the caches its empty_cache made")
        return self._step(input_ids, attention_mask, position_ids, cache, last_only=False)

    def select_rows(self, cache: KVCache, rows: np.ndarray) -> KVCache:
        assert isinstance(cache, SharedKVCache)
        rows = np.asarray(rows, dtype=np.int64)
        kept = [np.ascontiguousarray(a[rows]) for a in self._host_arrays(cache)]
        return self._from_host(kept, cache.length)

    def cache_to_numpy(self, cache: KVCache) -> List[np.ndarray]:
        """The filled part of each buffer, [batch, kv_heads, length, head_dim] (copies)."""
        assert isinstance(cache, SharedKVCache)
        return [np.array(a[:, :, : cache.length], copy=True) for a in self._host_arrays(cache)]

    def cache_from_numpy(self, arrays: List[np.ndarray], length: int) -> KVCache:
        """Refused: the serve scheduler's row joins shift a row's keys to other buffer columns, and this graph rotates
        keys by buffer column (see exporter/fused_graph.py), so joined rows would attend wrongly; serve runs the
        portable graph."""
        raise BackendError("the fused graph's shared buffer cannot take rows joined by the serve scheduler; load the "
                           "bundle with graph='portable'")

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The portable contract: pasts of their own length in, every position's logits and presents of length
        past + seq out (for evaluation and tests; it copies the cache in and out). Presents are in the cache's
        dtype; an int8 cache (calibration/kv_cache.py) takes only empty pasts here (a float past has no int8 form
        without the graph's scales)."""
        if self.kv_dtype == np.int8 and any(np.asarray(feeds[n]).shape[2] for n in self._past_names):
            raise BackendError("the int8-cache fused graph's run() takes an empty past; step it with forward()")
        pasts = [np.asarray(feeds[n], dtype=self.kv_dtype) for n in self._past_names]
        ids = feeds[INPUT_IDS]
        past_len = pasts[0].shape[2]
        total = past_len + ids.shape[1]
        bufs = [np.ascontiguousarray(np.pad(p, ((0, 0), (0, 0), (0, total - past_len), (0, 0)))) for p in pasts]
        cache = self._from_host(bufs, past_len)
        logits, cache = self._step(ids, feeds[ATTENTION_MASK], feeds[POSITION_IDS], cache, last_only=False)
        out = {LOGITS: logits}
        out.update(zip(self._present_names, self.cache_to_numpy(cache)))
        return out
