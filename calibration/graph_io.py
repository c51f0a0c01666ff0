"""Reading and writing bundle graphs for the precision stage, with the bundle's external-data policy.

Where it stands: every converter reads the source bundle's ``model.onnx`` (weights inline or in
``model.onnx.data``) through ``load_graph`` and writes its result with ``save_graph``, which follows the exporter's
rule (file names and limit in ``runtime.manifest``): weights over 256 MB go to ``model.onnx.data`` (always when the
graph would pass protobuf's 2 GB limit), smaller graphs are one file. ``graph_with_outputs`` writes a calibration
copy of a graph that also returns chosen intermediate tensors, pointing at the original weights instead of copying
them.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Sequence

from runtime.manifest import DATA_FILE, INLINE_LIMIT, MODEL_FILE  # the bundle layout, importable from here too


def load_graph(path: str, with_weights: bool = True):
    """The ModelProto at ``path``; external weights loaded into memory unless ``with_weights`` is False."""
    import onnx

    return onnx.load(path, load_external_data=with_weights)


def weight_bytes(proto) -> int:
    """Bytes of initializer data held in the proto (inline or loaded)."""
    total = 0
    for init in proto.graph.initializer:
        total += len(init.raw_data) if init.raw_data else 0
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            total += 8 * len(getattr(init, field))
    return total


def save_graph(proto, out_dir: str) -> List[str]:
    """Write ``proto`` as ``out_dir/model.onnx`` (+ ``model.onnx.data`` for large weights); returns the file names."""
    import onnx

    path = os.path.join(out_dir, MODEL_FILE)
    data_path = os.path.join(out_dir, DATA_FILE)
    if os.path.exists(data_path):
        os.remove(data_path)
    if weight_bytes(proto) > INLINE_LIMIT:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE,
                        size_threshold=1024)
        return [MODEL_FILE, DATA_FILE]
    clear_external_data_locations(proto)
    onnx.save_model(proto, path)
    return [MODEL_FILE]


def clear_external_data_locations(proto) -> None:
    """Mark every initializer as inline. A graph loaded with its external data (``load_external_data=True``) holds
    the bytes but keeps the location fields, which would make ``onnx.save_model`` look for the data file again."""
    import onnx

    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]


def graph_with_outputs(src_model: str, tensor_names: Sequence[str], work_dir: str) -> str:
    """A copy of the graph at ``src_model`` in ``work_dir`` that also outputs ``tensor_names`` (float32, shapes
    dynamic). External weights are hard-linked (copied across file systems), never rewritten; not symlinked, since
    onnxruntime refuses external data that resolves outside the model's directory."""
    import onnx
    from onnx import TensorProto, helper

    proto = load_graph(src_model, with_weights=False)
    existing = {o.name for o in proto.graph.output}
    for name in tensor_names:
        if name not in existing:
            proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    os.makedirs(work_dir, exist_ok=True)
    path = os.path.join(work_dir, MODEL_FILE)
    onnx.save_model(proto, path)
    src_data = os.path.join(os.path.dirname(os.path.abspath(src_model)), DATA_FILE)
    if os.path.isfile(src_data):
        link = os.path.join(work_dir, DATA_FILE)
        try:
            os.link(src_data, link)
        except OSError:
            shutil.copyfile(src_data, link)
    return path


def default_opset(proto) -> int:
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def contrib_ops(proto) -> List[str]:
    """'domain.OpType' of every operator outside the standard ONNX domain, sorted."""
    return sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
