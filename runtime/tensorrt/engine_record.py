"""Whether a TensorRT engine built by ``glm-export trt`` can run here: pure checks on its ``engine.json``.

A serialized TensorRT engine is tied to the TensorRT release and to the GPU architecture it was built on. The builder
(``exporter.tensorrt.build``) records both in ``engine.json`` beside ``engine.plan``; the runtime backend compares them with
the installed TensorRT and the current GPU before deserializing, and refuses with a message that says to rebuild.
Pure Python, so the refusal logic is tested without TensorRT or a GPU.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

ENGINE_FORMAT = "glm-export-tensorrt-engine"
ENGINE_FORMAT_VERSION = 1
ENGINE_PLAN = "engine.plan"
ENGINE_RECORD = "engine.json"

BUILD_COMMAND = "glm-export trt --model BUNDLE_DIR --out ENGINE_DIR"  # every build / rebuild hint names this command
REBUILD = f"rebuild the engine here with '{BUILD_COMMAND} --overwrite'"


def major_minor(version: str) -> Optional[Tuple[int, int]]:
    """``"10.13.0.35"`` -> ``(10, 13)``; None where the text is not a version."""
    parts = str(version).strip().split(".")
    if len(parts) < 2:
        return None
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return None


def compute_capability_text(major: int, minor: int) -> str:
    """The form recorded in ``engine.json``: ``"9.0"``."""
    return f"{int(major)}.{int(minor)}"


def gpu_name_text(name: Union[str, bytes]) -> str:
    """cuda-python gives ``cudaDeviceProp.name`` as NUL-padded bytes; record it as plain text."""
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    return name.strip()


def engine_compatibility(
    engine_record: Mapping[str, Any], trt_version: str, gpu_name: str, compute_capability: str
) -> Optional[str]:
    """None when the engine may be deserialized here, else a one-line refusal that tells the user to rebuild.

    Refuses a record of another format or a newer format version, a TensorRT major.minor other than the one the
    engine was built with, and a GPU of another compute capability. A different GPU name of the same compute
    capability is allowed (the engine runs, perhaps not at its best).
    """
    fmt = engine_record.get("format")
    if fmt != ENGINE_FORMAT:
        return f"{ENGINE_RECORD}: not a glm-export TensorRT engine record (format={fmt!r}); {REBUILD}"
    version = engine_record.get("format_version")
    if not isinstance(version, int) or version > ENGINE_FORMAT_VERSION:
        return (
            f"{ENGINE_RECORD}: format_version {version!r} is not one this glm-export reads "
            f"(<= {ENGINE_FORMAT_VERSION}); upgrade glm-export or {REBUILD}"
        )
    built_trt = str(engine_record.get("tensorrt_version", ""))
    built_mm, here_mm = major_minor(built_trt), major_minor(trt_version)
    if built_mm is None:
        return f"{ENGINE_RECORD}: no usable tensorrt_version ({built_trt!r}); {REBUILD}"
    if here_mm is None:
        return f"cannot tell the installed TensorRT version ({trt_version!r}); reinstall tensorrt"
    if built_mm != here_mm:
        return (
            f"the engine was built with TensorRT {built_trt} but TensorRT {trt_version} is installed; "
            f"engines only load in the TensorRT release that built them: {REBUILD}, or install TensorRT "
            f"{built_mm[0]}.{built_mm[1]}"
        )
    built_cc = str(engine_record.get("compute_capability", ""))
    if not built_cc:
        return f"{ENGINE_RECORD}: no compute_capability recorded; {REBUILD}"
    if built_cc.strip() != str(compute_capability).strip():
        built_gpu = engine_record.get("gpu_name", "an unrecorded GPU")
        return (
            f"the engine was built for {built_gpu} (compute capability {built_cc}) but this GPU is {gpu_name} "
            f"(compute capability {compute_capability}); TensorRT engines are specific to the GPU architecture: "
            f"{REBUILD}"
        )
    return None


def engine_matches_bundle(engine_record: Mapping[str, Any], manifest_sha256: str) -> Optional[str]:
    """None when the engine was built from the bundle whose manifest.json has this sha256, else a refusal."""
    built = engine_record.get("source_manifest_sha256")
    if built != manifest_sha256:
        return (
            f"the engine was built from another bundle (manifest sha256 {str(built)[:12]}..., this bundle's is "
            f"{manifest_sha256[:12]}...); {REBUILD}"
        )
    return None
