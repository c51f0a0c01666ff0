"""The streaming writer: a weightless graph plus one weight at a time -> ``model.onnx`` + ``model.onnx.data``.

Where it stands: the core of ``glm-export onnx`` (every precision) and of ``glm-export quantize``. Two pieces:

* ``trace_weightless``: traces our PyTorch model whose parameters are zero-stride views of a single zero (an
  ``expand`` of a 0-d tensor: the right shapes and dtype, no memory), so the graph is traced without the weights.
  The traced parameters become *placeholder* initializers (name, dtype, dims, no data), the same form as an fp32
  bundle's graph loaded without its external data; every converter then works on that one form.
* ``write_streamed``: for each placeholder in graph order, asks ``read`` for its array (a memory-mapped read of the
  checkpoint or the source bundle), hands it to the converter (``calibration.stream_quant``: as is, fp16, or a
  quantized linear layer with the nodes that replace its MatMul), appends every resulting tensor to
  ``model.onnx.data`` (64-byte aligned, like ``exporter.onnx_export.attach_external_weights``) and drops it before
  the next read. Peak memory: the working set of the largest tensor, not the model.

Graphs whose weights end up at most ``runtime.manifest.INLINE_LIMIT`` are folded into one file, as before.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from runtime.manifest import DATA_FILE, INLINE_LIMIT, MODEL_FILE
from runtime.progress import NullProgress

log = logging.getLogger("glm_export")
ALIGN = 64  # bytes; each tensor starts aligned for memory-mapped readers


def phantom_model(spec, dtype):
    """GlmForExport whose parameters are zero-stride views of one zero: traceable, the right shapes, no memory.

    The matmuls of the trace make a transient contiguous copy of one weight at a time (the largest: the LM head).
    """
    import torch

    from exporter.model import GlmForExport, inv_frequencies

    with torch.device("meta"):
        model = GlmForExport(spec)
    zero = torch.zeros((), dtype=dtype)
    state = {name: zero.expand(tuple(p.shape)) for name, p in model.named_parameters()}
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = inv_frequencies(spec)
    return model.eval().requires_grad_(False)


def trace_weightless(spec, dtype, out_dir: str, opset: int):
    """The traced graph with every parameter as a placeholder initializer (see module doc); writes nothing that
    stays (``out_dir/model.onnx`` is rewritten by ``write_streamed``)."""
    from runtime import graph_contract as gc

    from exporter.onnx_export import trace_to_onnx

    proto = trace_to_onnx(phantom_model(spec, dtype), out_dir, opset, attach=False)
    contract = {t.name for t in gc.graph_inputs(spec)}
    keep, params = [], []
    for value in proto.graph.input:
        (keep if value.name in contract else params).append(value)
    for value in params:
        tt = value.type.tensor_type
        proto.graph.initializer.append(placeholder(value.name, tt.elem_type, [d.dim_value for d in tt.shape.dim]))
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    return proto


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
                   progress=None, desc: str = "writing weights") -> Dict[str, float]:
    """Convert every placeholder initializer of ``proto`` and write the graph to ``out_dir``; see module doc.

    ``read(name, dtype)`` returns the float weight ``name`` (graph orientation); ``converter`` is a
    ``calibration.stream_quant`` converter. Returns {"seconds", "bytes_in", "bytes_out"}.
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
        del proto.graph.node[:]
        proto.graph.node.extend(new_nodes)
    converter.finish(proto)
    graph_path = os.path.join(out_dir, MODEL_FILE)
    onnx.save_model(proto, graph_path)
    bytes_out = writer.offset
    _inline_if_small(out_dir)
    return {"seconds": time.perf_counter() - start, "bytes_in": bytes_in, "bytes_out": bytes_out}


def _inline_if_small(out_dir: str) -> None:
    """exporter.onnx_export.inline_if_small, without importing torch (quantize needs none)."""
    import onnx

    from calibration.graph_io import clear_external_data_locations

    data_path = os.path.join(out_dir, DATA_FILE)
    if os.path.getsize(data_path) > INLINE_LIMIT:
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


__all__ = ["trace_weightless", "write_streamed", "placeholder", "ExternalDataWriter", "phantom_model",
           "read_only_once", "Optional"]
