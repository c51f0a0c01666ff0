"""Tracing our PyTorch model without its weights, for the streaming writer (``calibration.stream_write``).

Where it stands: the first step of ``glm-export onnx`` (exporter.stream_export). The model's parameters are
zero-stride views of a single zero (an ``expand`` of a 0-d tensor: the right shapes and dtype, no memory), so the
graph is traced without the weights; the traced parameters become *placeholder* initializers (name, dtype, dims, no
data), the same form as an fp32 bundle's graph loaded without its external data, so every converter works on that
one form.
"""
from __future__ import annotations

import contextlib

from calibration.stream_write import placeholder


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


@contextlib.contextmanager
def shape_inference_without_parameter_values():
    """TorchScript's ONNX export runs its shape inference pass (``torch._C._jit_pass_onnx_graph_shape_type_inference``)
    with the parameters' values, and that pass materializes every parameter (our zero-stride phantoms included) as a
    dense tensor at once: the trace then peaks at the fp32 weight bytes (1.15 GB on the 288 M model, measured). The
    parameters are graph inputs with complete static types, and no shape in our graph depends on a weight's values,
    so the pass is given no values here; the traced graph is byte for byte the same
    (tests/exporter/test_stream_export.py checks it)."""
    import torch

    original = torch._C._jit_pass_onnx_graph_shape_type_inference

    def without_values(graph, params_dict, opset):
        return original(graph, {}, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = without_values
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def trace_weightless(spec, dtype, out_dir: str, opset: int, parameter_values: bool = False):
    """The traced graph with every parameter as a placeholder initializer (see module doc); writes nothing that
    stays (``out_dir/model.onnx`` is rewritten by ``write_streamed``). ``parameter_values``: run the exporter's
    shape inference with the (phantom) parameter values as torch does by default (for the equality test)."""
    from runtime import graph_contract as gc

    from exporter.onnx_export import trace_to_onnx

    with contextlib.nullcontext() if parameter_values else shape_inference_without_parameter_values():
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
