"""The ``trtexec`` command line equivalent to ``engine_from_bundle``: for machines where only TensorRT's own tools run.

Pure: builds arguments, runs nothing. The flags follow trtexec's ``--help`` in TensorRT 10 (NVIDIA/TensorRT
``samples/common/sampleOptions.cpp``):

- several optimization profiles are given as ``--profile=0 --minShapes=... --optShapes=... --maxShapes=...
  --profile=1 ...``: each ``--profile=N`` must be followed directly by its three shape flags, and the indices must be
  contiguous from 0; a single profile may use the three shape flags without ``--profile``;
- a shape spec is ``name:d0xd1x...`` joined by commas; a name holding ``:`` is wrapped in single quotes
  (``runtime.tensorrt.profiles.shape_spec``, shared with onnxruntime's TensorRT provider options);
- ``--memPoolSize=workspace:N`` takes MiB when no unit suffix is given (the form TensorRT 10's migration guide
  uses);
- precision: ``--stronglyTyped`` for a strongly typed network, else ``--fp16`` / ``--int8``; ``--noTF32``;
- ``--timingCacheFile``, ``--builderOptimizationLevel=N``, and ``--skipInference`` to build without benchmarking.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import List, Optional, Sequence

from runtime.manifest import Manifest, read_manifest
from runtime.tensorrt.engine_record import ENGINE_PLAN
from runtime.tensorrt.profiles import profiles_for_manifest
from runtime.tensorrt.profiles import Profile, shape_spec

from exporter.tensorrt.build import EngineOptions, PrecisionPlan, precision_plan

FLAG_OF_BUILDER_FLAG = {"FP16": "--fp16", "INT8": "--int8"}


@dataclass(frozen=True)
class TrtexecCommand:
    args: List[str]  # argv, ready for subprocess.run
    shell: str  # the same, quoted for a POSIX shell


def _profile_args(profile: Profile) -> List[str]:
    return [f"--{kind}Shapes=" + shape_spec(profile.shapes_at(k), quote_colons=True)
            for k, kind in enumerate(("min", "opt", "max"))]


def trtexec_command(
    onnx_path: str,
    engine_path: str,
    profiles: Sequence[Profile],
    plan: PrecisionPlan,
    workspace_mib: Optional[int] = None,
    timing_cache: Optional[str] = None,
    optimization_level: Optional[int] = None,
    tf32: bool = True,
    trtexec: str = "trtexec",
) -> TrtexecCommand:
    """The trtexec invocation that builds the same engine as ``engine_from_bundle`` (without ``engine.json``)."""
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    args = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if plan.strongly_typed:
        args.append("--stronglyTyped")
    args += [FLAG_OF_BUILDER_FLAG[f] for f in plan.builder_flags]
    if not tf32:
        args.append("--noTF32")
    if len(profiles) == 1:
        args += _profile_args(profiles[0])
    else:
        for i, profile in enumerate(profiles):
            args.append(f"--profile={i}")
            args += _profile_args(profile)
    if workspace_mib is not None:
        args.append(f"--memPoolSize=workspace:{int(workspace_mib)}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if optimization_level is not None:
        args.append(f"--builderOptimizationLevel={int(optimization_level)}")
    args.append("--skipInference")
    return TrtexecCommand(args=args, shell=" ".join(shlex.quote(a) for a in args))


def trtexec_for_bundle(
    bundle_dir: str,
    engine_dir: str,
    options: EngineOptions,
    trtexec: str = "trtexec",
    manifest: Optional[Manifest] = None,
) -> TrtexecCommand:
    """The trtexec command that builds ``engine_dir/engine.plan`` from a bundle as ``engine_from_bundle`` would.

    Runs the same option checks (manifest, precision plan, ``--int8``, profiles against the model's context) but
    needs no TensorRT and writes nothing. Paths are kept as given, so the line works wherever the bundle is copied
    to the same relative place. trtexec writes no ``engine.json``, and does not create ``engine_dir``. ``manifest``
    is the bundle's, where the caller has read it already (None: read here).
    """
    manifest = manifest if manifest is not None else read_manifest(bundle_dir)
    plan = precision_plan(manifest.precision, options.fp16, options.strongly_typed, options.int8)
    profiles = profiles_for_manifest(manifest, options.profile)
    return trtexec_command(
        os.path.join(bundle_dir, manifest.model_file),
        os.path.join(engine_dir, ENGINE_PLAN),
        profiles,
        plan,
        workspace_mib=options.workspace_mib,
        timing_cache=options.timing_cache,
        optimization_level=options.optimization_level,
        tf32=options.tf32,
        trtexec=trtexec,
    )
