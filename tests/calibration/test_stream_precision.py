"""Bundles written straight from the trained tiny ChatGLM's checkpoint (``glm-export onnx --precision ...``, the
streaming export of issue 15) hold the accuracy bounds of runtime/tolerances.py against its fp32 bundle, with both
of their graphs: the portable one and the fused onnxruntime graph rewired onto the same quantized tensors."""
from __future__ import annotations

import collections
import os

import onnx
import pytest

from calibration.accuracy import accuracy_bounds, check_bounds
from runtime.manifest import DATA_FILE, FUSED_MODEL_FILE, GRAPH_FUSED

BOUNDS = accuracy_bounds()
# the op that carries each precision's quantized linear layers
LINEAR_OP = {"int4": "MatMulNBits", "int8-dynamic": "MatMulInteger", "int8": "QuantizeLinear"}


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic", "int8"])
def test_direct_export_within_accuracy_bounds(trained, tmp_path, precision):
    from calibration.pipeline import evaluate_bundles
    from exporter.stream_export import StreamOptions, export_streamed

    out = str(tmp_path / precision)
    result = export_streamed(trained.checkpoint, out, precision,
                             options=StreamOptions(calib_data=trained.calib_file, calib_samples=64))
    manifest = result.manifest
    assert manifest.verification["weights"]["checked"] > 0
    report = evaluate_bundles(out, trained.bundle("fp32"), trained.eval_file, max_samples=200)
    print(f"\n[direct {precision}] {report.summary()} ppl_ratio={report.ppl_ratio:.5f}")
    assert check_bounds(precision, report, BOUNDS) == []
    assert os.path.isfile(os.path.join(out, "manifest.json"))

    # the fused graph: written, recorded, verified against the streamed reference like the portable graph
    assert manifest.graphs[GRAPH_FUSED]["file"] == FUSED_MODEL_FILE
    assert manifest.extra["graphs_decided"] == {"fused": "written"}
    assert FUSED_MODEL_FILE in manifest.files
    fused_diffs = {k: v for k, v in manifest.verification["max_abs_diff"].items() if k.startswith("fused.")}
    assert len(fused_diffs) == 4 and max(fused_diffs.values()) <= manifest.verification["allowed_max_abs_diff"]
    proto = onnx.load(os.path.join(out, FUSED_MODEL_FILE), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["GroupQueryAttention"] == manifest.spec.num_layers
    assert ops[LINEAR_OP[precision]] >= len(manifest.extra["quantization"]["quantized_linears"])
    q = manifest.extra["quantization"]
    # every fused linear layer the portable graph quantized is quantized here too (Q/DQ keeps a float MatMul)
    assert ops["MatMul"] == len(q["float_linears"]) + (len(q["quantized_linears"]) if precision == "int8" else 0)
    # its quantized weights are the portable graph's tensors (one copy), where the portable graph keeps them
    portable = {i.name: i for i in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
                .graph.initializer}
    quantized = [i for i in proto.graph.initializer if i.name not in ("rotary.cos_cache", "rotary.sin_cache")
                 and not i.name.startswith("const.")]
    assert quantized and all(i.name in portable for i in quantized)
    if os.path.exists(os.path.join(out, DATA_FILE)):
        assert all(i.SerializeToString() == portable[i.name].SerializeToString() for i in quantized)
    fused = evaluate_bundles(out, trained.bundle("fp32"), trained.eval_file, max_samples=200, graph=GRAPH_FUSED)
    print(f"[direct {precision}, fused graph] {fused.summary()} ppl_ratio={fused.ppl_ratio:.5f}")
    assert check_bounds(precision, fused, BOUNDS) == []
    assert abs(fused.top1_agreement - report.top1_agreement) <= 0.005
