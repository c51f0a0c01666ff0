"""TensorRT backend: runs an engine built by ``glm-export trt --model BUNDLE_DIR --out ENGINE_DIR``, cache on the GPU.

Implements ``runtime.backends.base.DecoderBackend``; ``GlmModel.load(bundle, backend="tensorrt", engine_dir=...)``
and ``glm-export run/chat/bench --backend tensorrt --engine ENGINE_DIR`` use it. Reads ``engine.json`` (refusing an
engine built for another TensorRT release, GPU or bundle, see ``runtime.tensorrt.engine_record``) and ``engine.plan``. The KV
cache lives in two sets of device buffers sized for the engine's largest batch and sequence: a step reads
``past_key_values.*`` from the set its :class:`KVCache` names and writes ``present.*`` into the other (ping-pong), so
only the token ids go in and only the last position's logits come back; hence one live cache per backend at a time.
``select_profile`` picks the optimization profile per step. Imports ``tensorrt`` and cuda-python only when a backend
is made; never imports torch.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from runtime.errors import BackendError, read_json_object
from runtime.graph_contract import ATTENTION_MASK, BATCH, INPUT_IDS, LOGITS, POSITION_IDS, SEQ, TOTAL, TensorSpec
from runtime.graph_contract import past_key_name, past_names, present_key_name, present_names
from runtime.manifest import MANIFEST_NAME, sha256_of
from runtime.tensorrt.engine_record import BUILD_COMMAND, ENGINE_PLAN, ENGINE_RECORD, compute_capability_text, engine_compatibility
from runtime.tensorrt.engine_record import engine_matches_bundle, gpu_name_text
from runtime.tensorrt.profiles import Profile, select_profile
from runtime.backends.base import KVCache, check_feed_shapes

log = logging.getLogger("glm_export")
INSTALL_HINT = "install TensorRT 10 (pip install tensorrt-cu12) and cuda-python (pip install cuda-python)"
BUILD_HINT = f"build one with '{BUILD_COMMAND}'"


def import_tensorrt() -> Any:
    """The tensorrt module, or a one-line BackendError naming what to install (the engine builder,
    ``exporter.tensorrt.build``, imports it through here too)."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendError(f"the tensorrt package is not installed ({e}); {INSTALL_HINT}") from None
    except Exception as e:  # a broken install raises OSError/RuntimeError while loading libnvinfer
        raise BackendError(f"the tensorrt package failed to load ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(f"cuda-python is not installed (no module cuda.bindings or cuda.cudart); "
                               f"{INSTALL_HINT}") from None
    return cudart


def _ok(result: Tuple[Any, ...]) -> Any:
    """cuda-python returns (error, value...): raise on an error, else return the value (or None)."""
    if result[0] != _cudart().cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA call failed: {result[0]!r}")
    return result[1] if len(result) > 1 else None


def current_gpu(device: int = 0) -> Tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device."""
    props = _ok(_cudart().cudaGetDeviceProperties(device))
    return gpu_name_text(props.name), compute_capability_text(props.major, props.minor)


def read_engine_record(engine_dir: str) -> Dict[str, Any]:
    """``engine.json`` of an engine directory; BackendError (one line) where it is missing or not a record."""
    if not os.path.isdir(engine_dir):
        raise BackendError(f"{engine_dir}: no such engine directory; {BUILD_HINT}")
    path = os.path.join(engine_dir, ENGINE_RECORD)
    if not os.path.isfile(path):
        raise BackendError(
            f"{path}: unreadable (no such file); is {engine_dir} written by 'glm-export trt'? (trtexec writes no "
            f"{ENGINE_RECORD}); {BUILD_HINT}"
        )
    return read_json_object(path, BackendError, "engine record", hint=BUILD_HINT)


class TensorRTBackend:
    """A ``DecoderBackend`` over one engine; caches are two device buffer sets used in turn."""

    def __init__(self, engine_dir: str, bundle_dir: Optional[str] = None, device: int = 0) -> None:
        """Open ``engine_dir`` on CUDA device ``device``. With ``bundle_dir``, refuse an engine built from another
        bundle. Checks, in order, each a one-line BackendError: ``engine.json`` readable, tensorrt importable,
        cuda-python importable, engine built by this TensorRT major.minor for this GPU's compute capability."""
        self._buffers: List[int] = []
        self._stream: Any = None
        record = read_engine_record(engine_dir)
        import_tensorrt()
        self._cudart = _cudart()
        try:
            self._open(record, engine_dir, bundle_dir, device)
        except BaseException:
            self.close()
            raise

    def _open(self, record: Dict[str, Any], engine_dir: str, bundle_dir: Optional[str], device: int) -> None:
        import tensorrt as trt  # importable: __init__ checked

        _ok(self._cudart.cudaSetDevice(device))
        gpu, cc = current_gpu(device)
        refusal = engine_compatibility(record, trt.__version__, gpu, cc)
        if refusal is None and bundle_dir is not None:
            refusal = engine_matches_bundle(record, sha256_of(os.path.join(bundle_dir, MANIFEST_NAME)))
        if refusal is not None:
            raise BackendError(refusal)
        if record.get("gpu_name") != gpu:
            log.warning("engine built on %s runs on %s (same compute capability)", record.get("gpu_name"), gpu)
        self.profiles = [Profile.from_dict(p) for p in record["profiles"]]
        self.input_names = tuple(t["name"] for t in record["inputs"])
        self.output_names = tuple(t["name"] for t in record["outputs"])
        outputs = {t.name: t for t in (TensorSpec.from_dict(d) for d in record["outputs"])}
        self.num_layers = sum(1 for n in outputs if n.startswith("present.") and n.endswith(".key"))
        kv_shape = outputs[present_key_name(0)].shape  # (batch, kv_heads, past_plus_seq, head_dim)
        self.kv_heads, self.head_dim = int(kv_shape[1]), int(kv_shape[3])
        self.vocab = int(outputs[LOGITS].shape[-1])
        widest = {d: max(p.max_of(d) for p in self.profiles) for d in (BATCH, SEQ, TOTAL)}
        self.max_batch, self.max_seq, self.max_total = widest[BATCH], widest[SEQ], widest[TOTAL]
        self._past_names = past_names(self.num_layers)
        self._present_names = present_names(self.num_layers)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with open(os.path.join(engine_dir, ENGINE_PLAN), "rb") as f:
            engine = self._runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_dir}/{ENGINE_PLAN}; rebuild the engine here")
        self._engine: trt.ICudaEngine = engine
        self._context: trt.IExecutionContext = engine.create_execution_context()
        self._stream = _ok(self._cudart.cudaStreamCreate())
        io_names = self.input_names + self.output_names
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in io_names}
        self.kv_dtype = self._dtypes[present_key_name(0)]
        # Device memory layout. Each past/present buffer holds the largest cache any profile admits,
        # [max_batch, kv_heads, max_total, head_dim]; a cache of `batch` rows and `length` positions occupies its
        # start densely as [batch, kv_heads, length, head_dim] in C order (TensorRT writes a present exactly so),
        # so row r begins r * kv_heads * length * head_dim * itemsize bytes in. Two such sets alternate: a step
        # reads the pasts from one and writes the presents into the other.
        kv_bytes = self.max_batch * self.kv_heads * self.max_total * self.head_dim * self.kv_dtype.itemsize
        self._sets = [[self._alloc(kv_bytes) for _ in self._past_names] for _ in range(2)]
        # token inputs [max_batch, max_seq] (mask: [max_batch, max_total]) and logits [max_batch, max_seq, vocab],
        # each used densely at the step's own [batch, seq(, vocab)] shape
        rows, item = self.max_batch, self._dtypes[LOGITS].itemsize
        # position_ids get two rows per sequence: room for ChatGLM-6B's [batch, 2, seq]
        self._dev = {n: self._alloc(k * rows * self.max_seq * self._dtypes[n].itemsize)
                     for n, k in ((INPUT_IDS, 1), (POSITION_IDS, 2))}
        self._dev[ATTENTION_MASK] = self._alloc(rows * self.max_total * self._dtypes[ATTENTION_MASK].itemsize)
        self._dev[LOGITS] = self._alloc(rows * self.max_seq * self.vocab * item)
        self._profile = -1

    def _alloc(self, nbytes: int) -> int:
        ptr = int(_ok(self._cudart.cudaMalloc(max(nbytes, 1))))
        self._buffers.append(ptr)
        return ptr

    def _copy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        kind = self._cudart.cudaMemcpyKind
        direction = kind.cudaMemcpyHostToDevice if to_device else kind.cudaMemcpyDeviceToHost
        _ok(self._cudart.cudaMemcpyAsync(dst, src, nbytes, direction, self._stream))

    def _execute(self, feeds: Mapping[str, np.ndarray], cache: KVCache, seq: int) -> List[int]:
        """Bind the step's inputs and the cache, run; returns the device set now holding the presents."""
        batch, past, ctx = cache.batch, cache.length, self._context
        index = select_profile(self.profiles, batch, seq, past)
        if index != self._profile:
            if not ctx.set_optimization_profile_async(index, int(self._stream)):
                raise BackendError(f"TensorRT refused optimization profile {index}")
            self._profile = index
        for name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS):
            host = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            self._copy(self._dev[name], host.ctypes.data, host.nbytes, to_device=True)
            ctx.set_input_shape(name, tuple(host.shape))
            ctx.set_tensor_address(name, self._dev[name])
        read = cache.tensors
        write = self._other_set(read)
        for past_name, present_name, src, dst in zip(self._past_names, self._present_names, read, write):
            ctx.set_input_shape(past_name, (batch, self.kv_heads, past, self.head_dim))
            ctx.set_tensor_address(past_name, src)
            ctx.set_tensor_address(present_name, dst)
        ctx.set_tensor_address(LOGITS, self._dev[LOGITS])
        if not ctx.execute_async_v3(int(self._stream)):  # TensorRT takes the stream as an integer handle
            raise BackendError("TensorRT execution failed; the TensorRT log says why")
        return write

    def _other_set(self, tensors: List[int]) -> List[int]:
        """The device set a step reading ``tensors`` writes into (the one not holding the live cache)."""
        return self._sets[1] if tensors is self._sets[0] else self._sets[0]

    # ------------------------------------------------------------------------------------------- DecoderBackend

    def empty_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:  # Concat cache: no capacity
        return KVCache(self._sets[0], batch, 0)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache
    ) -> Tuple[np.ndarray, KVCache]:
        check_feed_shapes(input_ids, attention_mask, position_ids, cache)
        seq = int(input_ids.shape[1])
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}
        write = self._execute(feeds, cache, seq)
        logits = np.empty((cache.batch, self.vocab), dtype=self._dtypes[LOGITS])  # host [batch, vocab]
        # device logits are [batch, seq, vocab] in C order: one position is `row` bytes, one batch row seq * row.
        # Only position seq-1 of each batch row comes back: a 2-D copy of `batch` rows of `row` bytes, starting at
        # (seq - 1) * row with a source pitch of seq * row, into the host's dense [batch, vocab].
        row = self.vocab * logits.itemsize
        d2h = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        last = self._dev[LOGITS] + (seq - 1) * row
        copy = self._cudart.cudaMemcpy2DAsync
        _ok(copy(logits.ctypes.data, row, last, seq * row, row, cache.batch, d2h, self._stream))
        _ok(self._cudart.cudaStreamSynchronize(self._stream))
        return logits.astype(np.float32, copy=False), KVCache(write, cache.batch, cache.length + seq)

    def select_rows(self, cache: KVCache, rows: np.ndarray) -> KVCache:
        """Copy ``rows`` of the live cache, in that order, into the other device set (device to device)."""
        picked = [int(r) for r in np.asarray(rows, dtype=np.int64).reshape(-1)]
        if any(r < 0 or r >= cache.batch for r in picked):
            raise ValueError(f"rows {picked} outside a cache of {cache.batch} rows")
        # one batch row of a dense [batch, kv_heads, length, head_dim] cache: kv_heads * length * head_dim items;
        # kept row r goes to row j of the other set, so the result is dense [len(rows), kv_heads, length, head_dim]
        row_bytes = self.kv_heads * cache.length * self.head_dim * self.kv_dtype.itemsize
        write = self._other_set(cache.tensors)
        d2d = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        for src, dst in zip(cache.tensors, write):
            for j, r in enumerate(picked):
                if row_bytes:
                    _ok(self._cudart.cudaMemcpyAsync(dst + j * row_bytes, src + r * row_bytes, row_bytes, d2d,
                                                     self._stream))
        return KVCache(write, len(picked), cache.length)

    def cache_to_numpy(self, cache: KVCache) -> List[np.ndarray]:
        shape = (cache.batch, self.kv_heads, cache.length, self.head_dim)
        out = [np.empty(shape, dtype=self.kv_dtype) for _ in cache.tensors]
        for host, ptr in zip(out, cache.tensors):
            self._copy(host.ctypes.data, ptr, host.nbytes, to_device=False)
        _ok(self._cudart.cudaStreamSynchronize(self._stream))
        return out

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Plain inference with host pasts (tests, debugging): every output back as numpy."""
        batch, seq = (int(n) for n in feeds[INPUT_IDS].shape)
        past = int(feeds[past_key_name(0)].shape[2])
        cache = self.empty_cache(batch)
        for name, ptr in zip(self._past_names, cache.tensors):
            host = np.ascontiguousarray(feeds[name], dtype=self.kv_dtype)
            self._copy(ptr, host.ctypes.data, host.nbytes, to_device=True)
        write = self._execute(feeds, KVCache(cache.tensors, batch, past), seq)
        out = {LOGITS: np.empty((batch, seq, self.vocab), dtype=self._dtypes[LOGITS])}
        self._copy(out[LOGITS].ctypes.data, self._dev[LOGITS], out[LOGITS].nbytes, to_device=False)
        presents = self.cache_to_numpy(KVCache(write, batch, past + seq))
        out.update(zip(self._present_names, presents))
        return out

    def close(self) -> None:
        """Free the device buffers and the stream; the backend is unusable afterwards."""
        for name in ("_context", "_engine", "_runtime"):  # TensorRT objects go before the memory they use
            self.__dict__.pop(name, None)
        for ptr in self._buffers:
            self._cudart.cudaFree(ptr)
        self._buffers = []
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
