"""The bundle manifest: schema, version, read, validate, write.

An export bundle is a directory::

    manifest.json        this file's schema
    model.onnx           the graph (weights inline, or in model.onnx.data when large)
    model.onnx.data      optional ONNX external data
    config.json          the source checkpoint's config, copied
    tokenizer files      copied from the checkpoint (tokenizer.model, tokenizer.json, tokenizer_config.json, ...)

The exporter writes the manifest; the runtime reads only it to know the model.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Tuple

from runtime.bundle_paths import bundle_member
from runtime.errors import BundleError, read_json_object
from runtime.integrity import sha256_file as sha256_of  # the one file hasher (runtime.manifest.sha256_of for callers)
from runtime.integrity import verify_files as verify_bundle_files
from runtime.manifest_schema import check_manifest_dict
from runtime.onnx_refs import external_data_locations
from runtime.graph_contract import TensorSpec, past_key_name
from runtime.spec import ModelSpec

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "glm-export-bundle"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrecisionFacts:
    """What a bundle precision means to every stage: the one table the exporter, the quantizer, the TensorRT builder
    and check and the TensorRT execution provider options read (instead of branching on precision names)."""

    kv_dtype: str  # numpy dtype of the past/present KV tensors (quantized bundles keep the fp32 bundle's cache)
    tensorrt_builds: bool  # the native TensorRT builder takes this precision (its check may still find operators)
    tensorrt_ep: bool  # onnxruntime's TensorRT execution provider runs the whole graph (no split)
    strongly_typed: bool  # native engines: strongly typed network by default (every tensor keeps its ONNX type)
    builder_flags: Tuple[str, ...]  # trt.BuilderFlag names a weakly typed build needs ("FP16", "INT8")
    runs_on: Tuple[str, ...]  # where a bundle of this precision runs (recorded in quantized manifests)
    needs_calibration: bool  # quantizing to it needs activation ranges from calibration text (or --ranges)
    # the bundle can carry the fused onnxruntime graph (GRAPH_FUSED) at this precision: the one precision rule,
    # read by exporter/graph_choice.py (exports) and calibration/fused.py (quantize keeps a source's fused graph).
    # fp16: no, onnxruntime's x86 CPU kernels upcast fp16 MatMuls and the fp16 target (GPU, Jetson) is TensorRT
    fused_graph: bool = False

    @property
    def takes_fp16_option(self) -> bool:
        """``--fp16`` (FP16 kernels for a weakly typed build) means something: the precision does not need them."""
        return "FP16" not in self.builder_flags


_BOTH = ("onnxruntime", "tensorrt")
PRECISION_TABLE: Dict[str, PrecisionFacts] = {
    "fp32": PrecisionFacts("float32", True, True, False, (), _BOTH, False, fused_graph=True),
    "fp16": PrecisionFacts("float16", True, True, True, ("FP16",), _BOTH, False, fused_graph=False),
    "int8": PrecisionFacts("float32", True, True, True, ("INT8",), _BOTH, True, fused_graph=True),  # static Q/DQ
    "int8-dynamic": PrecisionFacts("float32", False, False, False, (), ("onnxruntime",), False,
                                   fused_graph=True),  # MatMulInteger
    "int4": PrecisionFacts("float32", True, False, True, ("FP16",), ("onnxruntime",), False,
                           fused_graph=True),  # MatMulNBits
}
PRECISIONS = tuple(PRECISION_TABLE)  # fp32, fp16, int8, int8-dynamic, int4
KV_DTYPE_OF_PRECISION = {name: facts.kv_dtype for name, facts in PRECISION_TABLE.items()}
KV_DTYPES = ("float32", "float16")
# the fused graph's cache (graphs["fused"]["kv_cache_dtype"]; absent: float32): int8 is calibration/kv_cache.py's
FUSED_KV_DTYPES = ("float32", "int8")

# The bundle's file layout, shared by the exporter and the precision stage.
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # ONNX external data, when the weights are not inline
CONFIG_FILE = "config.json"  # the source checkpoint's, copied
# Graph flavours a bundle can carry (``Manifest.graphs``). "portable" is ``model_file``: standard ONNX operators, the
# past/present Concat cache (TensorRT and every ONNX consumer). "fused" is onnxruntime's contrib-op graph over the
# same weights with a shared-buffer KV cache (exporter/fused_graph.py); the onnxruntime runtime prefers it.
GRAPH_PORTABLE = "portable"
GRAPH_FUSED = "fused"
GRAPH_FLAVOURS = (GRAPH_PORTABLE, GRAPH_FUSED)
FUSED_MODEL_FILE = "model.fused.onnx"
KV_CONCAT = "concat"  # present = Concat(past, new): a new tensor each step
KV_SHARED_BUFFER = "shared-buffer"  # past and present are one max-length buffer, appended in place
# Weights up to this size are folded back into model.onnx (one file is handier for small models). Folding holds
# the weights twice more in memory, so larger models keep model.onnx.data: that keeps the export's peak memory
# under 2x the fp32 weight bytes (1.8x measured on the 288M model) and every model over 2 GB external.
INLINE_LIMIT = 256 * 1024**2  # bytes of weights


@dataclass
class Manifest:
    spec: ModelSpec
    precision: str
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    model_file: str = MODEL_FILE
    opset: int = 17
    tool_version: str = ""
    source: Dict[str, Any] = field(default_factory=dict)  # checkpoint path, layout, weight files
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> {"sha256", "bytes"}
    tokenizer_files: List[str] = field(default_factory=list)
    verification: Dict[str, Any] = field(default_factory=dict)  # max diffs per output, tolerance, steps
    extra: Dict[str, Any] = field(default_factory=dict)  # stage-specific records (quantization, accuracy, ...)
    format_version: int = FORMAT_VERSION
    # further graph flavours over the same weights: flavour -> {"file", "kv_cache", ...}; ``model_file`` is always
    # the portable graph (older manifests have no "graphs": portable only)
    graphs: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def graph_file(self, flavour: str) -> str:
        """The bundle file holding the graph of ``flavour``; BundleError when the bundle has none."""
        if flavour == GRAPH_PORTABLE:
            return self.model_file
        rec = self.graphs.get(flavour)
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str):
            # names as written unless they hold spaces or control characters (then quoted): one line, always
            have = ", ".join(n if n.isprintable() and not any(c.isspace() for c in n) else repr(n)
                             for n in [GRAPH_PORTABLE] + sorted(self.graphs))
            raise BundleError(f"{MANIFEST_NAME}: the bundle has no {flavour!r} graph (it has: {have}); "
                              "re-export it with 'glm-export onnx' (the fused graph is written by default)")
        name = rec["file"]
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise BundleError(f"{MANIFEST_NAME}: graph file {name!r} must be a plain file name inside the bundle")
        return name

    @property
    def kv_dtype(self) -> str:
        """numpy dtype name of the KV cache (past_key_values.* inputs): "float32" or "float16"; BundleError when the
        manifest lists no past input or gives it another dtype."""
        name = past_key_name(0)
        for t in self.inputs:
            if t.name == name:
                if t.dtype not in KV_DTYPES:
                    raise BundleError(f"{MANIFEST_NAME} gives {name} dtype {t.dtype!r}; expected float32 or float16")
                return t.dtype
        raise BundleError(f"{MANIFEST_NAME} lists no input {name}")

    @property
    def fused_kv_dtype(self) -> str:
        """numpy dtype name of the fused graph's shared-buffer cache: "float32" (no ``kv_cache_dtype`` recorded) or
        "int8"; BundleError for anything else."""
        rec = self.graphs.get(GRAPH_FUSED)
        value = rec.get("kv_cache_dtype", "float32") if isinstance(rec, dict) else "float32"
        if not isinstance(value, str) or value not in FUSED_KV_DTYPES:
            raise BundleError(f"{MANIFEST_NAME}: graphs.{GRAPH_FUSED}.kv_cache_dtype is {value!r}; expected one of: "
                              f"{', '.join(FUSED_KV_DTYPES)}")
        return value

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tool_version": self.tool_version,
            "precision": self.precision,
            "model_file": self.model_file,
            "opset": self.opset,
            "kv_layout": "batch, kv_heads, seq, head_dim",
            "spec": self.spec.to_dict(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "source": self.source,
            "files": self.files,
            "tokenizer_files": self.tokenizer_files,
            "verification": self.verification,
            "extra": self.extra,
            "graphs": self.graphs,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise BundleError(f"{where}: not a glm-export bundle manifest (format={d.get('format')!r})")
        version = d.get("format_version")
        if not isinstance(version, int):
            raise BundleError(f"{where}: format_version missing or not an integer")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: manifest format_version {version} is newer than this glm-export understands "
                f"({FORMAT_VERSION}); upgrade glm-export or re-export the bundle with this version"
            )
        check_manifest_dict(d, where)
        try:
            return cls(
                spec=ModelSpec.from_dict(d["spec"]),
                precision=d["precision"],
                inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
                outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
                model_file=d.get("model_file", MODEL_FILE),
                opset=int(d.get("opset", 17)),
                tool_version=d.get("tool_version", ""),
                source=d.get("source", {}),
                files=d.get("files", {}),
                tokenizer_files=list(d.get("tokenizer_files", [])),
                verification=d.get("verification", {}),
                extra=d.get("extra", {}),
                format_version=version,
                graphs=dict(d.get("graphs", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None


def write_manifest(bundle_dir: str, manifest: Manifest) -> str:
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def record_files(bundle_dir: str, names: List[str]) -> Dict[str, Dict[str, Any]]:
    """Checksums and sizes of the named bundle files, for the manifest."""
    out = {}
    for name in names:
        p = os.path.join(bundle_dir, name)
        out[name] = {"sha256": sha256_of(p), "bytes": os.path.getsize(p)}
    return out


def read_manifest(bundle_dir: str, check_files: bool = True, verify_checksums: bool = False,
                  verify_files: bool = True) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json``; every listed file must exist with its recorded size.

    With ``check_files`` every name the manifest and the graph give must stay inside the bundle (see
    ``runtime.bundle_paths``) and every listed file must match its sha256 (``verify_files``; hashed once thanks to
    the verified stamp of ``runtime.integrity``; ``verify_checksums`` hashes every file again regardless).
    """
    if not os.path.isdir(bundle_dir):
        raise BundleError(f"{bundle_dir}: bundle directory does not exist")
    path = os.path.join(bundle_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise BundleError(f"{path}: missing; is {bundle_dir} a bundle written by 'glm-export onnx'?")
    manifest = Manifest.from_dict(read_json_object(path, BundleError, "manifest"), where=path)
    if check_files:
        for name, rec in manifest.files.items():
            p = bundle_member(bundle_dir, name, "files entry", path)
            if not os.path.isfile(p):
                raise BundleError(f"{p}: listed in the manifest but missing from the bundle")
            size = os.path.getsize(p)
            if "bytes" in rec and size != rec["bytes"]:
                raise BundleError(f"{p}: {size} bytes, manifest records {rec['bytes']}; the bundle is corrupt")
        for name in manifest.tokenizer_files:
            bundle_member(bundle_dir, name, "tokenizer_files entry", path)
        if verify_files or verify_checksums:  # first: a corrupt file is reported as such, with both digests
            verify_bundle_files(bundle_dir, manifest.files, use_stamp=not verify_checksums, where=path)
        check_graph_references(bundle_dir, manifest, path)
    return manifest


def check_graph_references(bundle_dir: str, manifest: Manifest, where: str) -> None:
    """Every graph file (the portable ``model_file`` and each flavour's in ``graphs``) and every external-data file
    its graph names must be bundle files listed in the manifest (so they stay inside the bundle and are covered by
    its checksums)."""
    names = [("model_file", manifest.model_file)]
    names += [(f"graphs.{flavour}.file", manifest.graph_file(flavour)) for flavour in sorted(manifest.graphs)]
    for what, name in names:
        graph = bundle_member(bundle_dir, name, what, where)
        if manifest.files and name not in manifest.files:
            raise BundleError(f"{where}: {what} {name!r} is not listed in 'files'")
        if not os.path.isfile(graph):
            continue  # the loader reports a missing graph with its own message
        for location in sorted(external_data_locations(graph)):
            bundle_member(bundle_dir, location, f"external data location in {name}", where)
            if location not in manifest.files:
                raise BundleError(f"{graph}: external data {location!r} is not listed in the manifest's 'files', "
                                  "so it cannot be verified; re-export the bundle")


def copy_side_files(src_dir: str, out_dir: str, tokenizer_files: Iterable[str]) -> List[str]:
    """Copy config.json and the tokenizer files that exist in ``src_dir`` into the bundle at ``out_dir``; returns
    the copied names (config.json first)."""
    names = [CONFIG_FILE] + [f for f in tokenizer_files if f != CONFIG_FILE]
    copied: List[str] = []
    for name in names:
        src = bundle_member(src_dir, name, "tokenizer file", src_dir)
        bundle_member(out_dir, name, "tokenizer file", out_dir)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied
