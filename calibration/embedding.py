"""The token embedding in fp16 inside a quantized bundle.

Where it stands: the last graph edit of ``glm-export quantize`` for int8, int8-dynamic and int4 (``--embedding
fp16``, the default). The embedding is a Gather that reads one row per token, so its precision costs bundle size
and memory but no decode time: the mid-size model's 65024 x 1024 table is 266 MB in fp32, a quarter of the fp32
bundle and most of a quantized one. Stored in fp16 (rounding error below 1e-3 relative) and cast back to fp32 right
after the Gather, it halves that with no other change to the graph. (Quantizing it to INT4 with onnxruntime's
GatherBlockQuantized needs an opset upgrade that breaks the rest of our opset-17 graph, so it is not offered.)
"""
from __future__ import annotations

from typing import Optional

from calibration.fp16 import to_fp16


def embedding_to_fp16(proto) -> Optional[str]:
    """Store the embedding table (a float32 initializer read only by one Gather) as fp16 with a Cast after the
    Gather; returns the table's name, or None when the graph has no such table (e.g. tied to the LM head)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    readers = {}
    for node in proto.graph.node:
        for t in node.input:
            readers[t] = readers.get(t, 0) + 1
    for index, node in enumerate(proto.graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or readers[table.name] != 1:
            continue
        array = to_fp16(numpy_helper.to_array(table), table.name, remedy="use --embedding fp32")  # (vocab, hidden)
        table.CopyFrom(numpy_helper.from_array(array, table.name))
        gathered = node.output[0]
        node.output[0] = gathered + "_fp16"
        cast = helper.make_node("Cast", [node.output[0]], [gathered], name=node.name + "_to_fp32",
                                to=TensorProto.FLOAT)
        proto.graph.node.insert(index + 1, cast)
        return table.name
    return None
