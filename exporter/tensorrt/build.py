"""TensorRT engines from export bundles: ``engine_from_bundle(bundle_dir, out_dir, options)``.

Reads the bundle's manifest, checks the graph for TensorRT (``exporter.tensorrt.check``), makes the prefill and decode
optimization profiles (``runtime.tensorrt.profiles``), parses ``model.onnx`` with TensorRT's ONNX parser (external data
beside it), builds, and writes ``engine.plan`` and ``engine.json`` into ``out_dir`` through a temporary directory
that is renamed into place. ``engine.json`` records what the runtime needs to refuse an engine that cannot run here
(``runtime.tensorrt.engine_record``) and to pick a profile per step (``runtime.tensorrt.profiles``).

Every decision (precision plan, profiles, the graph check, the record) is a pure function; only
``engine_from_bundle`` imports ``tensorrt`` (guarded by ``runtime.backends.tensorrt.import_tensorrt``, as the runtime
backend is) and cuda-python, and only when called. ``exporter.tensorrt.trtexec`` gives the equivalent ``trtexec`` command
line.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from runtime.backends.tensorrt import current_gpu, import_tensorrt
from runtime.errors import BackendError, BundleError
from runtime.manifest import MANIFEST_NAME, PRECISION_TABLE, Manifest, read_manifest, sha256_of
from runtime.progress import NullProgress
from runtime.tensorrt.engine_record import (
    ENGINE_FORMAT,
    ENGINE_FORMAT_VERSION,
    ENGINE_PLAN,
    ENGINE_RECORD,
    engine_compatibility,
)
from runtime.tensorrt.ep_options import check_builder_settings
from runtime.tensorrt.profiles import EngineOptionError, Profile, ProfileRequest, profiles_for_manifest

from exporter.staging import check_destination, staged_directory
from exporter.tensorrt.check import check_for_tensorrt

if TYPE_CHECKING:  # the steps below take TensorRT objects; tensorrt itself is imported only when building
    import tensorrt as trt

__all__ = [
    "EngineOptions",
    "EngineResult",
    "PrecisionPlan",
    "engine_compatibility",
    "engine_from_bundle",
    "engine_record",
    "precision_plan",
    "tensorrt_available",
    "workspace_mib_from_gib",
]

MIN_TRT_MAJOR = 10
PRINT_TRTEXEC_HINT = (
    "or add --print-trtexec to print the equivalent trtexec command line and build with trtexec where TensorRT is"
)


def workspace_mib_from_gib(gib: Optional[float]) -> Optional[int]:
    """``--workspace`` is given in GiB (fractions allowed); TensorRT's pool limit is kept in whole MiB."""
    if gib is None:
        return None
    mib = int(round(float(gib) * 1024))
    if mib < 1:
        raise EngineOptionError(f"--workspace is in GiB and must be at least 1 MiB (0.001), got {gib}")
    return mib


@dataclass(frozen=True)
class EngineOptions:
    """How to build: shapes, precision switches and builder settings (the CLI's options, one field each)."""

    profile: ProfileRequest
    fp16: bool = False  # --fp16, weakly typed builds only: let TensorRT choose FP16 kernels (BuilderFlag.FP16)
    strongly_typed: Optional[bool] = None  # None: strongly typed for fp16/int8/int4 bundles; False: --weakly-typed
    workspace_mib: Optional[int] = None  # --workspace (GiB on the CLI): MemoryPoolType.WORKSPACE; None: TensorRT's
    optimization_level: Optional[int] = None  # --builder-opt-level 0..5; None: TensorRT's default (3)
    tf32: bool = True  # TensorRT's default; False (--no-tf32) clears BuilderFlag.TF32 for full fp32 matmuls
    timing_cache: Optional[str] = None  # --timing-cache: read if present, written back after the build
    overwrite: bool = False
    skip_check: bool = False  # --skip-check: build even where exporter.tensorrt.check reports problems
    int8: bool = False  # --int8: the user states the bundle is INT8 (static Q/DQ); checked against the manifest

    def __post_init__(self) -> None:
        check_builder_settings(self.workspace_mib, self.optimization_level)


@dataclass(frozen=True)
class PrecisionPlan:
    """How a bundle's precision becomes a TensorRT network and builder flags."""

    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED: every tensor keeps its ONNX type
    builder_flags: Tuple[str, ...] = field(default=())  # names in trt.BuilderFlag: "FP16", "INT8"

    @property
    def label(self) -> str:
        if self.strongly_typed:
            return "strongly typed"
        return "+".join(("fp32",) + tuple(f.lower() for f in self.builder_flags))


def precision_plan(
    bundle_precision: str, fp16: bool = False, strongly_typed: Optional[bool] = None, int8: bool = False
) -> PrecisionPlan:
    """The network mode and builder flags for a bundle of this precision.

    TensorRT 10 runs explicitly quantized (Q/DQ) and fp16 graphs as written in strongly typed mode, and refuses
    precision flags there; an fp32 bundle builds weakly typed, with FP16 kernels allowed by ``fp16``. ``int8`` is the
    user's statement that the bundle is INT8 with Q/DQ nodes (``--int8``): INT8 comes from the graph, never from a
    flag, so a bundle of another precision is refused rather than calibrated.
    """
    if int8 and bundle_precision != "int8":
        fix = (
            "export a static Q/DQ INT8 bundle (glm-export quantize) and build from it"
            if bundle_precision == "int8-dynamic"
            else "build without --int8, or quantize the bundle to static Q/DQ INT8 first (glm-export quantize)"
        )
        raise EngineOptionError(
            f"--int8 builds from an INT8 (static Q/DQ) bundle, but this bundle's manifest says {bundle_precision}; "
            f"TensorRT 10 takes INT8 scales only from Q/DQ nodes in the graph: {fix}"
        )
    facts = PRECISION_TABLE.get(bundle_precision)
    if facts is None:
        raise BundleError(f"manifest precision {bundle_precision!r} is not one glm-export knows; re-export the bundle")
    if not facts.tensorrt_builds:
        raise EngineOptionError(
            f"{bundle_precision} bundles use DynamicQuantizeLinear/MatMulInteger, which TensorRT cannot parse; build "
            "the engine from an fp16, fp32 or int8 (static Q/DQ) bundle"
        )
    typed = strongly_typed if strongly_typed is not None else facts.strongly_typed
    if fp16 and not facts.takes_fp16_option:
        raise EngineOptionError(f"--fp16 applies to fp32 and int8 bundles; this bundle is already {bundle_precision}")
    if fp16 and typed:
        raise EngineOptionError(
            "--fp16 cannot be combined with a strongly typed build: TensorRT keeps every tensor in its ONNX type "
            "there; export an fp16 bundle, or pass --weakly-typed"
        )
    if typed:
        return PrecisionPlan(strongly_typed=True)
    flags = [f for f in ("INT8", "FP16") if f in facts.builder_flags or (f == "FP16" and fp16)]
    return PrecisionPlan(strongly_typed=False, builder_flags=tuple(flags))


def engine_record(
    manifest: Manifest,
    manifest_sha256: str,
    profiles: Sequence[Profile],
    plan: PrecisionPlan,
    options: EngineOptions,
    trt_version: str,
    gpu_name: str,
    compute_capability: str,
    engine_sha256: str,
    engine_bytes: int,
    source_bundle: str = "",
) -> Dict[str, Any]:
    """The contents of ``engine.json``."""
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "tensorrt_version": trt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "precision": manifest.precision,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "builder_optimization_level": 3 if options.optimization_level is None else options.optimization_level,
        "tf32": options.tf32,
        "workspace_mib": options.workspace_mib,
        "profiles": [p.to_dict() for p in profiles],
        "engine_file": ENGINE_PLAN,
        "engine_sha256": engine_sha256,
        "engine_bytes": engine_bytes,
        "source_bundle": source_bundle,
        "source_manifest_sha256": manifest_sha256,
        "source_model_file": manifest.model_file,
        "inputs": [t.to_dict() for t in manifest.inputs],
        "outputs": [t.to_dict() for t in manifest.outputs],
        "spec": manifest.spec.to_dict(),
    }


def tensorrt_available() -> Tuple[bool, str]:
    """(True, version) where TensorRT 10+ imports, else (False, why)."""
    try:
        trt = import_tensorrt()
    except BackendError as e:  # not installed, or a broken install
        return False, str(e)
    version = str(getattr(trt, "__version__", "0"))
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < MIN_TRT_MAJOR:
        return False, f"TensorRT {version} is installed; glm-export needs TensorRT {MIN_TRT_MAJOR} or newer"
    return True, version


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class EngineResult:
    """What ``engine_from_bundle`` built: the engine directory and its ``engine.json`` record (as written)."""

    engine_dir: str
    record: Dict[str, Any]

    @property
    def plan(self) -> PrecisionPlan:
        return PrecisionPlan(self.record["strongly_typed"], tuple(self.record["builder_flags"]))

    def to_dict(self) -> Dict[str, Any]:
        """The figures ``glm-export trt --json`` prints."""
        r = self.record
        return {
            "engine_dir": self.engine_dir,
            "engine_bytes": r["engine_bytes"],
            "tensorrt_version": r["tensorrt_version"],
            "gpu_name": r["gpu_name"],
            "compute_capability": r["compute_capability"],
            "precision": r["precision"],
            "mode": self.plan.label,
            "profiles": [p["name"] for p in r["profiles"]],
        }

    def summary(self) -> str:
        r = self.record
        return (f"{self.engine_dir}: {r['precision']} bundle, {self.plan.label}, {r['engine_bytes'] / 2**20:.1f} MiB, "
                f"TensorRT {r['tensorrt_version']} on {r['gpu_name']} (compute capability "
                f"{r['compute_capability']}), profiles {', '.join(p['name'] for p in r['profiles'])}")


def engine_from_bundle(
    bundle_dir: str,
    out_dir: str,
    options: EngineOptions,
    progress: Optional[NullProgress] = None,
    manifest: Optional[Manifest] = None,
) -> EngineResult:
    """Build a TensorRT engine for the bundle into ``out_dir``; returns it with its ``engine.json`` record.

    ``progress`` is a ``runtime.progress`` reporter (``NullProgress`` by default): each stage is one ``stage()``.
    ``manifest`` is the bundle's, where the caller has read it already (None: read here).
    """
    say = (progress or NullProgress()).stage
    check_destination(out_dir, options.overwrite)
    manifest = manifest if manifest is not None else read_manifest(bundle_dir)
    manifest_sha = sha256_of(os.path.join(bundle_dir, MANIFEST_NAME))
    model_path = os.path.join(bundle_dir, manifest.model_file)
    plan = precision_plan(manifest.precision, options.fp16, options.strongly_typed, options.int8)
    profiles = profiles_for_manifest(manifest, options.profile)
    trt_version = _check_buildable(model_path, profiles, options.skip_check, say)

    import tensorrt as trt  # importable: tensorrt_available said so

    gpu_name, compute_capability = current_gpu()
    say(f"TensorRT {trt_version} on {gpu_name} (compute capability {compute_capability}); {plan.label}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    say(f"parsing {model_path}")
    network, network_inputs, _parser = _parse_network(builder, logger, model_path, plan, profiles)
    config = _builder_config(builder, network_inputs, plan, profiles, options)

    say(f"building the engine ({len(profiles)} profiles: {', '.join(p.name for p in profiles)})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT failed to build the engine; the TensorRT log above says why")
    plan_bytes = bytes(memoryview(serialized))
    if options.timing_cache:
        _write_atomic(options.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))

    record = engine_record(
        manifest,
        manifest_sha,
        profiles,
        plan,
        options,
        trt_version,
        gpu_name,
        compute_capability,
        hashlib.sha256(plan_bytes).hexdigest(),
        len(plan_bytes),
        os.path.abspath(bundle_dir),
    )
    _write_engine_dir(out_dir, options.overwrite, plan_bytes, record)
    say(f"wrote {os.path.join(out_dir, ENGINE_PLAN)} ({len(plan_bytes) / 2**20:.1f} MiB)")
    return EngineResult(out_dir, record)


def _check_buildable(model_path: str, profiles: Sequence[Profile], skip_check: bool,
                     say: Callable[[str], None]) -> str:
    """The TensorRT version, after refusing a missing TensorRT and (unless ``skip_check``) a graph the static check
    finds problems in."""
    ok, trt_version = tensorrt_available()
    if not ok:
        raise BackendError(f"{trt_version}; {PRINT_TRTEXEC_HINT}")
    report = check_for_tensorrt(model_path, profiles, trt_version)
    if not report.ok:
        if not skip_check:
            raise BundleError(f"{model_path}: TensorRT cannot build this graph as it is.\n{report.text()}")
        say(f"building despite {len(report.problems)} reported problem(s) (--skip-check)")
    return trt_version


def _parse_network(builder: trt.Builder, logger: trt.ILogger, model_path: str, plan: PrecisionPlan,
                   profiles: Sequence[Profile]) -> Tuple[trt.INetworkDefinition, List[str], trt.OnnxParser]:
    """(network, its input names, the parser: it must outlive the build) for ``model_path``; BundleError when
    TensorRT's parser fails or the graph has inputs the manifest (so the profiles) does not list."""
    import tensorrt as trt

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(model_path):  # resolves model.onnx.data beside the model
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise BundleError(f"{model_path}: TensorRT's ONNX parser failed:\n{errors}")
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = sorted(set(network_inputs) - set(profiles[0].shapes))
    if missing:
        raise BundleError(f"{model_path}: graph inputs {missing} are not in the manifest; re-export the bundle")
    return network, network_inputs, parser


def _builder_config(builder: trt.Builder, network_inputs: Sequence[str], plan: PrecisionPlan,
                    profiles: Sequence[Profile], options: EngineOptions) -> trt.IBuilderConfig:
    """The builder config: the plan's flags, TF32, workspace, optimization level, one optimization profile per
    profile (shapes of every network input) and the timing cache (read from ``options.timing_cache`` if it exists)."""
    import tensorrt as trt

    config = builder.create_builder_config()
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.optimization_level is not None:
        config.builder_optimization_level = options.optimization_level
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name in network_inputs:
            lo, opt, hi = p.shapes[name]
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)
    cache_bytes = b""
    if options.timing_cache and os.path.isfile(options.timing_cache):
        with open(options.timing_cache, "rb") as f:
            cache_bytes = f.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    return config


def _write_engine_dir(out_dir: str, overwrite: bool, plan_bytes: bytes, record: Dict[str, Any]) -> None:
    """``engine.plan`` and ``engine.json`` into ``out_dir``, staged and renamed into place."""
    with staged_directory(out_dir, overwrite) as tmp_dir:
        with open(os.path.join(tmp_dir, ENGINE_PLAN), "wb") as f:
            f.write(plan_bytes)
        with open(os.path.join(tmp_dir, ENGINE_RECORD), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
