"""onnxruntime's TensorRT execution provider options, and the builder settings both TensorRT routes take.

The provider (``--provider tensorrt``) gets :func:`tensorrt_ep_options`: the provider-options dict with ONE explicit
profile, the envelope of the prefill and decode profiles (``runtime.tensorrt.profiles.envelope_profile``), because
that provider builds every profile it is given but runs each step on profile 0 (microsoft/onnxruntime pull request
#31624, "TensorRT EP ... execution context remained on profile 0", open at the time of writing). The profiles
themselves, and the requests they are made from, live in ``runtime.tensorrt.profiles``. Pure Python (3.8), no
TensorRT, no onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from runtime.manifest import PRECISION_TABLE, Manifest
from runtime.tensorrt.profiles import (  # noqa: F401  (EngineOptionError, ProfileRequest: also imported from here)
    EngineOptionError,
    Profile,
    ProfileRequest,
    envelope_profile,
    request_with_defaults,
    shape_spec,
)

__all__ = [
    "TrtProviderOptions",
    "check_builder_settings",
    "tensorrt_ep_options",
]


def check_builder_settings(workspace_mib: Optional[int] = None, builder_opt_level: Optional[int] = None) -> None:
    """The TensorRT builder settings both routes take (None: TensorRT's default): the workspace limit in MiB and the
    builder optimization level."""
    if workspace_mib is not None and workspace_mib < 1:
        raise EngineOptionError(f"--workspace must be at least 1 MiB, got {workspace_mib} MiB")
    if builder_opt_level is not None and not 0 <= builder_opt_level <= 5:
        raise EngineOptionError(f"--builder-opt-level must be 0..5, got {builder_opt_level}")


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
