"""onnxruntime backend: one InferenceSession over the bundle's model.onnx, KV cache kept as OrtValues.

Where it stands: ``runtime.api`` builds it from a bundle; ``runtime.generate`` calls :meth:`forward` once per
prefill chunk and once per decoded token.

With ``io_binding=True`` (the default) the ``present.*`` outputs are allocated by onnxruntime on the execution
device and bound, unchanged, as the next step's ``past_key_values.*`` inputs: the cache never travels through numpy.
Only ``input_ids``/``attention_mask``/``position_ids`` go in from the host and only the logits come back. The graph's
own Concat still writes past+new into a fresh present each step (that is the ONNX contract); what this avoids is the
extra host round trip of every layer's cache per token. ``io_binding=False`` is the plain ``session.run`` path, kept
for comparison and for debugging. On the CPU provider both paths measure the same (onnxruntime's plain run does
not copy CPU tensors either); the binding matters where the cache lives on a GPU.

Providers and their options come from :func:`provider_config` (pure, tested without a GPU). For ``tensorrt`` that is
``runtime.tensorrt.ep_options.tensorrt_ep_options``: one explicit profile from the bundle's manifest and the sizes in
``runtime.tensorrt.ep_options.TrtProviderOptions``, the FP16 switch and the engine cache directory; every step is then checked
against that profile before it reaches onnxruntime, so a step outside it is refused with the size option to raise.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from runtime.backend_options import check_backend_options
from runtime.errors import BackendError, BundleError, first_line
from runtime.manifest import Manifest
from runtime.spec import ModelSpec
from runtime.steps import empty_past
from runtime.tensorrt.ep_options import TrtProviderOptions
from runtime.tensorrt.profiles import Profile, select_profile
from runtime.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, past_names, present_names
from runtime.backends.base import KVCache, as_int64, check_feed_shapes

log = logging.getLogger("glm_export")

# user-facing provider name -> (onnxruntime providers in preference order, OrtValue device type)
PROVIDERS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "cpu": (("CPUExecutionProvider",), "cpu"),
    "cuda": (("CUDAExecutionProvider", "CPUExecutionProvider"), "cuda"),
    "tensorrt": (("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), "cuda"),
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(
            "onnxruntime is not installed; install it with 'pip install onnxruntime' "
            "(or onnxruntime-gpu for --provider cuda/tensorrt)"
        ) from None
    return onnxruntime


def parse_provider(provider: str) -> Tuple[str, int]:
    """'cpu' | 'cuda' | 'cuda:1' | 'tensorrt[:N]' -> (name, device id)."""
    name, _, idx = str(provider).strip().lower().partition(":")
    if name not in PROVIDERS:
        raise BackendError(f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}")
    if idx and not idx.isdigit():
        raise BackendError(f"provider {provider!r}: the device index after ':' must be a number")
    if idx and name == "cpu":
        raise BackendError("provider 'cpu' takes no device index")
    return name, int(idx or 0)


def provider_config(
    provider: str,
    manifest: Optional[Manifest] = None,
    trt_options: Optional[TrtProviderOptions] = None,
) -> Tuple[List[str], List[Dict[str, str]]]:
    """``(providers, provider_options)`` for ``onnxruntime.InferenceSession``: the providers in preference order and
    one options dict each (all values strings, as onnxruntime takes them).

    cpu: CPU only. cuda[:N]: CUDA on device N, then CPU. tensorrt[:N]: TensorRT with
    ``runtime.tensorrt.ep_options.tensorrt_ep_options`` for this bundle (``trt_options``, defaults when None), then CUDA, then CPU
    (for the nodes TensorRT does not take). ``manifest`` is needed for tensorrt (the profile covers every graph
    input); ``trt_options`` with another provider is refused rather than ignored.
    """
    name, device_id = parse_provider(provider)
    check_backend_options("onnxruntime", {"trt_options": ["trt_options"]} if trt_options is not None else {}, name)
    wanted = PROVIDERS[name][0]
    options: List[Dict[str, str]] = []
    for p in wanted:
        if p == "CPUExecutionProvider":
            options.append({})
        elif p == "TensorrtExecutionProvider":
            if manifest is None:
                raise BackendError("provider 'tensorrt' needs the bundle's manifest to size its optimization profile")
            options.append((trt_options or TrtProviderOptions()).provider_options(manifest, device_id))
        else:
            options.append({"device_id": str(device_id)})
    return list(wanted), options


def new_session(model_path: str, threads: Optional[int] = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                provider_options: Optional[List[Dict[str, str]]] = None,
                configure: Optional[Callable[[Any], None]] = None) -> Any:
    """An ``onnxruntime.InferenceSession`` over ``model_path``: the one place sessions are built (the backend, the
    exporter's verification and the tests use it). Errors only in onnxruntime's log, sequential execution, one
    inter-op thread, ``threads`` intra-op threads (onnxruntime's default when None). onnxruntime's own exceptions
    propagate: the caller knows which typed error a failure is. ``configure(options)``, when given, adjusts the
    ``SessionOptions`` last."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only; the library logs, it does not print
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = threads
    if configure is not None:
        configure(opts)
    return ort.InferenceSession(model_path, sess_options=opts, providers=list(providers),
                                provider_options=provider_options)


def check_threads(threads: Optional[int]) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BackendError(f"threads must be a positive integer, got {threads!r}")


class OnnxRuntimeBackend:
    """A ChatGLM decoder graph (see ``runtime.graph_contract``) run by onnxruntime."""

    def __init__(
        self,
        model_path: str,
        spec: ModelSpec,
        kv_dtype: str = "float32",
        provider: str = "cpu",
        threads: Optional[int] = None,
        io_binding: bool = True,
        *,
        manifest: Optional[Manifest] = None,
        trt_options: Optional[TrtProviderOptions] = None,
    ):
        name, device_id = parse_provider(provider)
        provider_names, provider_options = provider_config(provider, manifest, trt_options)  # option errors first
        ort = _import_ort()
        _check_provider_available(ort, name)
        check_threads(threads)
        if not os.path.isfile(model_path):
            raise BundleError(f"{model_path}: model file missing from the bundle")
        self.session = _open_session(model_path, name, threads, provider_names, provider_options)

        self.provider = name
        # the TensorRT provider's single profile: steps outside it are refused here, not deep inside onnxruntime
        self.profile: Optional[Profile] = None
        if name == "tensorrt" and manifest is not None:
            self.profile = (trt_options or TrtProviderOptions()).profile(manifest)
        self.device_type = PROVIDERS[name][1]
        self.device_id = device_id
        self.spec = spec
        self.num_layers = spec.num_layers
        self.kv_dtype: np.dtype = np.dtype(kv_dtype)
        self.io_binding = bool(io_binding)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._past_names = past_names(self.num_layers)
        self._present_names = present_names(self.num_layers)
        self._check_contract(model_path)
        self._ort = ort

    def _check_contract(self, model_path: str) -> None:
        """Every input and output the manifest's contract names is in the graph, or a BundleError listing them."""
        wanted_in = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + self._past_names
        missing_in = [n for n in wanted_in if n not in self.input_names]
        missing_out = [n for n in [LOGITS] + self._present_names if n not in self.output_names]
        if missing_in or missing_out:
            raise BundleError(
                f"{model_path}: graph does not follow the manifest's contract; missing "
                + ", ".join(missing_in + missing_out)
            )

    # -------------------------------------------------------------------------------------------- Backend protocol

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self.session.run(None, dict(feeds))
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxRuntimeBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- DecoderBackend

    def empty_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:  # Concat cache: no capacity
        past = empty_past(self.spec, batch, self.kv_dtype)  # each [batch, kv_heads, 0, head_dim]
        tensors = [past[n] for n in self._past_names]
        if self.io_binding:
            tensors = [self._ort.OrtValue.ortvalue_from_numpy(z, self.device_type, self.device_id) for z in tensors]
        return KVCache(tensors, batch, 0)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: KVCache
    ) -> Tuple[np.ndarray, KVCache]:
        check_feed_shapes(input_ids, attention_mask, position_ids, cache)
        if self.session is None:
            raise BackendError("the backend was closed")
        if self.profile is not None:
            select_profile([self.profile], cache.batch, int(input_ids.shape[1]), cache.length,
                           owner="the TensorRT provider profile's", remedy=_reload_with)
        host = {
            INPUT_IDS: as_int64(input_ids),
            ATTENTION_MASK: as_int64(attention_mask),
            POSITION_IDS: as_int64(position_ids),
        }
        new_len = cache.length + input_ids.shape[1]
        if not self.io_binding:
            feeds = dict(host)
            feeds.update(zip(self._past_names, cache.tensors))
            outs = self.session.run([LOGITS] + self._present_names, feeds)
            return _last(outs[0]), KVCache(list(outs[1:]), cache.batch, new_len)

        binding = self.session.io_binding()
        for name, arr in host.items():
            binding.bind_cpu_input(name, arr)  # the arrays stay alive in `host` until run returns
        for name, value in zip(self._past_names, cache.tensors):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()  # OrtValues in binding order
        logits = _last(outs[0].numpy())
        presents = [outs[i] for i in range(1, len(outs))]
        return logits, KVCache(presents, cache.batch, new_len)

    def select_rows(self, cache: KVCache, rows: np.ndarray) -> KVCache:
        rows = np.asarray(rows, dtype=np.int64)
        host = [t if isinstance(t, np.ndarray) else t.numpy() for t in cache.tensors]
        kept = [np.ascontiguousarray(a[rows]) for a in host]
        if self.io_binding:  # back onto the device; on the CPU the OrtValue wraps the array (it keeps it alive)
            kept = [self._ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id) for a in kept]
        return KVCache(kept, int(rows.size), cache.length)

    def cache_to_numpy(self, cache: KVCache) -> List[np.ndarray]:
        return [t.numpy() if hasattr(t, "numpy") else np.array(t, copy=True) for t in cache.tensors]

    def cache_from_numpy(self, arrays: List[np.ndarray], length: int) -> KVCache:
        """A cache holding host arrays [batch, kv_heads, length, head_dim] (graph output order), placed as the
        loop's own caches are: how the server's scheduler (``runtime.serve.kv_rows``) joins rows into a batch."""
        host = [np.ascontiguousarray(a, dtype=self.kv_dtype) for a in arrays]
        batch = int(host[0].shape[0]) if host else 0
        if self.io_binding:
            return KVCache([self._ort.OrtValue.ortvalue_from_numpy(a, self.device_type, self.device_id) for a in host],
                           batch, int(length))
        return KVCache(host, batch, int(length))


def _check_provider_available(ort: Any, name: str) -> None:
    """BackendError when this onnxruntime lacks the provider ``name`` needs first."""
    wanted = PROVIDERS[name][0][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendError(
            f"provider {name!r} needs onnxruntime's {wanted}, which this onnxruntime "
            f"({ort.__version__}) does not have; available: {', '.join(available)}"
            + ("; install onnxruntime-gpu" if name != "cpu" else "")
        )


def _open_session(model_path: str, name: str, threads: Optional[int], provider_names: List[str],
                  provider_options: List[Dict[str, str]]) -> Any:
    """The backend's session; a bad file is a BundleError, a provider failing a BackendError (one line each)."""
    try:
        session = new_session(model_path, threads, provider_names, provider_options)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        msg = first_line(e)
        if name == "cpu":
            raise BundleError(f"{model_path}: onnxruntime cannot load it ({msg})") from None
        raise BackendError(  # a bad file, or the provider failing (a TensorRT build, missing CUDA libraries)
            f"{model_path}: onnxruntime cannot load it with provider {name!r} ({msg})"
        ) from None
    wanted = provider_names[0]
    if wanted not in session.get_providers():  # onnxruntime falls back silently, e.g. missing CUDA libs
        raise BackendError(
            f"onnxruntime could not start {wanted} (CUDA/TensorRT libraries missing?); "
            f"the session runs on: {', '.join(session.get_providers())}"
        )
    return session


def _reload_with(option: str) -> str:
    return f"load the model with {option} (TrtProviderOptions in the Python API)"


def _last(logits: np.ndarray) -> np.ndarray:
    """[batch, seq, vocab] -> the last position's [batch, vocab], float32."""
    return np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)
