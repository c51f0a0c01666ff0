"""FP16 from an fp32 bundle's graph, with the same fp32 islands as ``glm-export onnx --fp16``.

Where it stands: ``glm-export quantize --precision fp16``. The result matches what the fp16 export writes: fp16
weights, hidden states and past/present; fp32 norm reductions, softmax (with the mask), rotary tables and logits.

Why our own pass and not onnxconverter-common's converter with a block list: our exporter already traces every
dtype boundary as a Cast (``x.float()`` before a norm's reduction and the attention scores, ``.to(dtype)`` after them,
after the rotary tables and the softmax; ``.float()`` on the logits), and in an fp32 trace those Casts are
float->float no-ops. So the fp16 graph is the fp32 graph with each such Cast flipping between fp16 and fp32, the
weights and KV in fp16 and the logits in fp32: a dtype assignment, solved here as a two-colouring (union-find with
parity), then applied. No node is added, so the result is the fp16 export's graph node for node.

One wrinkle: in an fp32 trace ``x.float()`` returns ``x`` itself, so the tracer recorded the residual additions as
reading the norm's Cast output. Where a node would mix fp16 with such a Cast's fp32 output, it reads the Cast's
input instead (what the fp16 trace has).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from runtime import graph_contract as gc

from calibration.errors import QuantizationError

FP32, FP16 = 0, 1  # colours
# ops whose inputs must be fp32 in a safe graph: norm reductions, softmax, rotary tables
_FP32_ONLY_OPS = ("ReduceMean", "Pow", "Softmax", "Cos", "Sin", "Sqrt")


class ParityUnionFind:
    """Elements joined with a parity (0: same colour, 1: opposite); a class may carry a fixed colour."""

    def __init__(self):
        self.parent: Dict[str, str] = {}
        self.parity: Dict[str, int] = {}  # parity to parent
        self.colour: Dict[str, int] = {}  # root -> colour of the root

    def find(self, x: str) -> Tuple[str, int]:
        if x not in self.parent:
            self.parent[x], self.parity[x] = x, 0
            return x, 0
        path = []
        while self.parent[x] != x:
            path.append(x)
            x = self.parent[x]
        root, acc = x, 0
        for node in reversed(path):  # path compression with accumulated parity
            acc ^= self.parity[node]
            self.parent[node], self.parity[node] = root, acc
        return root, (self.parity[path[0]] if path else 0)

    def value(self, x: str) -> Optional[int]:
        root, p = self.find(x)
        c = self.colour.get(root)
        return None if c is None else c ^ p

    def fix(self, x: str, colour: int) -> bool:
        root, p = self.find(x)
        want = colour ^ p
        if root in self.colour:
            return self.colour[root] == want
        self.colour[root] = want
        return True

    def union(self, a: str, b: str, diff: int) -> bool:
        """colour(a) XOR colour(b) == diff; False (and no change) when that contradicts what is known."""
        ra, pa = self.find(a)
        rb, pb = self.find(b)
        if ra == rb:
            return (pa ^ pb) == diff
        ca, cb = self.colour.get(ra), self.colour.get(rb)
        link = pa ^ pb ^ diff  # colour(rb) = colour(ra) XOR link
        if ca is not None and cb is not None and (ca ^ link) != cb:
            return False
        self.parent[rb], self.parity[rb] = ra, link
        if ca is None and cb is not None:
            self.colour[ra] = cb ^ link
        self.colour.pop(rb, None)
        return True


def _float_tensors(proto) -> Set[str]:
    """Names of every float32 tensor in the graph (types from onnx shape inference, on a weightless copy)."""
    import onnx
    from onnx import TensorProto, helper

    # shape inference needs the types of the weights, not their (possibly gigabytes of) data
    shell = onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import)
    shell.graph.node.extend(proto.graph.node)
    shell.graph.input.extend(proto.graph.input)
    shell.graph.output.extend(proto.graph.output)
    for init in proto.graph.initializer:
        shell.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inferred = onnx.shape_inference.infer_shapes(shell)
    out = set()
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.add(vi.name)
    out.update(i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type == TensorProto.FLOAT:
            out.add(node.output[0])
    return out


def assign_dtypes(proto) -> Tuple[Dict[str, int], List[Tuple[str, int, str]]]:
    """Solve the fp16/fp32 colouring of ``proto``'s float tensors.

    Returns (tensor -> FP16/FP32, rewires) where each rewire (node name, input index, new input) replaces a read of a
    no-op Cast's output by the Cast's input. QuantizationError when no colouring exists.
    """
    floats = _float_tensors(proto)
    uf = ParityUnionFind()
    toggles: Dict[str, str] = {}  # output of a float->float Cast -> its input
    for i in proto.graph.initializer:
        if i.name in floats:
            uf.fix(i.name, FP16)
    for t in proto.graph.input:
        if t.name in floats:
            uf.fix(t.name, FP16)  # past_key_values.*
    for t in proto.graph.output:
        if t.name in floats:
            uf.fix(t.name, FP32 if t.name == gc.LOGITS else FP16)
    for node in proto.graph.node:
        if node.op_type == "Cast" and node.output[0] in floats:
            if node.input[0] in floats:
                toggles[node.output[0]] = node.input[0]
            elif not uf.fix(node.output[0], FP32):  # ints -> float: positions, computed in fp32
                raise QuantizationError(f"fp16 conversion: {node.name} must be fp32 and fp16 at once")
    rewires = []
    for node in proto.graph.node:
        if node.op_type == "Constant":
            continue  # a constant takes the colour of whatever reads it
        if node.op_type == "Cast" and node.output[0] in toggles:
            if not uf.union(node.input[0], node.output[0], 1):
                raise QuantizationError(f"fp16 conversion: cannot place the dtype boundary at {node.name}")
            continue
        names = [(k, t) for k, t in enumerate(node.input) if t in floats] + [(-1, t) for t in node.output if t in floats]
        if not names:
            continue
        anchor = names[0][1]
        for k, t in names[1:]:
            if uf.union(anchor, t, 0):
                continue
            source = toggles.get(t)
            if k >= 0 and source is not None and uf.union(anchor, source, 0):
                rewires.append((node.name, k, source))
                continue
            if k >= 0 and anchor in toggles and uf.union(toggles[anchor], t, 0):  # the aliased read came first
                rewires.append((node.name, names[0][0], toggles[anchor]))
                anchor = toggles[anchor]
                continue
            raise QuantizationError(
                f"fp16 conversion: {node.name} ({node.op_type}) would mix fp16 and fp32 inputs; only graphs written "
                "by 'glm-export onnx' can be converted"
            )
    colours = {t: (uf.value(t) if uf.value(t) is not None else FP32) for t in floats}
    return colours, rewires


def _check_islands(proto, colours: Dict[str, int]) -> None:
    """The numerically sensitive ops must compute in fp32, or the bundle would overflow like a naive fp16 graph."""
    for node in proto.graph.node:
        if node.op_type in _FP32_ONLY_OPS and any(colours.get(t) == FP16 for t in node.input):
            raise QuantizationError(
                f"fp16 conversion: {node.name} ({node.op_type}) would run in fp16; the graph lacks glm-export's fp32 "
                "islands (re-export it with this glm-export)"
            )


FP16_MAX = 65504.0


def to_fp16(array: np.ndarray, name: str, remedy: str = "") -> np.ndarray:
    """``array`` as float16; QuantizationError (naming ``name``, then ``remedy`` when given) where a value lies
    beyond fp16's range."""
    big = float(np.abs(array).max()) if array.size else 0.0
    if big > FP16_MAX:
        raise QuantizationError(f"fp16 conversion: {name} holds {big:.4g}, beyond fp16's range (65504)"
                                + (f"; {remedy}" if remedy else ""))
    return array.astype(np.float16)


def fp16_from_fp32(proto):
    """``proto`` (an fp32 glm-export graph, weights loaded) converted in place to the fp16 form; returns it."""
    from onnx import numpy_helper

    fp16_weights = fp16_graph_edits(proto)
    for i, init in enumerate(proto.graph.initializer):
        if init.name in fp16_weights:
            proto.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(to_fp16(numpy_helper.to_array(init), init.name), init.name))
    return proto


def fp16_graph_edits(proto) -> Set[str]:
    """Every edit of :func:`fp16_from_fp32` but the weights' data (the graph may be weightless: the streaming
    quantizer, calibration.stream_quant, converts each weight as it writes it); returns the names of the
    initializers to store as fp16."""
    from onnx import TensorProto, numpy_helper

    colours, rewires = assign_dtypes(proto)
    _check_islands(proto, colours)
    nodes = {n.name: n for n in proto.graph.node}
    for node_name, k, source in rewires:
        nodes[node_name].input[k] = source
    for node in proto.graph.node:
        if node.op_type == "Constant" and colours.get(node.output[0]) == FP16:
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(to_fp16(numpy_helper.to_array(t), node.name), t.name))
        elif node.op_type == "Cast" and node.output[0] in colours:
            for a in node.attribute:
                if a.name == "to":
                    a.i = TensorProto.FLOAT16 if colours[node.output[0]] == FP16 else TensorProto.FLOAT
    for t in list(proto.graph.input) + list(proto.graph.output):
        if colours.get(t.name) == FP16:
            t.type.tensor_type.elem_type = TensorProto.FLOAT16
    del proto.graph.value_info[:]  # stale fp32 types; onnxruntime infers them again
    return {i.name for i in proto.graph.initializer if colours.get(i.name) == FP16}
