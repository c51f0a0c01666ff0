"""Quantized fused graphs on the trained tiny ChatGLM: the same layers quantized the same way as the portable graph,
measured on their own against the fp32 bundle, within the same accuracy bounds (runtime/tolerances.py)."""
from __future__ import annotations

import collections
import os

import onnx
import pytest

from calibration.accuracy import AccuracyReport, check_bounds
from runtime import GenerationConfig, GlmModel
from runtime.manifest import FUSED_MODEL_FILE, GRAPH_FUSED
from runtime.tolerances import ACCURACY_BOUNDS

CASES = {
    "int8": dict(precision="int8"),
    "int8-dynamic": dict(precision="int8-dynamic"),
    "int4": dict(precision="int4"),  # the default form: symmetric, block 128
    "int4-asym": dict(precision="int4", int4_symmetric=False, block_size=32),
}
# the op that carries each precision's linear layers in the fused graph
LINEAR_OP = {"int8": "QuantizeLinear", "int8-dynamic": "MatMulInteger", "int4": "MatMulNBits",
             "int4-asym": "MatMulNBits"}


@pytest.mark.parametrize("name", list(CASES))
def test_quantized_fused_graph_within_bounds(trained, name):
    result = trained.quantized(name, **CASES[name])
    manifest = result.manifest
    assert manifest.graphs[GRAPH_FUSED]["file"] == FUSED_MODEL_FILE
    fused = manifest.extra["accuracy_fused"]
    portable = manifest.extra["accuracy"]
    print(f"\n[{name}] fused top-1 {fused['top1_agreement']:.4f} ppl x{fused['ppl_ratio']:.4f}; "
          f"portable top-1 {portable['top1_agreement']:.4f} ppl x{portable['ppl_ratio']:.4f}")
    precision = CASES[name]["precision"]
    r = AccuracyReport(**{k: fused[k] for k in AccuracyReport.__dataclass_fields__})
    assert check_bounds(precision, r, ACCURACY_BOUNDS) == []
    # the same quantization as the portable graph: the figures agree closely
    assert abs(fused["top1_agreement"] - portable["top1_agreement"]) <= 0.005
    ops = collections.Counter(n.op_type for n in onnx.load(os.path.join(result.bundle_dir, FUSED_MODEL_FILE),
                                                           load_external_data=False).graph.node)
    assert ops["GroupQueryAttention"] == manifest.spec.num_layers
    assert ops[LINEAR_OP[name]] >= len(manifest.extra["quantization"]["quantized_linears"])
    if name.startswith("int4"):
        nbits = [n for n in onnx.load(os.path.join(result.bundle_dir, FUSED_MODEL_FILE)).graph.node
                 if n.op_type == "MatMulNBits"]
        zero_points = [len(n.input) >= 4 and bool(n.input[3]) for n in nbits]
        blocks = {dict((a.name, a.i) for a in n.attribute)["block_size"] for n in nbits}
        if name == "int4":  # the default: symmetric blocks of 128
            assert not any(zero_points) and blocks == {128}
        else:
            assert all(zero_points) and blocks == {32}


def test_quantized_fused_greedy_equals_portable(trained):
    result = trained.quantized("int4", **CASES["int4"])
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    out = {}
    for graph in ("fused", "portable"):
        with GlmModel.load(result.bundle_dir, graph=graph, threads=1) as model:
            out[graph] = [r.generated_ids for r in model.generate(prompts, GenerationConfig(max_new_tokens=16))]
    assert out["fused"] == out["portable"]
