"""Will TensorRT 10's ONNX parser take this graph? A static check, before any engine build.

Runs on a bundle's ``model.onnx`` (loaded without its external weights) or on a ``ModelProto``, needs only the
``onnx`` package, and lists every problem with the node, input or tensor it concerns and why: operators outside the
parser's support list, nodes of another domain (``com.microsoft`` contrib ops), element types TensorRT lacks, an
opset older than 17, Q/DQ pairs TensorRT cannot run, and dynamic input dims the given optimization profiles do not
cover. ``exporter.tensorrt.build`` runs it before building; it is also useful alone, where TensorRT is not installed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import onnx
from onnx import numpy_helper

from runtime.manifest import PRECISION_TABLE, Manifest, read_manifest
from runtime.tensorrt.engine_record import major_minor
from runtime.tensorrt.profiles import EngineOptionError, ProfileRequest, profiles_for_manifest
from runtime.tensorrt.profiles import Profile

# --- What TensorRT's ONNX parser supports, as data ---------------------------------------------------------------
# Source: onnx/onnx-tensorrt docs/operators.md, the "Operator Support Matrix" of TensorRT 10.15 (rows marked Y), and
# the onnx-tensorrt CHANGELOG.md for the TensorRT 10.x release that added each of the later operators below.

SUPPORTED_OPS: FrozenSet[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
    Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization
    LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
    PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
    Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Operators the parser gained during TensorRT 10.x (onnx-tensorrt CHANGELOG.md): op -> first (major, minor).
OPS_SINCE: Dict[str, Tuple[int, int]] = {
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4),
    "HammingWindow": (10, 4),
    "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RMSNormalization": (10, 15),
    "RotaryEmbedding": (10, 15),
    "TensorScatter": (10, 15),
}

# Rows marked N in operators.md: named so the message can say "listed as unsupported", not just "unknown".
UNSUPPORTED_OPS: FrozenSet[str] = frozenset(
    """
    AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
    ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
    MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
    QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
    SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
    TfIdfVectorizer Unique
    """.split()
)

MIN_OPSET = 17  # glm-export's floor (LayerNormalization is opset 17); TensorRT 10.0 itself parses opset 9..20
MAX_DOCUMENTED_OPSET = 24  # operators.md of TensorRT 10.15: "opset 9 to opset 24"
DEFAULT_TARGET_TRT = "10.0"  # the oldest TensorRT 10: an op added later is reported with the release it needs

STANDARD_DOMAINS = ("", "ai.onnx")

# ONNX element types TensorRT 10 has no data type for (operators.md: DOUBLE, FLOAT32, FLOAT16, BFLOAT16, FP8, FP4,
# INT32, INT64, INT8, INT4, UINT8 and BOOL are supported; INT64 is native since TensorRT 9 and no longer cast down).
_T = onnx.TensorProto
UNSUPPORTED_TYPES: Dict[int, str] = {
    _T.STRING: "TensorRT has no string type",
    _T.UINT16: "TensorRT has no uint16 type",
    _T.INT16: "TensorRT has no int16 type",
    _T.UINT32: "TensorRT has no uint32 type",
    _T.UINT64: "TensorRT has no uint64 type",
    _T.COMPLEX64: "TensorRT has no complex types",
    _T.COMPLEX128: "TensorRT has no complex types",
    _T.DOUBLE: "TensorRT only casts DOUBLE down to float32 (clamping to +-FLT_MAX); export in float32",
    _T.FLOAT8E4M3FNUZ: "TensorRT's FP8 is float8e4m3fn only",
    _T.FLOAT8E5M2: "TensorRT's FP8 is float8e4m3fn only",
    _T.FLOAT8E5M2FNUZ: "TensorRT's FP8 is float8e4m3fn only",
    _T.UINT4: "TensorRT's 4-bit integer type is signed int4 only",
}
IO_ONLY_TYPES = {_T.UINT8: "TensorRT supports uint8 only as a network input or output"}

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Problem:
    """One reason TensorRT would refuse (or mis-handle) the graph."""

    kind: str  # "opset", "domain", "op", "dtype", "quantization", "dynamic-dim", "profile", "precision"
    where: str  # "node 'x' (FusedMatMul)", "input 'input_ids'", "initializer 'w'", "model"
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


_Add = Callable[[Problem], None]  # ``report.problems.append``


@dataclass
class CheckReport:
    """Every problem found, with enough context to print a useful summary."""

    target_trt: str
    opset: Optional[int]
    node_count: int
    problems: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def of_kind(self, kind: str) -> List[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def to_dict(self) -> Dict[str, Any]:
        return {
            "tensorrt_version": self.target_trt,
            "ok": self.ok,
            "opset": self.opset,
            "nodes": self.node_count,
            "problems": [{"kind": p.kind, "where": p.where, "why": p.why} for p in self.problems],
        }

    def text(self, limit: int = 30) -> str:
        if self.ok:
            return f"no problems for TensorRT {self.target_trt} ({self.node_count} nodes, opset {self.opset})"
        lines = [f"{len(self.problems)} problem(s) for TensorRT {self.target_trt}:"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def check_for_tensorrt(
    model: Union[str, onnx.ModelProto],
    profiles: Optional[Sequence[Profile]] = None,
    trt_version: str = DEFAULT_TARGET_TRT,
) -> CheckReport:
    """Check a model (path or ``ModelProto``) for TensorRT ``trt_version``; external weights are not loaded."""
    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    target = major_minor(trt_version) or (10, 0)
    opset = _default_opset(model)
    graph = model.graph
    report = CheckReport(target_trt=trt_version, opset=opset, node_count=0)
    add = report.problems.append

    if opset is None:
        add(Problem("opset", "model", "no ai.onnx opset import; re-export the model"))
    elif opset < MIN_OPSET:
        add(Problem("opset", "model", f"opset {opset} is older than {MIN_OPSET}; re-export with --opset {MIN_OPSET}"))
    elif opset > MAX_DOCUMENTED_OPSET:
        add(Problem("opset", "model", f"opset {opset} is newer than TensorRT documents ({MAX_DOCUMENTED_OPSET})"))

    functions = {(f.domain, f.name): f for f in model.functions}
    initializers = {t.name: t for t in graph.initializer}
    for where, node in _walk_nodes(graph, functions, prefix=""):
        report.node_count += 1
        _check_node(where, node, target, initializers, add)
    _check_types(graph, add)
    if profiles is not None:
        _check_profiles(graph, profiles, add)
    return report


def check_bundle_for_tensorrt(
    bundle_dir: str,
    request: Optional[ProfileRequest] = None,
    trt_version: str = DEFAULT_TARGET_TRT,
    manifest: Optional[Manifest] = None,
) -> Tuple[CheckReport, List[Profile]]:
    """:func:`check_for_tensorrt` on a bundle: its ``model.onnx``, its precision and, with ``request``, whether the
    prefill and decode profiles ``glm-export trt`` would build cover every graph input.

    A missing or corrupt bundle, sizes the model cannot take (``EngineOptionError``) and a TensorRT release older than
    10 (the operator tables describe TensorRT 10) raise; problems TensorRT would have are returned in the report.
    ``manifest`` is the bundle's, where the caller has read it already (None: read here).
    """
    target = major_minor(trt_version)
    if target is None or target[0] < 10:
        raise EngineOptionError(
            f"--trt-version {trt_version!r}: give a TensorRT 10 release such as 10.3 (JetPack 6.1/6.2); the operator "
            f"tables here describe TensorRT 10.x, and glm-export's TensorRT code needs TensorRT 10"
        )
    manifest = manifest if manifest is not None else read_manifest(bundle_dir)
    profiles = profiles_for_manifest(manifest, request) if request is not None else []
    report = check_for_tensorrt(os.path.join(bundle_dir, manifest.model_file), profiles or None, trt_version)
    facts = PRECISION_TABLE.get(manifest.precision)
    if facts is not None and not facts.tensorrt_builds:
        report.problems.insert(0, Problem(
            "precision",
            "manifest.json",
            f"precision {manifest.precision}: DynamicQuantizeLinear/MatMulInteger have no TensorRT equivalent; build "
            "from an fp32, fp16 or static Q/DQ int8 bundle",
        ))
    return report, profiles


def _default_opset(model: onnx.ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS:
            return int(imp.version)
    return None


def _node_label(node: onnx.NodeProto, index: int) -> str:
    name = node.name or (f"#{index} -> {node.output[0]}" if node.output else f"#{index}")
    op = f"{node.domain}::{node.op_type}" if node.domain not in STANDARD_DOMAINS else node.op_type
    return f"node '{name}' ({op})"


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk_nodes(
    graph: onnx.GraphProto, functions: Mapping[Tuple[str, str], onnx.FunctionProto], prefix: str
) -> Iterator[Tuple[str, onnx.NodeProto]]:
    """Every node, with subgraphs (If/Loop/Scan) and model-local functions (which TensorRT 10 inlines) expanded."""
    for i, node in enumerate(graph.node):
        label = prefix + _node_label(node, i)
        fn = functions.get((node.domain, node.op_type))
        if fn is not None:
            for j, inner in enumerate(fn.node):
                yield f"{label} > {_node_label(inner, j)}", inner
            continue
        yield label, node
        for sub in _subgraphs(node):
            yield from _walk_nodes(sub, functions, prefix=f"{label} > ")


def _check_node(
    where: str,
    node: onnx.NodeProto,
    target: Tuple[int, int],
    initializers: Mapping[str, onnx.TensorProto],
    add: _Add,
) -> None:
    op = node.op_type
    if node.domain not in STANDARD_DOMAINS:
        add(
            Problem(
                "domain",
                where,
                f"operator of domain '{node.domain}', not standard ONNX; TensorRT's parser imports only ai.onnx "
                f"operators (others need a TensorRT plugin); export without {node.domain} contrib ops",
            )
        )
        return
    if op in OPS_SINCE:
        need = OPS_SINCE[op]
        if target < need:
            add(Problem("op", where, f"{op} needs TensorRT {need[0]}.{need[1]} or newer"))
    elif op in UNSUPPORTED_OPS:
        add(Problem("op", where, f"{op} is listed as unsupported by TensorRT's ONNX parser"))
    elif op not in SUPPORTED_OPS:
        add(Problem("op", where, f"{op} is not in TensorRT's ONNX operator support list"))
    for attr in node.attribute:
        if attr.name == "to" and attr.type == onnx.AttributeProto.INT and attr.i in UNSUPPORTED_TYPES:
            add(Problem("dtype", where, f"casts to {_type_name(attr.i)}: {UNSUPPORTED_TYPES[attr.i]}"))
        if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in UNSUPPORTED_TYPES:
            t = attr.t.data_type
            add(Problem("dtype", where, f"holds a {_type_name(t)} constant: {UNSUPPORTED_TYPES[t]}"))
    if op in QDQ_OPS and len(node.input) > 2 and node.input[2]:
        zp = initializers.get(node.input[2])
        if zp is not None:
            _check_zero_point(where, zp, add)


def _check_zero_point(where: str, zp: onnx.TensorProto, add: _Add) -> None:
    if zp.data_type == _T.UINT8:
        add(
            Problem(
                "quantization",
                where,
                f"zero point '{zp.name}' is uint8 (asymmetric quantization); TensorRT runs only symmetric signed "
                f"INT8 Q/DQ: quantize with int8 weights and activations and zero points of 0",
            )
        )
        return
    if zp.data_location == _T.EXTERNAL:
        return
    values = numpy_helper.to_array(zp)
    if values.size and bool((values != 0).any()):
        add(Problem("quantization", where, f"zero point '{zp.name}' is not all zeros; TensorRT requires 0"))


def _type_name(elem_type: int) -> str:
    """numpy-style names where they exist ("float64"), else ONNX's ("float8e5m2")."""
    special = {_T.DOUBLE: "float64", _T.FLOAT: "float32", _T.FLOAT16: "float16"}
    return special.get(elem_type) or _T.DataType.Name(elem_type).lower()


def _check_types(graph: onnx.GraphProto, add: _Add) -> None:
    io_names = {v.name for v in graph.input} | {v.name for v in graph.output}
    for kind, values in (("input", graph.input), ("output", graph.output), ("tensor", graph.value_info)):
        for v in values:
            which = v.type.WhichOneof("value")
            if which != "tensor_type":
                add(Problem("dtype", f"{kind} '{v.name}'", f"is a {which}, TensorRT handles only tensors"))
                continue
            _check_elem(f"{kind} '{v.name}'", v.type.tensor_type.elem_type, v.name in io_names, add)
    for t in graph.initializer:
        _check_elem(f"initializer '{t.name}'", t.data_type, False, add, quant_zero_point_ok=True)
    for node in graph.node:
        for sub in _subgraphs(node):
            _check_types(sub, add)


def _check_elem(where: str, elem_type: int, is_io: bool, add: _Add, quant_zero_point_ok: bool = False) -> None:
    if elem_type in UNSUPPORTED_TYPES:
        add(Problem("dtype", where, f"{_type_name(elem_type)}: {UNSUPPORTED_TYPES[elem_type]}"))
    elif elem_type in IO_ONLY_TYPES and not is_io and not quant_zero_point_ok:
        add(Problem("dtype", where, f"{_type_name(elem_type)}: {IO_ONLY_TYPES[elem_type]}"))


def _check_profiles(graph: onnx.GraphProto, profiles: Sequence[Profile], add: _Add) -> None:
    initializer_names = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializer_names]
    graph_names = {v.name for v in inputs}
    for p in profiles:
        for name in p.shapes:
            if name not in graph_names:
                add(Problem("profile", f"profile '{p.name}'", f"gives shapes for '{name}', which the graph lacks"))
    for v in inputs:
        if v.type.WhichOneof("value") != "tensor_type":
            continue
        dims = list(v.type.tensor_type.shape.dim)
        dynamic = [i for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if not dynamic:
            continue
        labels = ", ".join(dims[i].dim_param or f"axis {i}" for i in dynamic)
        for p in profiles:
            where = f"input '{v.name}'"
            if v.name not in p.shapes:
                add(Problem("dynamic-dim", where, f"has dynamic dims ({labels}) that profile '{p.name}' leaves unset"))
                continue
            lo, _, hi = p.shapes[v.name]
            if len(lo) != len(dims):
                add(Problem("profile", where, f"has rank {len(dims)} but profile '{p.name}' gives rank {len(lo)}"))
                continue
            for i, d in enumerate(dims):
                if d.HasField("dim_value") and not (lo[i] == hi[i] == d.dim_value):
                    add(
                        Problem(
                            "profile",
                            where,
                            f"axis {i} is fixed at {d.dim_value} but profile '{p.name}' ranges it {lo[i]}..{hi[i]}",
                        )
                    )

