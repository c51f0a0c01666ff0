"""The shapes a TensorRT engine must serve for text generation, and onnxruntime's TensorRT execution provider options.

Both TensorRT routes size their engines from the same data:

- native engines (``glm-export trt``, ``exporter.tensorrt.build``; ``trtexec`` via ``exporter.tensorrt.trtexec``) get two
  optimization profiles, prefill and decode (:func:`profiles_for_generation`), and the TensorRT backend picks one per
  step (``runtime.tensorrt.profiles.select_profile``);
- onnxruntime's TensorRT execution provider (``--provider tensorrt``) gets :func:`tensorrt_ep_options`: the
  provider-options dict with ONE explicit profile, the envelope of the prefill and decode profiles, because that
  provider builds every profile it is given but runs each step on profile 0 (microsoft/onnxruntime pull request
  #31624, "TensorRT EP ... execution context remained on profile 0", open at the time of writing).

With B = max batch, L = max input (prompt) length and S = max sequence length (prompt + generated)::

    prefill  batch 1..B, seq 1..L, past 0..S-L, past_plus_seq 1..S    (prompt, from an empty or short cache)
    decode   batch 1..B, seq 1,    past 1..S-1, past_plus_seq 2..S    (one token at a time)
    envelope batch 1..B, seq 1..L, past 0..S-1, past_plus_seq 1..S    (the execution provider's single profile)

Every graph input gets min/opt/max shapes from its symbolic dims, so each ``past_key_values.{i}.key|value`` is covered
along with ``input_ids``, ``attention_mask`` and ``position_ids``. Pure Python (3.8), no TensorRT, no onnxruntime;
the exporter's engine builder, trtexec command and graph check import the profile half from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from runtime.errors import BundleError, GlmExportError
from runtime.graph_contract import BATCH, PAST, SEQ, TOTAL, TensorSpec
from runtime.manifest import PRECISION_TABLE, Manifest
from runtime.tensorrt.profiles import Profile, Range, Shape, ShapeRange, shape_spec

__all__ = [
    "EngineOptionError",
    "ProfileRequest",
    "TrtProviderOptions",
    "check_builder_settings",
    "envelope_profile",
    "generation_dims",
    "profiles_for_generation",
    "profiles_for_manifest",
    "request_with_defaults",
    "tensorrt_ep_options",
]


class EngineOptionError(GlmExportError):
    """A TensorRT engine option (--max-batch, --max-input-len, --max-seq-len, --opt-seq, --fp16, ...) is invalid."""


@dataclass(frozen=True)
class ProfileRequest:
    """The sizes an engine must serve, as the user gives them on the command line.

    ``opt_batch`` and ``opt_seq`` are the sizes TensorRT tunes kernels for: the usual batch and the usual prompt
    length. ``opt_seq`` defaults to half of ``max_input_len``. Decode is tuned for ``opt_seq`` cached tokens.
    """

    max_batch: int
    max_input_len: int
    max_seq_len: int
    opt_batch: int = 1
    opt_seq: Optional[int] = None

    def __post_init__(self) -> None:
        for option, value in (
            ("--max-batch", self.max_batch),
            ("--max-input-len", self.max_input_len),
            ("--max-seq-len", self.max_seq_len),
            ("--opt-batch", self.opt_batch),
            ("--opt-seq", self.opt_seq),
        ):
            if value is None and option == "--opt-seq":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise EngineOptionError(f"{option} must be a whole number, got {value!r}")
            if value < 1:
                raise EngineOptionError(f"{option} must be at least 1, got {value}")
        if self.max_seq_len < 2:
            raise EngineOptionError(
                f"--max-seq-len must be at least 2 (one prompt token and one generated token), got {self.max_seq_len}"
            )
        if self.max_input_len > self.max_seq_len:
            raise EngineOptionError(
                f"--max-input-len {self.max_input_len} is larger than --max-seq-len {self.max_seq_len}; the prompt "
                f"is part of the sequence, so raise --max-seq-len or lower --max-input-len"
            )
        if self.opt_batch > self.max_batch:
            raise EngineOptionError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.opt_seq is not None and self.opt_seq > self.max_input_len:
            raise EngineOptionError(f"--opt-seq {self.opt_seq} is larger than --max-input-len {self.max_input_len}")

    @property
    def prompt_opt(self) -> int:
        return self.opt_seq if self.opt_seq is not None else max(1, self.max_input_len // 2)


def check_builder_settings(workspace_mib: Optional[int] = None, builder_opt_level: Optional[int] = None) -> None:
    """The TensorRT builder settings both routes take (None: TensorRT's default): the workspace limit in MiB and the
    builder optimization level."""
    if workspace_mib is not None and workspace_mib < 1:
        raise EngineOptionError(f"--workspace must be at least 1 MiB, got {workspace_mib} MiB")
    if builder_opt_level is not None and not 0 <= builder_opt_level <= 5:
        raise EngineOptionError(f"--builder-opt-level must be 0..5, got {builder_opt_level}")


DEFAULT_MAX_SEQ_LEN = 2048  # --max-seq-len when not given (or the model's context, when shorter)


def request_with_defaults(
    max_positions: int,
    max_batch: Optional[int] = None,
    max_input_len: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    opt_batch: Optional[int] = None,
    opt_seq: Optional[int] = None,
) -> ProfileRequest:
    """A :class:`ProfileRequest` from command-line values, None meaning "not given": max batch 1, max sequence
    ``min(2048, max_positions)``, max input half the max sequence, opt batch 1, opt seq half the max input."""
    seq = max_seq_len if max_seq_len is not None else min(DEFAULT_MAX_SEQ_LEN, max_positions)
    return ProfileRequest(
        max_batch=max_batch if max_batch is not None else 1,
        max_input_len=max_input_len if max_input_len is not None else max(1, seq // 2),
        max_seq_len=seq,
        opt_batch=opt_batch if opt_batch is not None else 1,
        opt_seq=opt_seq,
    )


def generation_dims(request: ProfileRequest) -> Dict[str, Dict[str, Range]]:
    """The (min, opt, max) of every symbolic dim, for the prefill and the decode profile."""
    b, big_l, s = request.max_batch, request.max_input_len, request.max_seq_len
    ob, os_ = request.opt_batch, request.prompt_opt
    decode_past_opt = min(max(os_, 1), s - 1)
    return {
        "prefill": {
            BATCH: (1, ob, b),
            SEQ: (1, os_, big_l),
            PAST: (0, 0, s - big_l),
            TOTAL: (1, os_, s),
        },
        "decode": {
            BATCH: (1, ob, b),
            SEQ: (1, 1, 1),
            PAST: (1, decode_past_opt, s - 1),
            TOTAL: (2, decode_past_opt + 1, s),
        },
    }


def _check_context(request: ProfileRequest, max_positions: Optional[int]) -> None:
    if max_positions is not None and request.max_seq_len > max_positions:
        raise EngineOptionError(
            f"--max-seq-len {request.max_seq_len} is longer than the model's context of {max_positions} positions; "
            f"use --max-seq-len {max_positions} or less"
        )


def _shapes_for(inputs: Sequence[TensorSpec], dims: Dict[str, Range]) -> Dict[str, ShapeRange]:
    if not inputs:
        raise BundleError("the manifest lists no graph inputs; re-export the bundle")
    return {tensor.name: _shape_range(tensor, dims) for tensor in inputs}


def profiles_for_generation(
    inputs: Sequence[TensorSpec], request: ProfileRequest, max_positions: Optional[int] = None
) -> List[Profile]:
    """The prefill and decode profiles for a graph with these inputs; every input is given shapes.

    ``max_positions`` is the model's trained context (``spec.max_position_embeddings``); a longer ``max_seq_len``
    is refused, since positions past it are outside what the model (and its rotary tables) cover.
    """
    _check_context(request, max_positions)
    return [Profile(name=name, dims=dims, shapes=_shapes_for(inputs, dims))
            for name, dims in generation_dims(request).items()]


def profiles_for_manifest(manifest: Manifest, request: ProfileRequest) -> List[Profile]:
    """:func:`profiles_for_generation` for a bundle's manifest, checked against the model's trained context."""
    return profiles_for_generation(manifest.inputs, request, manifest.spec.max_position_embeddings)


def envelope_profile(
    inputs: Sequence[TensorSpec],
    request: ProfileRequest,
    max_positions: Optional[int] = None,
    tune_for: str = "decode",
) -> Profile:
    """One profile admitting every step the prefill and decode profiles admit (each dim's widest range).

    Its opt sizes are those of the ``tune_for`` profile: "decode" (the default; a generation runs one decode step
    per new token and one prefill per prompt) or "prefill".
    """
    _check_context(request, max_positions)
    per_profile = generation_dims(request)
    if tune_for not in per_profile:
        raise ValueError(f"tune_for must be one of {sorted(per_profile)}, got {tune_for!r}")
    dims: Dict[str, Range] = {}
    for dim, (_, opt, _) in per_profile[tune_for].items():
        dims[dim] = (min(p[dim][0] for p in per_profile.values()), opt, max(p[dim][2] for p in per_profile.values()))
    return Profile(name="generation", dims=dims, shapes=_shapes_for(inputs, dims))


def _shape_range(tensor: TensorSpec, dims: Dict[str, Range]) -> ShapeRange:
    lo: List[int] = []
    opt: List[int] = []
    hi: List[int] = []
    for d in tensor.shape:
        if isinstance(d, int):
            r: Tuple[int, int, int] = (d, d, d)
        elif d in dims:
            r = dims[d]
        else:
            raise BundleError(
                f"input {tensor.name!r} has dimension {d!r}, which is none of {sorted(dims)}; glm-export cannot size "
                f"it for TensorRT; re-export the bundle with the current glm-export"
            )
        lo.append(r[0])
        opt.append(r[1])
        hi.append(r[2])
    shapes: Tuple[Shape, Shape, Shape] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


# --- onnxruntime's TensorRT execution provider -------------------------------------------------------------------
# Option names and formats from onnxruntime's TensorRT-ExecutionProvider documentation and its source
# (tensorrt_execution_provider_utils.h, ParseProfileShapes: "input1:dim1xdim2...,input2:dim1xdim2...", a name
# repeated would open a second profile). onnxruntime turns every option value into a string; bools parse from
# "True"/"False".

EP_NAME = "TensorrtExecutionProvider"
EP_PRECISIONS = tuple(name for name, facts in PRECISION_TABLE.items() if facts.tensorrt_ep)  # fp32, fp16, int8


def _flag(value: bool) -> str:
    return "True" if value else "False"


def tensorrt_ep_options(
    manifest: Manifest,
    request: ProfileRequest,
    fp16: bool = False,
    cache_dir: Optional[str] = None,
    device_id: int = 0,
    workspace_mib: Optional[int] = None,
    builder_opt_level: Optional[int] = None,
    tune_for: str = "decode",
) -> Dict[str, str]:
    """Provider options for ``("TensorrtExecutionProvider", options)`` that serve ``request`` for this bundle.

    - One explicit profile (:func:`envelope_profile`) covering every graph input, so the provider never rebuilds its
      engine when a longer prompt or cache arrives (without explicit shapes it re-profiles on new input shapes);
    - ``fp16``: let TensorRT pick FP16 kernels for an fp32 bundle (``trt_fp16_enable``); fp16 bundles always get it,
      since the provider builds weakly typed networks and fp16 tensors need the FP16 builder flag there;
    - int8 (static Q/DQ) bundles get ``trt_int8_enable`` (no calibration table: the scales are in the graph);
    - ``cache_dir``: ``trt_engine_cache_enable`` + ``trt_engine_cache_path``, so the engine is built once and reused
      (the provider rebuilds when the profile shapes differ from the cached ones). None: rebuilt every session;
    - ``workspace_mib`` -> ``trt_max_workspace_size`` (bytes); ``builder_opt_level`` ->
      ``trt_builder_optimization_level``.

    int8-dynamic and int4 bundles are refused: their operators are not TensorRT's, so onnxruntime would split the
    graph and the TensorRT parts would have inputs this profile does not describe.
    """
    if manifest.precision not in EP_PRECISIONS:
        raise EngineOptionError(
            f"a {manifest.precision} bundle cannot run on onnxruntime's TensorRT execution provider (its quantized "
            f"operators are not TensorRT's, so the graph would be split); use an fp32, fp16 or int8 (static Q/DQ) "
            f"bundle, or --provider cuda"
        )
    if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
        raise EngineOptionError(f"device id must be a whole number >= 0, got {device_id!r}")
    check_builder_settings(workspace_mib, builder_opt_level)
    profile = envelope_profile(manifest.inputs, request, manifest.spec.max_position_embeddings, tune_for)
    options: Dict[str, str] = {
        "device_id": str(device_id),
        # the provider builds weakly typed networks: the precision's builder flags, plus FP16 kernels when asked
        "trt_fp16_enable": _flag(fp16 or "FP16" in PRECISION_TABLE[manifest.precision].builder_flags),
        "trt_int8_enable": _flag("INT8" in PRECISION_TABLE[manifest.precision].builder_flags),
    }
    if cache_dir is not None:
        options["trt_engine_cache_enable"] = "True"
        options["trt_engine_cache_path"] = str(cache_dir)
    if workspace_mib is not None:
        options["trt_max_workspace_size"] = str(int(workspace_mib) << 20)
    if builder_opt_level is not None:
        options["trt_builder_optimization_level"] = str(int(builder_opt_level))
    for k, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        options[key] = shape_spec(profile.shapes_at(k))
    return options


@dataclass(frozen=True)
class TrtProviderOptions:
    """What ``GlmModel.load(..., provider="tensorrt", trt_options=...)`` (``glm-export run --provider tensorrt``)
    gives onnxruntime's TensorRT execution provider: the sizes of its one profile and the build switches.

    Sizes left None take the defaults of :func:`request_with_defaults` (batch 1, sequence ``min(2048, context)``,
    prompt half the sequence), so a model loaded with the provider can never outgrow its profile: the generation
    context is ``max_seq_len`` and every step is checked against the profile before it reaches onnxruntime.
    ``cache_dir`` keeps the built engine between sessions (strongly advised: building takes minutes).
    """

    max_batch: Optional[int] = None
    max_input_len: Optional[int] = None
    max_seq_len: Optional[int] = None
    opt_batch: Optional[int] = None
    opt_seq: Optional[int] = None
    fp16: bool = False
    cache_dir: Optional[str] = None
    workspace_mib: Optional[int] = None
    builder_opt_level: Optional[int] = None
    tune_for: str = "decode"

    def request(self, manifest: Manifest) -> ProfileRequest:
        """The sizes, defaults filled in for this bundle's context."""
        return request_with_defaults(
            manifest.spec.max_position_embeddings,
            max_batch=self.max_batch,
            max_input_len=self.max_input_len,
            max_seq_len=self.max_seq_len,
            opt_batch=self.opt_batch,
            opt_seq=self.opt_seq,
        )

    def profile(self, manifest: Manifest) -> Profile:
        """The provider's single (envelope) profile for this bundle."""
        return envelope_profile(manifest.inputs, self.request(manifest), manifest.spec.max_position_embeddings,
                                self.tune_for)

    def provider_options(self, manifest: Manifest, device_id: int = 0) -> Dict[str, str]:
        """The ``TensorrtExecutionProvider`` options dict (:func:`tensorrt_ep_options`)."""
        return tensorrt_ep_options(
            manifest,
            self.request(manifest),
            fp16=self.fp16,
            cache_dir=self.cache_dir,
            device_id=device_id,
            workspace_mib=self.workspace_mib,
            builder_opt_level=self.builder_opt_level,
            tune_for=self.tune_for,
        )
