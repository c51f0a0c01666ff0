"""The streaming writer: a weightless graph plus one weight at a time -> ``model.onnx`` + ``model.onnx.data``.

Where it stands: the core of ``glm-export onnx`` (every precision) and of ``glm-export quantize``. The graph comes
with *placeholder* initializers (name, dtype, dims, no data: what ``onnx.load(..., load_external_data=False)``
gives for an fp32 bundle, and what ``exporter.stream_weights.trace_weightless`` makes of a traced model).
``write_streamed`` asks ``read`` for each placeholder's array in graph order (a memory-mapped read of the checkpoint
or of the source bundle: ``exporter.stream_source.CheckpointReader`` / ``BundleReader`` below), hands it to the
converter (``calibration.stream_quant``: as is, fp16, or a quantized linear layer with the nodes replacing its
MatMul), appends every resulting tensor to ``model.onnx.data`` (64-byte aligned, like
``exporter.onnx_export.attach_external_weights``) and drops it before the next read. Peak memory: the working set of
the largest tensor, not the model. Graphs whose weights end up at most ``runtime.manifest.INLINE_LIMIT`` are folded
into one file, as before.

numpy + onnx only (no torch): ``glm-export quantize`` never imports torch on this path.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from runtime.errors import BundleError
from runtime.manifest import DATA_FILE, INLINE_LIMIT, MODEL_FILE
from runtime.progress import NullProgress

log = logging.getLogger("glm_export")
ALIGN = 64  # bytes; each tensor starts aligned for memory-mapped readers
READ_BLOCK_BYTES = 32 * 1024**2  # BundleReader maps and copies this much of a tensor at a time
_GRAPHS_WITH_FUSED = 3  # graph files over one bundle's weights when it has a fused graph: portable, fused, genai's


def placeholder(name: str, data_type: int, dims: List[int]):
    """An initializer header without data (what ``onnx.load(..., load_external_data=False)`` gives)."""
    from onnx import TensorProto

    init = TensorProto(name=name, dims=list(dims), data_type=data_type)
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value=DATA_FILE)
    return init


class ExternalDataWriter:
    """Appends arrays to one external data file and returns their initializers."""

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper

        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape (1,))
            array = array.copy(order="C")
        pad = (-self.offset) % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(memoryview(array).cast("B") if array.size else b"")
        init = TensorProto(name=name, dims=list(array.shape),
                           data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        init.data_location = TensorProto.EXTERNAL
        for k, v in (("location", DATA_FILE), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            init.external_data.add(key=k, value=v)
        self.offset += array.nbytes
        return init

    def close(self) -> None:
        self.file.close()


def tensor_bytes(init) -> int:
    from onnx import helper

    n = 1
    for d in init.dims:
        n *= d
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def write_streamed(proto, out_dir: str, read: Callable[[str, object], np.ndarray], converter,
                   progress=None, desc: str = "writing weights",
                   replaced: Optional[Dict[str, Tuple[object, list]]] = None, fused: bool = False) -> Dict[str, float]:
    """Convert every placeholder initializer of ``proto`` and write the graph to ``out_dir``; see module doc.

    ``read(name, dtype)`` returns the float weight ``name`` (graph orientation); ``converter`` is a
    ``calibration.stream_quant`` converter. ``replaced``, when given, is filled with node name -> (the original
    node, the nodes that replaced it): what the fused graph (calibration.fused.rewire_onto_portable) needs to reuse
    the quantized tensors written here. ``fused``: the bundle will also hold the fused graph over these weights (see
    :func:`inline_if_small`). Returns {"seconds", "bytes_in", "bytes_out"}.
    """
    import onnx

    progress = progress or NullProgress()
    converter.prepare(proto)
    headers = list(proto.graph.initializer)
    del proto.graph.initializer[:]
    nodes = {n.name: n for n in proto.graph.node}
    replacements: Dict[str, list] = {}
    writer = ExternalDataWriter(os.path.join(out_dir, DATA_FILE))
    start, bytes_in = time.perf_counter(), 0
    sizes = [tensor_bytes(h) for h in headers]
    try:
        for header in progress_bytes(progress, headers, sizes, desc):
            array = read(header.name, converter.read_dtype(header))
            bytes_in += array.nbytes
            piece = converter.convert(header, array)
            del array
            for name, out in piece.tensors:
                proto.graph.initializer.append(writer.add(name, out))
            if piece.replace is not None:
                replacements[piece.replace[0]] = piece.replace[1]
            del piece
    finally:
        writer.close()
    if replacements:
        new_nodes = []
        for node in proto.graph.node:
            new_nodes.extend(replacements.get(node.name, [node]))
        missing = set(replacements) - set(nodes)
        if missing:
            raise RuntimeError(f"converter replaced unknown nodes {sorted(missing)[:3]}")
        if replaced is not None:
            for name, new in replacements.items():
                original = type(nodes[name])()
                original.CopyFrom(nodes[name])
                replaced[name] = (original, list(new))
        del proto.graph.node[:]
        proto.graph.node.extend(new_nodes)
    converter.finish(proto)
    graph_path = os.path.join(out_dir, MODEL_FILE)
    onnx.save_model(proto, graph_path)
    bytes_out = writer.offset
    inline_if_small(out_dir, fused)
    return {"seconds": time.perf_counter() - start, "bytes_in": bytes_in, "bytes_out": bytes_out}


def inline_if_small(out_dir: str, fused: bool = False) -> None:
    """Fold model.onnx.data back into model.onnx when the weights are small (runtime.manifest.INLINE_LIMIT, well
    under protobuf's 2 GB); here rather than in the exporter so quantize needs no torch. The exporter calls it too.
    ``fused``: the fused graph and its onnxruntime-genai twin will use these weights too. Inline weights cannot be
    shared, so each graph file would carry its own copy: the data file is folded only while all those copies
    together stay under the limit (a 250 MB INT4
    bundle keeps one shared data file instead of becoming three 250 MB graphs; a tiny bundle stays one file each)."""
    import onnx

    from calibration.graph_io import clear_external_data_locations

    data_path = os.path.join(out_dir, DATA_FILE)
    graphs = _GRAPHS_WITH_FUSED if fused else 1
    if os.path.getsize(data_path) * graphs > INLINE_LIMIT:
        return
    graph_path = os.path.join(out_dir, MODEL_FILE)
    proto = onnx.load(graph_path, load_external_data=True)
    clear_external_data_locations(proto)
    onnx.save_model(proto, graph_path)
    del proto
    os.remove(data_path)


def progress_bytes(progress, items, sizes, desc: str):
    """Iterate ``items`` reporting bytes done and an ETA: through ``progress.iterate_bytes`` where the progress
    object has it (runtime.progress), else its plain ``iterate``."""
    fn = getattr(progress, "iterate_bytes", None)
    if fn is not None:
        return fn(items, sizes, desc)
    return progress.iterate(items, total=len(items), desc=desc)


def read_only_once(read: Callable[[str, object], np.ndarray]) -> Callable[[str, object], np.ndarray]:
    """``read`` that refuses a second read of one name (the writer's contract: each weight read once)."""
    seen = set()

    def once(name: str, dtype) -> np.ndarray:
        if name in seen:
            raise RuntimeError(f"weight {name} read twice")
        seen.add(name)
        return read(name, dtype)

    return once


class BundleReader:
    """Weights of a float bundle's graph (external data file, or inline), one initializer per call; each read maps
    only that tensor's bytes and unmaps them once copied (a mapping's touched pages count as resident memory)."""

    def __init__(self, model_path: str):
        import onnx

        self.model_path = model_path
        self.dir = os.path.dirname(os.path.abspath(model_path))
        self.proto = onnx.load(model_path, load_external_data=False)
        self.inits = {i.name: i for i in self.proto.graph.initializer}
        self.data_path = os.path.join(self.dir, DATA_FILE)

    def graph_array(self, name: str, dtype=None) -> np.ndarray:
        from onnx import TensorProto, helper, numpy_helper

        init = self.inits[name]
        if init.data_location != TensorProto.EXTERNAL:
            array = numpy_helper.to_array(init)
        else:
            info = {e.key: e.value for e in init.external_data}
            if info.get("location") != DATA_FILE:
                raise BundleError(f"{self.model_path}: initializer {name} points at {info.get('location')!r}, "
                                  f"expected {DATA_FILE}")
            np_dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            count = int(np.prod(init.dims)) if len(init.dims) else 1
            offset = int(info.get("offset", 0))
            if offset + count * np.dtype(np_dtype).itemsize > os.path.getsize(self.data_path):
                raise BundleError(f"{self.data_path}: too short for initializer {name}; the bundle is truncated")
            array = np.empty(tuple(init.dims), dtype=np_dtype)
            flat = array.reshape(-1)
            step = max(1, READ_BLOCK_BYTES // np.dtype(np_dtype).itemsize)
            for start in range(0, count, step):  # a block at a time: a mapping's touched pages stay resident until
                stop = min(count, start + step)  # it goes, so one whole-tensor mapping doubled the tensor's bytes
                view = np.memmap(self.data_path, dtype=np_dtype, mode="r",
                                 offset=offset + start * np.dtype(np_dtype).itemsize, shape=(stop - start,))
                flat[start:stop] = view
                del view
        if dtype is not None and array.dtype != np.dtype(dtype):
            array = array.astype(dtype)
        return array
