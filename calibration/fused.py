"""The fused graph of a quantized bundle: the same linear layers quantized the same way as the portable graph.

Where it stands: ``calibration.pipeline`` converts the source bundle's portable graph first; when the source also
has a fused graph (``runtime.manifest.GRAPH_FUSED``) this module converts it with the same quantizer, the same
chosen layers (matched by name: both graphs call the qkv weight of layer 3 ``layers.3.qkv.weight_t``) and, for
static INT8, the same calibration ranges (an activation range belongs to a linear layer's input, so it is renamed
from the portable graph's tensor to the fused graph's). The fused graph's weights are its own file pair
(``model.fused.onnx`` + ``model.fused.onnx.data`` when large): quantized weights cannot be shared with the portable
graph's, whose quantized form differs (Q/DQ for TensorRT).

fp16 is not converted: on x86 CPUs onnxruntime upcasts fp16 MatMuls (the fp16 bundle runs at fp32 speed), and the
fp16 target (GPUs, Jetson) runs the portable graph through TensorRT.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Sequence

from runtime.manifest import FUSED_MODEL_FILE, INLINE_LIMIT, GRAPH_FUSED, Manifest

from calibration.errors import QuantizationError
from calibration.genai_files import write_genai_files
from calibration.graph_io import clear_external_data_locations, load_graph, weight_bytes
from calibration.targets import Linear, find_linears

FUSED_DATA_FILE = FUSED_MODEL_FILE + ".data"
FUSED_PRECISIONS = ("int8", "int8-dynamic", "int4")


def has_fused(manifest: Manifest) -> bool:
    return GRAPH_FUSED in manifest.graphs


def matching_linears(fused_proto, chosen: Sequence[Linear]) -> List[Linear]:
    """The fused graph's linear layers with the names of ``chosen`` (the portable graph's), in the same order."""
    by_name = {lin.name: lin for lin in find_linears(fused_proto)}
    missing = [lin.name for lin in chosen if lin.name not in by_name]
    if missing:
        raise QuantizationError(f"the fused graph has no linear layer {missing[0]!r}; re-export the bundle")
    return [by_name[lin.name] for lin in chosen]


def renamed_ranges(ranges, portable: Sequence[Linear], fused: Sequence[Linear]):
    """The calibration ranges keyed by the fused graph's activation names (same linear layer, same values)."""
    tensors = {}
    for p, f in zip(portable, fused):
        tensors[f.activation] = ranges.tensors[p.activation]
    return dataclasses.replace(ranges, tensors=tensors)


def fold_bias_into_matmulnbits(proto) -> int:
    """MatMulNBits -> Add(bias initializer) becomes one MatMulNBits with its ``bias`` input (the QKV bias): one
    kernel less per layer. Returns how many were folded."""
    inits = {i.name: i for i in proto.graph.initializer}
    readers: Dict[str, List] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    drop = []
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or (len(node.input) > 5 and node.input[5]):
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = [n for n in add.input if n != node.output[0]]
        n_out = next((a.i for a in node.attribute if a.name == "N"), None)
        if len(bias) != 1 or bias[0] not in inits or list(inits[bias[0]].dims) != [n_out]:
            continue
        while len(node.input) < 5:
            node.input.append("")
        node.input.append(bias[0])
        node.output[0] = add.output[0]
        drop.append(add)
    for add in drop:
        proto.graph.node.remove(add)
    return len(drop)


def _declare_float(proto, names: Sequence[str]) -> None:
    """Record ``names`` as float tensors: the Q/DQ quantizer places activation Q/DQ only on tensors whose type shape
    inference knows, and it cannot type the outputs of contrib ops (SkipSimplifiedLayerNormalization)."""
    from onnx import TensorProto, helper

    known = {v.name for v in proto.graph.value_info}
    proto.graph.value_info.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                  for n in names if n not in known)


def save_fused(proto, out_dir: str) -> List[str]:
    """``out_dir/model.fused.onnx`` (+ ``.data`` above the bundle's inline limit); returns the file names."""
    import onnx

    path = os.path.join(out_dir, FUSED_MODEL_FILE)
    if weight_bytes(proto) > INLINE_LIMIT:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=FUSED_DATA_FILE, size_threshold=1024)
        return [FUSED_MODEL_FILE, FUSED_DATA_FILE]
    clear_external_data_locations(proto)
    onnx.save_model(proto, path)
    return [FUSED_MODEL_FILE]


def convert_fused(opts, src_dir: str, src_manifest: Manifest, out_dir: str, chosen: Sequence[Linear],
                  ranges=None) -> Dict[str, Any]:
    """Quantize the source's fused graph into ``out_dir``; returns the manifest's ``graphs["fused"]`` entry with
    its files under "files"."""
    from calibration.embedding import embedding_to_fp16
    from calibration.graph_io import contrib_ops

    src_path = os.path.join(src_dir, src_manifest.graph_file(GRAPH_FUSED))
    fused = matching_linears(load_graph(src_path, with_weights=False), chosen)
    if opts.precision == "int4":
        from calibration.int4 import int4_weight_only

        proto = int4_weight_only(load_graph(src_path), fused, opts.block_size, opts.int4_symmetric,
                                 opts.int4_accuracy_level)
        fold_bias_into_matmulnbits(proto)
    elif opts.precision == "int8-dynamic":
        from calibration.quantize import dynamic_int8

        proto = dynamic_int8(src_path, fused, out_dir)
    elif opts.precision == "int8":
        from calibration.quantize import static_int8

        proto = load_graph(src_path)
        _declare_float(proto, [lin.activation for lin in fused])
        proto = static_int8(proto, fused, renamed_ranges(ranges, chosen, fused))
    else:
        raise QuantizationError(f"no fused graph for precision {opts.precision!r}")
    if opts.embedding == "fp16":
        embedding_to_fp16(proto)
    record = dict(src_manifest.graphs[GRAPH_FUSED])
    record.update(file=FUSED_MODEL_FILE, contrib_ops=contrib_ops(proto), weights="its own (quantized)")
    record["files"] = save_fused(proto, out_dir)
    del proto
    record["files"] += write_genai_files(out_dir, src_manifest.spec, FUSED_MODEL_FILE)
    return record
