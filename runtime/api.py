"""The Python API over an export bundle: load, generate, stream, chat.

Where it stands: the top of the runtime. ``GlmModel.load`` reads the bundle's manifest (and nothing else about the
model), opens the backend on the bundle's graph and, on first need, the bundle's tokenizer; the decode loop is
``runtime.generate``. Nothing here imports torch, transformers or the exporter.

    from runtime import GlmModel, GenerationConfig

    with GlmModel.load("bundle/") as model:
        print(model.generate("Hello", GenerationConfig(max_new_tokens=32)).text)
        for piece in model.stream("Hello", GenerationConfig(do_sample=True, seed=0)):
            print(piece.text, end="", flush=True)

Backends: ``backend="onnxruntime"`` (default; ``provider`` cpu, cuda or tensorrt, the last with ``trt_options``, a
``runtime.tensorrt.ep_options.TrtProviderOptions``) or ``backend="tensorrt"`` with ``engine_dir``, a native engine built by
``glm-export trt --model BUNDLE_DIR --out ENGINE_DIR`` (the bundle still gives the manifest and the tokenizer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Collection, Dict, Iterator, List, Mapping, NamedTuple, Optional
from typing import Sequence, Tuple, Union, cast

import numpy as np

from runtime.backend_options import check_backend_options
from runtime.errors import BackendError, BundleError, GenerationError, TokenizerError
from runtime.backends.base import DecoderBackend
from runtime.generate import DEFAULT_PREFILL_CHUNK, Generation
from runtime.graph_check import check_session_matches_spec
from runtime.graph_contract import SEQ, TOTAL
from runtime.manifest import GRAPH_FLAVOURS, GRAPH_FUSED, GRAPH_PORTABLE, Manifest, read_manifest
from runtime.positions import PositionRule
from runtime.sampling import GenerationConfig
from runtime.user_input import check_text, check_threads
from runtime.spec import CHAT_NONE, TOKENIZER_NONE, ModelSpec
from runtime.tensorrt.ep_options import TrtProviderOptions
from runtime.tensorrt.profiles import Profile, prefill_chunk_refusal, widest

if TYPE_CHECKING:
    from runtime.tokenizer import Tokenizer

BACKENDS = ("onnxruntime", "tensorrt")
AUTO = "auto"  # prefill_chunk: DEFAULT_PREFILL_CHUNK on onnxruntime (at most the TensorRT profile's max input
#                length with provider tensorrt), the whole prompt in one forward on a native TensorRT engine

Prompt = Union[str, Sequence[int]]
Message = Mapping[str, str]


@dataclass
class GenerationResult:
    prompt_ids: List[int]
    generated_ids: List[int]
    text: Optional[str]  # decoded new text (no eos, ends before a stop string); None when the bundle has no tokenizer
    finish_reason: str  # "eos" | "stop" | "length" | "context"
    timings: Dict[str, float] = field(default_factory=dict)  # prefill_ms, decode_ms, decode_steps, decode_tokens_per_s

    def to_dict(self) -> Dict[str, Any]:
        return {
            "prompt_ids": list(self.prompt_ids),
            "generated_ids": list(self.generated_ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "timings": dict(self.timings),
        }


class StreamPiece(NamedTuple):
    token_id: int
    text: str  # the text this token releases (may be "" while a multi-byte character or a stop prefix waits)
    finish_reason: Optional[str]  # set on the last piece


class TextStream:
    """Iterate for :class:`StreamPiece`s (``.text`` and ``.token_id``); ``result`` is set once it is exhausted."""

    def __init__(self, run: Generation):
        self._run = run
        self.result: Optional[GenerationResult] = None

    def __iter__(self) -> Iterator[StreamPiece]:
        for event in self._run:
            yield StreamPiece(event.token_id, event.text, event.finish_reason)
        self.result = _results(self._run)[0]


def choose_graph(manifest: Manifest, provider: str, graph: str = AUTO) -> str:
    """Which of the bundle's graphs the onnxruntime backend runs: ``graph`` when given ("fused" or "portable"), else
    the fused graph when the bundle has one, its cache is float32 (the fused graph's) and the provider is not
    tensorrt (its contrib ops are onnxruntime's)."""
    if graph == AUTO:
        tensorrt = str(provider).lower().startswith("tensorrt")
        fits = GRAPH_FUSED in manifest.graphs and manifest.kv_dtype == "float32"
        return GRAPH_FUSED if fits and not tensorrt else GRAPH_PORTABLE
    if graph not in GRAPH_FLAVOURS:
        raise BackendError(f"unknown graph {graph!r}; choose one of: {', '.join(GRAPH_FLAVOURS)} or {AUTO!r}")
    return graph


class GlmModel:
    """An exported ChatGLM bundle, ready to generate."""

    def __init__(self, bundle_dir: str, manifest: Manifest, backend: DecoderBackend, prefill_chunk: Optional[int],
                 context_length: Optional[int] = None, backend_name: str = "onnxruntime"):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.spec: ModelSpec = manifest.spec
        self.backend = backend
        self.backend_name = backend_name
        self.prefill_chunk = prefill_chunk
        # prompt + generated tokens: the model's trained context, or less where a TensorRT profile ends earlier
        full = manifest.spec.max_position_embeddings
        self.context_length = int(context_length if context_length is not None else full)
        self._tokenizer: Optional[Tokenizer] = None
        self._tokenizer_loaded = False

    @classmethod
    def load(
        cls,
        bundle_dir: str,
        provider: Optional[str] = None,
        threads: Optional[int] = None,
        *,
        backend: str = "onnxruntime",
        engine_dir: Optional[str] = None,
        device: int = 0,
        trt_options: Optional[TrtProviderOptions] = None,
        io_binding: bool = True,
        prefill_chunk: Union[int, None, str] = AUTO,
        verify_checksums: bool = False,
        verify_files: bool = True,
        graph: str = AUTO,
    ) -> "GlmModel":
        """Open a bundle written by ``glm-export onnx``.

        ``backend="onnxruntime"`` (default) runs the bundle's graph; ``provider`` is "cpu" (default), "cuda[:N]" or
        "tensorrt[:N]" (onnxruntime's TensorRT execution provider, sized and switched by ``trt_options``; its
        profile's max sequence length becomes the model's ``context_length``). ``threads`` and ``io_binding`` are
        onnxruntime's.

        ``backend="tensorrt"`` runs the native engine in ``engine_dir`` (built from this bundle by ``glm-export
        trt``) on CUDA device ``device``; the bundle gives the manifest and the tokenizer. ``context_length`` is the
        engine's max sequence length, prompts are prefilled in one forward unless ``prefill_chunk`` is given and
        the engine's profiles admit it.

        ``prefill_chunk``: prompt tokens per forward (None or 0: the whole prompt; "auto": the backend's default).

        Raises BundleError for a missing or corrupt file or a manifest newer than this runtime, BackendError when the
        backend or provider is not available (naming what to install) or options do not fit the backend,
        EngineOptionError for TensorRT sizes that are invalid. Every file the manifest lists is checked against its
        sha256 (``verify_files``; each file is hashed once, then a verified stamp keyed by its size and times
        skips it; False checks only presence and sizes); ``verify_checksums`` re-hashes every file regardless. ``graph`` (onnxruntime
        backend): "fused" (onnxruntime's contrib-op graph with the shared-buffer cache), "portable" (standard ops)
        or "auto": fused when the bundle has one and the provider is cpu or cuda (bundles the fused graph cannot
        express have none: manifest ``extra.graphs_decided``).
        """
        check_threads(threads, "threads")
        bundle_dir = os.fspath(bundle_dir)
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if not (prefill_chunk is None or prefill_chunk == AUTO
                or (isinstance(prefill_chunk, int) and not isinstance(prefill_chunk, bool) and prefill_chunk >= 0)):
            raise GenerationError(f"prefill_chunk must be a whole number >= 0, None or 'auto', got {prefill_chunk!r}")
        given = {name: [name] for name, value in (("engine_dir", engine_dir), ("provider", provider),
                                                  ("threads", threads), ("trt_options", trt_options))
                 if value is not None}
        if not io_binding:
            given["io_binding"] = ["io_binding"]
        if graph != AUTO:
            given["graph"] = ["graph"]
        check_backend_options(backend, given, provider)
        if backend == "tensorrt":  # check_backend_options refused a missing engine_dir
            return cls._load_engine(bundle_dir, cast(str, engine_dir), device, prefill_chunk, verify_checksums,
                                    verify_files=verify_files)
        provider = provider if provider is not None else "cpu"
        manifest = read_manifest(bundle_dir, check_files=True, verify_checksums=verify_checksums,
                                 verify_files=verify_files)
        flavour = choose_graph(manifest, provider, graph)
        model_path = os.path.join(bundle_dir, manifest.graph_file(flavour))
        if not os.path.isfile(model_path):
            raise BundleError(f"{model_path}: the bundle's graph is missing")
        from runtime.backends.onnxruntime import OnnxRuntimeBackend
        from runtime.backends.onnxruntime_fused import FusedOnnxRuntimeBackend

        runner_class = FusedOnnxRuntimeBackend if flavour == GRAPH_FUSED else OnnxRuntimeBackend
        kv_dtype = manifest.fused_kv_dtype if flavour == GRAPH_FUSED else manifest.kv_dtype
        runner = runner_class(
            model_path, manifest.spec, kv_dtype=kv_dtype, provider=provider, threads=threads,
            io_binding=io_binding, manifest=manifest, trt_options=trt_options,
        )
        try:
            check_session_matches_spec(runner.session, manifest.spec, kv_dtype, model_path)
        except BundleError:
            runner.close()
            raise
        profiles = [runner.profile] if runner.profile is not None else None  # provider tensorrt: one profile
        chunk, context = plan_limits(manifest.spec.max_position_embeddings, prefill_chunk, profiles, native=False)
        return cls(bundle_dir, manifest, runner, chunk, context, "onnxruntime")

    @classmethod
    def _load_engine(cls, bundle_dir: str, engine_dir: str, device: int, prefill_chunk: Union[int, None, str],
                     verify_checksums: bool, verify_files: bool = True) -> "GlmModel":
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise BackendError(f"device must be a CUDA device index >= 0, got {device!r}")
        manifest = read_manifest(bundle_dir, check_files=True, verify_checksums=verify_checksums,
                                 verify_files=verify_files)
        from runtime.backends.tensorrt import TensorRTBackend

        runner = TensorRTBackend(os.fspath(engine_dir), bundle_dir, device=device)
        try:
            chunk, context = plan_limits(manifest.spec.max_position_embeddings, prefill_chunk, runner.profiles,
                                         native=True)
        except BaseException:
            runner.close()
            raise
        return cls(bundle_dir, manifest, runner, chunk, context, "tensorrt")

    # ------------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> "GlmModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self) -> Optional[Tokenizer]:
        """The bundle's tokenizer, loaded on first use; None when the bundle has none."""
        if not self._tokenizer_loaded:
            self._tokenizer_loaded = True
            if self.spec.tokenizer_kind != TOKENIZER_NONE:
                from runtime.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.bundle_dir, self.spec)
        return self._tokenizer

    def _require_tokenizer(self, why: str) -> Tokenizer:
        tok = self.tokenizer
        if tok is None:
            raise TokenizerError(f"{self.bundle_dir}: the bundle has no tokenizer, so {why}; pass token ids instead")
        return tok

    def encode(self, prompt: Prompt) -> List[int]:
        """A text prompt -> ids with the model's prompt prefix; an id prompt is returned as a list, unchanged."""
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationError("prompt is empty: give some text or token ids")
            check_text(prompt, "prompt", max_chars=None)
            return list(self._require_tokenizer("text prompts cannot be encoded").encode_prompt(prompt))
        return _id_list(prompt)

    def _decoder_factory(self) -> Optional[Callable[[], Any]]:
        """One ``StreamDecoder`` (a ``runtime.generate.TextDecoder`` by duck typing) per sequence, or None."""
        tok = self.tokenizer
        if tok is None:
            return None
        from runtime.tokenizer import StreamDecoder

        return lambda: StreamDecoder(tok)

    # ------------------------------------------------------------------------------------------------ generation

    def start(
        self,
        prompts: Sequence[Sequence[int]],
        config: Optional[GenerationConfig] = None,
        extra_eos: Collection[int] = (),
    ) -> Generation:
        """A :class:`Generation` over id prompts with this model's context, eos ids and tokenizer; ``extra_eos``
        ids also end a sequence (the chat stop ids), on top of the config's or the model's eos ids."""
        return Generation(
            self.backend,
            prompts,
            config if config is not None else GenerationConfig(),
            context_length=self.context_length,
            vocab_size=self.spec.vocab_size,
            eos_token_ids=self.spec.eos_token_ids,
            extra_eos_token_ids=extra_eos,
            pad_token_id=self.spec.pad_token_id,
            decoder_factory=self._decoder_factory(),
            prefill_chunk=self.prefill_chunk,
            position_rule=PositionRule.from_spec(self.spec),
        )

    def generate(
        self, prompt: Union[Prompt, Sequence[Prompt]], config: Optional[GenerationConfig] = None
    ) -> Union[GenerationResult, List[GenerationResult]]:
        """Generate for one prompt (text or ids) -> a result, or for a list of prompts (one batch) -> a list."""
        prompts, single = _split_prompts(prompt)
        run = self.start([self.encode(p) for p in prompts], config)
        for _ in run:
            pass
        results = _results(run)
        return results[0] if single else results

    def stream(self, prompt: Prompt, config: Optional[GenerationConfig] = None) -> TextStream:
        """Generate for one prompt, yielding a :class:`StreamPiece` per token as it is chosen."""
        prompts, single = _split_prompts(prompt)
        if not single:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        return TextStream(self.start([self.encode(prompts[0])], config))

    def require_chat(self) -> None:
        """TokenizerError unless the bundle has a tokenizer and a chat format."""
        self._require_tokenizer("chat is unavailable")
        if self.spec.chat_format == CHAT_NONE:
            raise TokenizerError(f"{self.bundle_dir}: the model has no chat format; use a plain prompt")

    def chat_ids(self, messages: Sequence[Message]) -> List[int]:
        """The model's chat format for ``messages`` ({"role": "system"|"user"|"assistant", "content": ...}),
        ending with the assistant's turn to speak."""
        if not messages:
            raise GenerationError("chat needs at least one message")
        from runtime.chat import build_chat_ids

        return list(build_chat_ids(self._require_tokenizer("chat is unavailable"), self.spec, list(messages)))

    def _chat_run(self, messages: Sequence[Message], config: Optional[GenerationConfig]) -> Generation:
        from runtime.chat import chat_stop_ids

        ids = self.chat_ids(messages)
        tokenizer = self._require_tokenizer("chat is unavailable")
        return self.start([ids], config, extra_eos=chat_stop_ids(tokenizer, self.spec))

    def chat(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None) -> GenerationResult:
        """One assistant reply to ``messages``; stops on the model's chat stop ids as well as its eos ids."""
        run = self._chat_run(messages, config)
        for _ in run:
            pass
        return _results(run)[0]

    def chat_stream(self, messages: Sequence[Message], config: Optional[GenerationConfig] = None) -> TextStream:
        return TextStream(self._chat_run(messages, config))


# ---------------------------------------------------------------------------------------------------- helpers


def plan_limits(
    max_positions: int,
    prefill_chunk: Union[int, None, str],
    profiles: Optional[Sequence[Profile]] = None,
    native: bool = False,
) -> Tuple[Optional[int], int]:
    """(prefill chunk, context length) for a backend whose steps must lie in ``profiles`` (None: no limits).

    - no profiles (onnxruntime on cpu/cuda): "auto" is ``DEFAULT_PREFILL_CHUNK``; the context is the model's;
    - onnxruntime's TensorRT provider (one envelope profile, ``native=False``): "auto" is at most the profile's max
      input length, so any prompt up to the context prefills in chunks the profile admits; the context ends at the
      profile's max sequence length;
    - a native engine (``native=True``): "auto" is the whole prompt in one forward (what its prefill profile is for;
      its buffers are sized for it, so chunks save nothing); a given chunk must fit the profiles
      (:func:`runtime.tensorrt.profiles.prefill_chunk_refusal`); the context ends at the engine's max sequence.
    """
    if not profiles:
        return _as_chunk(DEFAULT_PREFILL_CHUNK if prefill_chunk == AUTO else prefill_chunk), int(max_positions)
    context = min(int(max_positions), widest(profiles, TOTAL))
    if not native:
        chunk = min(DEFAULT_PREFILL_CHUNK, widest(profiles, SEQ)) if prefill_chunk == AUTO else prefill_chunk
        return _as_chunk(chunk), context
    chunk = None if prefill_chunk == AUTO else prefill_chunk
    why = prefill_chunk_refusal(profiles, _as_chunk(chunk))
    if why is not None:
        raise GenerationError(f"prefill chunk {chunk} does not fit the engine: {why}; use 0 (the whole prompt in one "
                              f"forward, what the engine's prefill profile is built for)")
    return _as_chunk(chunk), context


def _as_chunk(chunk: Union[int, None, str]) -> Optional[int]:
    """A resolved prefill chunk: None (whole prompt) or a positive number of tokens."""
    if chunk is None or chunk == AUTO:
        return None
    return int(chunk) or None


def _id_list(prompt: Sequence[int]) -> List[int]:
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise GenerationError(f"a prompt must be text or a list of token ids, got {prompt!r:.80}") from None
    for orig in prompt:
        if isinstance(orig, (bool, np.bool_)) or isinstance(orig, float) and not float(orig).is_integer():
            raise GenerationError(f"token ids must be integers, got {orig!r}")
    return ids


def _split_prompts(prompt: Any) -> Tuple[list, bool]:
    """-> (prompts, single). A str or a flat list of ints is one prompt; a list of those is a batch."""
    if isinstance(prompt, str):
        return [prompt], True
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)):
        raise GenerationError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        return [prompt], True  # an empty prompt: refused with a clear message by the generation checks
    if all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt):
        return list(prompt), False
    return [prompt], True


def _results(run: Generation) -> List[GenerationResult]:
    timings = run.timings
    out = []
    for seq in run.sequences:
        if seq.finish_reason is None:
            raise GenerationError("generation was not run to the end")
        out.append(GenerationResult(list(seq.prompt_ids), list(seq.generated_ids), seq.text, seq.finish_reason,
                                    dict(timings)))
    return out
