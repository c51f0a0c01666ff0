"""The fused graph of a quantized bundle: the same linear layers quantized the same way as the portable graph.

Where it stands: ``calibration.pipeline`` converts the source bundle's portable graph first; when the source also
has a fused graph (``runtime.manifest.GRAPH_FUSED``) the whole-graph route (``QuantizeOptions(streaming=False)``,
:func:`convert_fused`) converts it with the same quantizer, the same chosen layers (matched by name: both graphs
call the qkv weight of layer 3 ``layers.3.qkv.weight_t``) and, for static INT8, the same calibration ranges (an
activation range belongs to a linear layer's input, so it is renamed from the portable graph's tensor to the fused
graph's). That route gives the fused graph its own weight files (``model.fused.onnx`` + ``model.fused.onnx.data``
when large).

The streamed routes (``glm-export onnx --precision int8|int8-dynamic|int4`` and the default, streaming
``glm-export quantize``) do not quantize anything twice: :func:`rewire_onto_portable` takes the float fused graph,
replaces each of its linear layers (and the fp16 embedding's Gather) by the nodes that replaced the same layer in the
portable graph (``calibration.stream_write.write_streamed(..., replaced=)``), renamed onto the fused graph's
tensors, and points its initializers at the tensors the portable graph wrote: the same quantizer output, the same
bytes, one copy in ``model.onnx.data``, and no weight read while the fused graph is built.

Which precisions carry a fused graph is ``runtime.manifest.PRECISION_TABLE``'s ``fused_graph`` (the rule
exporter/graph_choice.py applies too): not fp16, since on x86 CPUs onnxruntime upcasts fp16 MatMuls (the fp16
bundle runs at fp32 speed), and the fp16 target (GPUs, Jetson) runs the portable graph through TensorRT.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Sequence

from runtime.manifest import FUSED_MODEL_FILE, INLINE_LIMIT, GRAPH_FUSED, MODEL_FILE, PRECISION_TABLE, Manifest

from calibration.errors import QuantizationError
from calibration.genai_files import write_genai_files
from calibration.graph_io import clear_external_data_locations, load_graph, weight_bytes
from calibration.targets import Linear, find_linears

FUSED_DATA_FILE = FUSED_MODEL_FILE + ".data"


def has_fused(manifest: Manifest) -> bool:
    return GRAPH_FUSED in manifest.graphs


def keeps_fused(manifest: Manifest, precision: str) -> bool:
    """``glm-export quantize`` writes a fused graph: the source bundle has one (the export's graph_choice allowed
    it) and ``precision`` takes one (runtime.manifest.PRECISION_TABLE)."""
    return has_fused(manifest) and PRECISION_TABLE[precision].fused_graph


def rewire_onto_portable(fused, portable_names, written, replaced, precision: str):
    """The fused graph over a portable graph written by ``write_streamed``; see the module docstring.

    ``fused``: the float fused ModelProto (its weights named as the float portable graph's: ``portable_names``; its
    other initializers, the rotary tables and constants, are its own and kept); ``written``: the portable ModelProto
    as written (loaded without its external data: its initializers reference ``model.onnx.data``, or hold small
    weights inline); ``replaced``: portable node name -> (original node, nodes replacing it). Returns the fused
    ModelProto (edited in place). QuantizationError when a fused node would read a weight the portable graph no
    longer holds as it was (a quantized or converted weight read by a node that was not replaced)."""
    from onnx import helper

    by_input: Dict[tuple, Any] = {}
    for node in fused.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            by_input[("MatMul", node.input[1])] = node
        elif node.op_type == "Gather" and node.input:
            by_input[("Gather", node.input[0])] = node
    swaps: Dict[str, list] = {}
    converted = set()
    for name, (orig, new_nodes) in replaced.items():
        weight_at = 1 if orig.op_type == "MatMul" else 0
        target = by_input.get((orig.op_type, orig.input[weight_at]))
        if target is None:
            raise QuantizationError(f"the fused graph has no {orig.op_type} of {orig.input[weight_at]!r}; re-export "
                                    "the bundle")
        converted.add(orig.input[weight_at])
        data_at = 1 - weight_at
        rename = {orig.input[data_at]: target.input[data_at], orig.output[0]: target.output[0]}
        made = {o for n in new_nodes for o in n.output if o}
        for n in new_nodes:
            for o in n.output:
                if o and o not in rename:
                    rename[o] = f"{target.name}/{o}"
        out = []
        for n in new_nodes:
            copy = type(n)()
            copy.CopyFrom(n)
            copy.name = target.name + (n.name[len(orig.name):] if n.name.startswith(orig.name) else "/" + n.name)
            for k, t in enumerate(copy.input):
                if t in rename and (t in made or t == orig.input[data_at]):
                    copy.input[k] = rename[t]
            for k, t in enumerate(copy.output):
                if t:
                    copy.output[k] = rename[t]
            out.append(copy)
        swaps[target.name] = out
    nodes = []
    for node in fused.graph.node:
        nodes.extend(swaps.get(node.name, [node]))
    readers: Dict[str, int] = {}
    for node in nodes:
        for t in node.input:
            readers[t] = readers.get(t, 0) + 1
    kept_readers = {t for node in fused.graph.node if node.name not in swaps for t in node.input}
    shared = sorted(t for t in converted if t in kept_readers)
    if shared:  # e.g. an fp16 embedding table that the fused graph also reads as the (tied) LM head
        raise QuantizationError(f"the fused graph reads {shared[0]!r} outside the layer the portable graph "
                                "converted; export with --embedding fp32 or --keep-float for it")
    del fused.graph.node[:]
    fused.graph.node.extend(nodes)
    headers = {i.name: i for i in written.graph.initializer}
    own = [i for i in fused.graph.initializer if i.name not in portable_names]
    del fused.graph.initializer[:]
    fused.graph.initializer.extend(own)
    have = {i.name for i in own} | computed_names(nodes, fused)
    for name in sorted(t for t in readers if t not in have):
        if name not in headers:
            raise QuantizationError(f"the fused graph reads {name!r}, which the {precision} portable graph does not "
                                    "hold")
        fused.graph.initializer.append(headers[name])
    domains = {op.domain for op in fused.opset_import}
    for op in written.opset_import:
        if op.domain not in domains:
            fused.opset_import.append(helper.make_opsetid(op.domain, op.version))
    if precision == "int4":
        fold_bias_into_matmulnbits(fused)
    return fused


def computed_names(nodes, proto) -> set:
    """Tensor names the graph computes or takes as inputs (everything a node may read that is no initializer)."""
    names = {o for n in nodes for o in n.output if o}
    names.update(v.name for v in proto.graph.input)
    names.add("")
    return names


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


def rewire_fused(src_dir: str, src_manifest: Manifest, portable_names, out_dir: str, replaced,
                 precision: str) -> Dict[str, Any]:
    """The streaming quantize's fused graph: the source bundle's fused graph (loaded without weights) rewired onto
    the portable graph just written to ``out_dir`` (:func:`rewire_onto_portable`; ``portable_names``: the source
    portable graph's initializers). Returns the manifest's ``graphs["fused"]`` entry with its files under "files"."""
    import onnx

    from calibration.graph_io import contrib_ops

    src = load_graph(os.path.join(src_dir, src_manifest.graph_file(GRAPH_FUSED)), with_weights=False)
    written = onnx.load(os.path.join(out_dir, MODEL_FILE), load_external_data=False)
    proto = rewire_onto_portable(src, portable_names, written, replaced, precision)
    del written
    onnx.save_model(proto, os.path.join(out_dir, FUSED_MODEL_FILE))
    record = dict(src_manifest.graphs[GRAPH_FUSED])
    record.update(file=FUSED_MODEL_FILE, contrib_ops=contrib_ops(proto),
                  weights="shared with the portable graph (its quantized tensors)")
    del proto
    record["files"] = [FUSED_MODEL_FILE] + write_genai_files(out_dir, src_manifest.spec, FUSED_MODEL_FILE)
    return record
