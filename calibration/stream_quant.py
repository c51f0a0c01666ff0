"""Per-tensor converters for the streaming writer (``calibration.stream_write.write_streamed``).

Where it stands: every precision of ``glm-export onnx --precision`` and ``glm-export quantize`` writes its graph
through one of these, one weight at a time. A converter sees the weightless graph once (``prepare``: the graph edits
that need no data), then each weight (``convert``: the tensors to store, and the nodes that replace the weight's
MatMul or Gather), then the graph again (``finish``).

What is reused, and how the bundles stay the same as the whole-graph conversion's:

* INT4 (MatMulNBits): onnxruntime's own 4-bit kernel (``quantize_matmul_4bits``, what its MatMulNBitsQuantizer
  calls) on each weight, the MatMulNBits node written as that quantizer writes it (``Int4Converter``: why by hand).
* Static INT8 (Q/DQ) and dynamic INT8 (DynamicQuantizeLinear + MatMulInteger) are produced by
  the very functions the whole-graph path calls (``calibration.quantize.static_int8`` / ``dynamic_int8``, i.e.
  onnxruntime's QDQQuantizer and quantize_dynamic), each run on a one-node graph: the linear layer's MatMul with
  its weight, under the same node, tensor and weight names. onnxruntime's rewriting of a MatMul depends only on
  that node, its weight and (static INT8) its input's range, so the nodes and tensors come out exactly as in the
  whole graph, and the weights bit-identical (tests/exporter/test_stream_export.py compares both routes node by
  node and byte by byte, INT4 too). Each one-node graph holds one weight: onnxruntime's copies of it are the peak,
  not the model's.
* The fp16 embedding: the nodes and bytes of ``calibration.embedding.embedding_to_fp16``, written directly
  (``LinearConverter._embedding_fp16``: why).
* fp16 from an fp32 graph is ``calibration.fp16.fp16_graph_edits`` on the weightless graph, then ``to_fp16`` per
  weight.

One condition: a linear layer's input must feed no other quantized MatMul (true of every glm-export graph: q/k/v
and gate/up are fused); ``prepare`` checks it.
"""
from __future__ import annotations

import gc
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from calibration.defaults import INT4_BLOCK_SIZE, INT4_SYMMETRIC
from calibration.errors import QuantizationError
from calibration.targets import Linear


# A weight larger than this (fp32 bytes) is quantized in blocks of output columns: onnxruntime's quantizers hold
# several copies of what they are given (dynamic INT8: about 6.6x a 266 MB LM head, measured), and per-column forms
# (per-channel INT8 scales, INT4 blocks along K) give the same tensors for a block of columns as for the whole.
CHUNK_BYTES = 64 * 1024**2
# fp32 bytes of the column block the quantized-weight check dequantizes at a time (about eight temporaries of it
# are alive: the rows read, the unpacked nibbles, the dequantized block, the difference, float64 squares)
CHECK_BYTES = 16 * 1024**2
# axis along which each quantized tensor of a linear layer (named weight + suffix) runs over the output columns N
_COLUMN_AXIS = {"_quantized": 1, "_scale": 0, "_zero_point": 0, "_Q4": 0, "_scales": 0, "_zero_points": 0}


@dataclass
class Piece:
    """What one weight becomes: tensors to store, and optionally (node name, nodes replacing it)."""

    tensors: List[Tuple[str, np.ndarray]]
    replace: Optional[Tuple[str, list]] = None


def _np_dtype(header):
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(header.data_type))


class FloatConverter:
    """Weights stored as read, in the graph's own dtype (fp32 export; fp16 export, traced in fp16)."""

    def prepare(self, proto) -> None:
        pass

    def read_dtype(self, header):
        return _np_dtype(header)

    def convert(self, header, array: np.ndarray) -> Piece:
        return Piece([(header.name, array)])

    def finish(self, proto) -> None:
        pass


class Fp16Converter(FloatConverter):
    """fp32 graph -> the fp16 form (``quantize --precision fp16``): graph edits first, then each weight."""

    def __init__(self):
        self.fp16_names = set()

    def prepare(self, proto) -> None:
        from calibration.fp16 import fp16_graph_edits

        self.fp16_names = fp16_graph_edits(proto)

    def read_dtype(self, header):
        return np.dtype(np.float32)

    def convert(self, header, array: np.ndarray) -> Piece:
        from calibration.fp16 import to_fp16

        if header.name in self.fp16_names:
            return Piece([(header.name, to_fp16(array, header.name))])
        return Piece([(header.name, array)])


def one_node_graph(main, node, initializers, inputs: Sequence[str]):
    """A ModelProto holding ``node`` alone (same names), its ``initializers`` and float inputs ``inputs``, each of
    shape (batch, seq, K) as in the whole graph (the Q/DQ quantizer makes per-tensor scales scalars only for inputs
    of known rank)."""
    import onnx
    from onnx import TensorProto, helper

    k = initializers[0].dims[0] if initializers and len(initializers[0].dims) == 2 else None
    graph = helper.make_graph(
        [node], "one_node",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", k]) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output],
        initializer=initializers,
    )
    model = onnx.ModelProto()
    model.CopyFrom(helper.make_model(graph, opset_imports=list(main.opset_import)))
    model.ir_version = main.ir_version
    model.producer_name, model.producer_version = main.producer_name, main.producer_version
    return model


QuantizeOne = Callable[[object, Linear], object]  # (one-node ModelProto, linear) -> quantized ModelProto


class LinearConverter(FloatConverter):
    """The chosen linear layers quantized by ``quantize_one``, the embedding optionally fp16, the rest as is."""

    def __init__(self, chosen: Sequence[Linear], quantize_one: QuantizeOne, embedding_fp16: bool,
                 after: Optional[Callable[[object], None]] = None):
        self.chosen = {lin.weight: lin for lin in chosen}
        self.quantize_one = quantize_one
        self.embedding_fp16 = embedding_fp16
        self.after = after
        self.embedding: Optional[str] = None  # the table's name, once converted
        self.opsets: Dict[str, int] = {}
        self.producer: Optional[Tuple[str, str]] = None

    def prepare(self, proto) -> None:
        from onnx import TensorProto

        self.main = proto
        self.nodes = {}
        readers: Dict[str, int] = {}
        for node in proto.graph.node:
            for t in node.input:
                readers[t] = readers.get(t, 0) + 1
        for node in proto.graph.node:
            if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in self.chosen:
                self.nodes[node.input[1]] = node
        acts = [self.chosen[w].activation for w in self.chosen]
        if len(set(acts)) != len(acts):
            raise QuantizationError("streaming quantization: two quantized linear layers read the same input")
        self.gather = None
        inits = {i.name: i for i in proto.graph.initializer}
        if self.embedding_fp16:
            for node in proto.graph.node:
                table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
                if table is not None and table.data_type == TensorProto.FLOAT and len(table.dims) == 2 \
                        and readers.get(table.name) == 1:
                    self.gather = node
                    break

    def read_dtype(self, header):
        return np.dtype(np.float32)

    def convert(self, header, array: np.ndarray) -> Piece:
        from onnx import numpy_helper

        lin = self.chosen.get(header.name)
        if lin is not None:
            node = self.nodes[header.name]
            k, n = array.shape
            width = max(1, min(n, CHUNK_BYTES // (4 * k)))
            pieces = []
            for start in range(0, n, width):  # column blocks: every form quantizes each output column on its own
                block = np.ascontiguousarray(array[:, start: start + width])
                sub = one_node_graph(self.main, node, [numpy_helper.from_array(block, header.name)], [node.input[0]])
                del block
                pieces.append(self._piece(node.name, self.quantize_one(sub, lin)))
                del sub
                gc.collect()  # onnxruntime's quantizers leave reference cycles holding their copies of the weight
            del array
            return pieces[0] if len(pieces) == 1 else _join_columns(pieces, lin, n)
        if self.gather is not None and header.name == self.gather.input[0]:
            return self._embedding_fp16(header.name, array)
        return Piece([(header.name, array)])

    def _embedding_fp16(self, name: str, array: np.ndarray) -> Piece:
        """What ``calibration.embedding.embedding_to_fp16`` makes of the Gather and its table, without its one-Gather
        graph: that route holds the fp32 table about five times (TensorProto copies on the way in and out; 1.24 GB
        for the 288 M model's 266 MB table, measured), this one holds the table and its fp16 copy. The same nodes
        (the Gather writing ``<output>_fp16``, then the Cast named ``<gather>_to_fp32``) and the same fp16 bytes
        (numpy's rounding, as ``calibration.fp16.to_fp16``; the range check by row blocks)."""
        from onnx import TensorProto, helper

        from calibration.fp16 import to_fp16

        rows = max(1, CHUNK_BYTES // max(1, 4 * array.shape[1]))
        table = np.empty(array.shape, dtype=np.float16)
        for start in range(0, array.shape[0], rows):
            table[start: start + rows] = to_fp16(array[start: start + rows], name, remedy="use --embedding fp32")
        del array
        gather = helper.make_node("Gather", [], [])
        gather.CopyFrom(self.gather)
        gathered = gather.output[0]
        gather.output[0] = gathered + "_fp16"
        cast = helper.make_node("Cast", [gather.output[0]], [gathered], name=gather.name + "_to_fp32",
                                to=TensorProto.FLOAT)
        self.embedding = name
        return Piece([(name, table)], (gather.name, [gather, cast]))

    def _piece(self, node_name: str, out) -> Piece:
        from onnx import numpy_helper

        for op in out.opset_import:
            self.opsets[op.domain] = max(self.opsets.get(op.domain, 0), op.version)
        if out.producer_name != self.main.producer_name:
            self.producer = (out.producer_name, out.producer_version)
        tensors = [(i.name, numpy_helper.to_array(i)) for i in out.graph.initializer]
        # copies of the nodes: a reference to a node of ``out`` keeps all of ``out`` (its quantized weights
        # included) alive in protobuf's arena, and these nodes stay in the graph until the end (the streamed int4
        # export grew by about a layer's quantized bytes per layer, measured)
        nodes = []
        for node in out.graph.node:
            copy = type(node)()
            copy.CopyFrom(node)
            nodes.append(copy)
        return Piece(tensors, (node_name, nodes))

    def finish(self, proto) -> None:
        from onnx import helper

        have = {op.domain for op in proto.opset_import}
        for domain, version in sorted(self.opsets.items()):
            if domain not in have:
                proto.opset_import.append(helper.make_opsetid(domain, version))
        if self.producer is not None:
            proto.producer_name, proto.producer_version = self.producer
        if self.after is not None:
            self.after(proto)


def _join_columns(pieces: List[Piece], lin: Linear, n: int) -> Piece:
    """One Piece from the Pieces of consecutive column blocks of one weight: its tensors concatenated along their
    column axis, the rest (the activation's scale and zero point) from the first block; MatMulNBits' N set."""
    from onnx import helper

    tensors = []
    for name, first in pieces[0].tensors:
        suffix = name[len(lin.weight):] if name.startswith(lin.weight) else None
        if suffix in _COLUMN_AXIS:
            parts = [dict(p.tensors)[name] for p in pieces]
            tensors.append((name, np.concatenate(parts, axis=_COLUMN_AXIS[suffix])))
        else:
            tensors.append((name, first))
    nodes = pieces[0].replace[1]
    for node in nodes:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "N":
                    a.CopyFrom(helper.make_attribute("N", n))
    return Piece(tensors, (pieces[0].replace[0], nodes))


def int4_blocks(weight: np.ndarray, block_size: int, symmetric: bool):
    """(packed (N, blocks, block_size / 2) uint8, scales (N, blocks) fp32, zero points (N, ceil(blocks / 2)) uint8)
    of a (K, N) fp32 weight: onnxruntime's own 4-bit kernel (``quantize_matmul_4bits``), called as its
    MatMulNBitsQuantizer calls it (``DefaultWeightOnlyQuantizer.qbits_block_quant``, QOperator format: K zero-padded
    to whole blocks, zero-filled outputs), so the bytes are the quantizer's."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        weight = np.pad(weight, ((0, blocks * block_size - rows), (0, 0)), "constant")
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    packed = np.zeros((cols, blocks, block_size // 2), dtype=np.uint8)
    zero_points = np.zeros((cols, -(-blocks // 2)), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    quantize_matmul_4bits(packed, weight, scales, zero_points, block_size, cols, rows, symmetric)
    return packed, scales, zero_points


class Int4Converter(LinearConverter):
    """INT4 (MatMulNBits) without onnxruntime's MatMulNBitsQuantizer around the kernel.

    Why hand-written: the quantizer, even on a one-node graph, holds the weight several times over (the graph's
    TensorProto, its onnx-ir copy, the padded array, the serialized outputs, reference cycles until a collection:
    2.05 GB for a 0.58 GB writer on the 288 M model). Here only the fp32 weight and its packed blocks are alive. The
    node and tensors are those ``quantize_matmul`` of onnxruntime.quantization.matmul_nbits_quantizer builds for a
    2-D weight in QOperator format (same names, attributes, dtypes; the com.microsoft opset at version 1);
    tests/exporter/test_stream_export.py compares the bundles with the whole-graph quantizer's byte for byte."""

    def __init__(self, chosen: Sequence[Linear], block_size: int, symmetric: bool, accuracy_level: int,
                 embedding_fp16: bool):
        super().__init__(chosen, None, embedding_fp16)
        self.block_size, self.symmetric, self.accuracy_level = block_size, symmetric, accuracy_level

    def convert(self, header, array: np.ndarray) -> Piece:
        from onnx import helper

        if header.name not in self.chosen:
            return super().convert(header, array)
        node = self.nodes[header.name]
        rows, cols = array.shape
        packed, scales, zero_points = int4_blocks(array, self.block_size, self.symmetric)
        del array
        w = header.name
        tensors = [(w + "_Q4", packed), (w + "_scales", scales)]
        inputs = [node.input[0], w + "_Q4", w + "_scales"]
        if not self.symmetric:
            tensors.append((w + "_zero_points", zero_points))
            inputs.append(w + "_zero_points")
        attrs = {"K": rows, "N": cols, "bits": 4, "block_size": self.block_size}
        if self.accuracy_level:  # the quantizer leaves out a zero accuracy_level (optional attribute)
            attrs["accuracy_level"] = self.accuracy_level
        new = helper.make_node("MatMulNBits", inputs=inputs, outputs=[node.output[0]],
                               name=node.name + "_Q4" if node.name else "", domain="com.microsoft", **attrs)
        self.opsets["com.microsoft"] = max(self.opsets.get("com.microsoft", 0), 1)
        return Piece(tensors, (node.name, [new]))


def int4_converter(chosen, block_size: int, symmetric: bool, accuracy_level: int, embedding_fp16: bool):
    return Int4Converter(chosen, block_size, symmetric, accuracy_level, embedding_fp16)


def int8_converter(chosen, ranges, embedding_fp16: bool):
    """Static Q/DQ from ``ranges`` (a CalibrationRanges covering every chosen layer's input)."""
    from calibration.quantize import activation_ranges, restore_float_side_reads, static_int8

    activation_ranges(chosen, ranges)  # every range present, before any work

    def one(sub, lin):
        return static_int8(sub, [lin], ranges)

    return LinearConverter(chosen, one, embedding_fp16, after=lambda proto: restore_float_side_reads(proto, chosen))


def int8_dynamic_converter(chosen, embedding_fp16: bool, work_dir: str):
    from calibration.quantize import dynamic_int8

    def one(sub, lin):
        import onnx

        tmp = tempfile.mkdtemp(prefix=".one-linear-", dir=work_dir)
        try:
            path = os.path.join(tmp, "model.onnx")
            # external data: one fp32 weight can pass protobuf's 2 GB limit (GLM-4's LM head is 2.5 GB)
            onnx.save_model(sub, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
            del sub
            return dynamic_int8(path, [lin], tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return LinearConverter(chosen, one, embedding_fp16)


@dataclass
class ConverterChoice:
    """What ``make_converter`` needs besides the graph: quantization settings (calibration.pipeline options)."""

    precision: str
    block_size: int = INT4_BLOCK_SIZE
    int4_symmetric: bool = INT4_SYMMETRIC
    int4_accuracy_level: int = 4
    embedding_fp16: bool = True
    ranges: object = None
    work_dir: str = field(default_factory=tempfile.gettempdir)


def make_converter(choice: ConverterChoice, chosen: Sequence[Linear], source_precision: str = "fp32"):
    """The converter writing ``choice.precision`` from a graph of ``source_precision`` (fp32, or fp16 when the
    graph was traced in fp16: stored as is)."""
    p = choice.precision
    if p == source_precision or p == "fp32":
        return FloatConverter()
    if p == "fp16":
        return Fp16Converter()
    if p == "int4":
        return int4_converter(chosen, choice.block_size, choice.int4_symmetric, choice.int4_accuracy_level,
                              choice.embedding_fp16)
    if p == "int8":
        return int8_converter(chosen, choice.ranges, choice.embedding_fp16)
    if p == "int8-dynamic":
        return int8_dynamic_converter(chosen, choice.embedding_fp16, choice.work_dir)
    raise QuantizationError(f"no streaming converter for precision {p!r}")


def dequantized_weight(read: Callable[[str], np.ndarray], lin: Linear, precision: str,
                       columns: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The (K, N) float32 weight a quantized bundle's tensors for ``lin`` stand for (``read``: name -> array), from
    the tensors the converters above write: MatMulNBits' packed nibbles, scales and zero points (low nibble first;
    8 when symmetric), or an int8 (K, N) weight with per-column scales and zero points. ``columns``: only output
    columns [start, stop), (K, stop - start)."""
    w = lin.weight
    cols = slice(*columns) if columns is not None else slice(None)
    if precision == "int4":
        packed = read(w + "_Q4")[cols]  # (N, blocks, block_size / 2) uint8
        scales = read(w + "_scales")[cols].astype(np.float32)  # (N, blocks)
        n, blocks, half = packed.shape
        q = np.empty((n, blocks, 2 * half), dtype=np.float32)
        q[..., 0::2] = packed & 0x0F
        q[..., 1::2] = packed >> 4
        try:
            zp_packed = read(w + "_zero_points")[cols]  # (N, ceil(blocks / 2)) uint8
            zp = np.empty((n, 2 * zp_packed.shape[1]), dtype=np.float32)
            zp[:, 0::2] = zp_packed & 0x0F
            zp[:, 1::2] = zp_packed >> 4
            zp = zp[:, :blocks]
        except KeyError:
            zp = np.full((n, blocks), 8.0, dtype=np.float32)
        full = (q - zp[..., None]) * scales[..., None]  # (N, blocks, block_size)
        return full.reshape(n, -1)[:, : lin.shape[0]].T
    q = read(w + "_quantized")[:, cols].astype(np.float32)  # (K, N), static and dynamic alike
    scale, zero = read(w + "_scale"), read(w + "_zero_point")  # (N,) (a scalar would be per-tensor)
    scale = (scale[cols] if scale.ndim else scale).astype(np.float32)
    zero = (zero[cols] if zero.ndim else zero).astype(np.float32)
    return (q - zero) * scale


def quantized_weight_error(want, read: Callable[[str], np.ndarray], lin: Linear, precision: str) -> float:
    """Relative RMS error (||got - want|| / ||want||) of ``lin``'s quantized tensors (``read``: name -> array)
    against the float weight in checkpoint orientation (N, K): ``want`` the array, or a function (start, stop) -> its
    rows [start, stop) as a float32 array (then never read whole). Computed a block of output columns at a time:
    dequantizing a whole weight and taking float64 squares held about six fp32 copies of it (the LM head was the
    export's peak)."""
    k, n = lin.shape
    rows = want if callable(want) else (lambda a, b: want[a:b])
    width = max(1, CHECK_BYTES // (4 * k))
    tensors = {}

    def cached(name: str) -> np.ndarray:  # each packed tensor read once (1/8 to 1/4 of the fp32 bytes)
        if name not in tensors:
            tensors[name] = read(name)
        return tensors[name]

    err = ref = 0.0
    for start in range(0, n, width):
        stop = min(n, start + width)
        got = dequantized_weight(cached, lin, precision, columns=(start, stop))  # (K, cols)
        block = rows(start, stop).T
        ref += float(np.sum(np.square(block, dtype=np.float64)))
        err += float(np.sum(np.square(got - block, dtype=np.float64)))
        del got, block
    return float(np.sqrt(err / (n * k))) / max(float(np.sqrt(ref / (n * k))), 1e-30)


def form_record(precision: str, block_size: int = INT4_BLOCK_SIZE,
                symmetric: bool = INT4_SYMMETRIC) -> Dict[str, object]:
    """The ``extra["quantization"]`` form entries of a precision (the same as the whole-graph converters')."""
    if precision == "int4":
        return {"form": "MatMulNBits", "runs_on": ["onnxruntime"],
                "weights": f"int4 blocks of {block_size} along K, "
                           + ("symmetric" if symmetric else "with zero points")}
    if precision == "int8-dynamic":
        return {"form": "dynamic (DynamicQuantizeLinear + MatMulInteger)", "weights": "int8 per-channel symmetric",
                "activations": "uint8 per-tensor, computed at run time", "runs_on": ["onnxruntime"]}
    if precision == "int8":
        return {"form": "QDQ", "weights": "int8 per-channel symmetric (axis 1 of each (K, N) weight)",
                "activations": "int8 per-tensor symmetric", "ranges_file": "calibration_ranges.json",
                "runs_on": ["onnxruntime", "tensorrt"]}
    return {"fp32_islands": ["norm reductions", "attention scores + mask + softmax", "rotary tables", "logits"],
            "runs_on": ["onnxruntime", "tensorrt"]}
