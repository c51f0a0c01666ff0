"""The one tolerance table: how far a path may drift from its reference, per comparison and precision.

An entry is (atol, rtol): a max absolute difference is accepted when it is <= atol + rtol * max|reference|.
Export verification and the tests read these numbers; nothing else defines a tolerance.
"""
from __future__ import annotations

from typing import Dict, Tuple

TOLERANCES: Dict[str, Dict[str, Tuple[float, float]]] = {
    # our ONNX graph run by onnxruntime vs our PyTorch model, same weights, same precision. The relative part
    # covers fp32 accumulation-order noise on large logits (a 6B model's logits reach ~30).
    "onnx_vs_torch": {"fp32": (1e-4, 1e-5), "fp16": (2e-2, 1e-2)},
    # our ONNX graph vs transformers' GlmForCausalLM / Glm4ForCausalLM on the tiny test models: strict absolute
    "onnx_vs_transformers": {"fp32": (1e-4, 0.0)},
    # our ChatGLM-6B (v1) graph vs the independent numpy reference (tests/reference_chatglm1.py): strict absolute
    "onnx_vs_numpy_v1": {"fp32": (1e-4, 0.0)},
    # a TensorRT engine vs onnxruntime on the same bundle (TF32 off for fp32; fp16 engines drift like fp16 graphs)
    "tensorrt_vs_onnx": {"fp32": (1e-3, 1e-4), "fp16": (5e-2, 1e-2)},
    # the same weights in the THUDM and the transformers-native layout, both exported
    "layout_vs_layout": {"fp32": (1e-5, 0.0)},
    # our ONNX graph vs the plain-numpy float64 THUDM reference of tests/thudm_reference.py (P-tuning v2 prefix)
    "onnx_vs_numpy_reference": {"fp32": (1e-4, 0.0)},
    # one row of a left-padded batch (the server's joined rows) vs the same sequence run alone, same graph
    "batch_vs_solo": {"fp32": (1e-4, 1e-5)},
    # a quantized bundle written straight from a checkpoint (exporter.stream_export) vs the layer-streaming float
    # reference: quantization noise, relative to the logits' scale. Loose enough for the tiny random test models,
    # tight enough to catch a wrong or corrupted layer (tests/exporter/test_stream_export.py)
    "stream_quantized_vs_float": {"int8": (0.0, 0.3), "int8-dynamic": (0.0, 0.3), "int4": (0.0, 0.4)},
    # each quantized linear layer of such a bundle, dequantized, vs the checkpoint's weight: relative RMS error
    # (uniform rounding: about 0.5 / 127 x amax/rms per channel for int8, 0.5 / 15 x range/rms per block for int4)
    "stream_weight_rel_rms": {"int8": (0.02, 0.0), "int8-dynamic": (0.02, 0.0), "int4": (0.15, 0.0)},
    # the fused graph with an int8 KV cache (calibration/kv_cache.py) vs the same bundle with a float32 cache, on the
    # tiny random test models (tests/calibration/test_kv_cache_int8.py): cache rounding noise, relative to the logits
    "int8_kv_vs_float_kv": {"int4": (0.0, 0.05)},
}


def tolerance(comparison: str, precision: str) -> Tuple[float, float]:
    """(atol, rtol) for a comparison at a precision."""
    try:
        return TOLERANCES[comparison][precision]
    except KeyError:
        raise KeyError(f"no tolerance for {comparison!r} at {precision!r}; add it to runtime/tolerances.py") from None


def allowed_diff(comparison: str, precision: str, reference_scale: float = 0.0) -> float:
    """The max absolute difference accepted for a reference whose largest magnitude is ``reference_scale``."""
    atol, rtol = tolerance(comparison, precision)
    return atol + rtol * reference_scale


# What a reduced precision may cost against the fp32 bundle, on held-out text of the trained test model
# (tests/trained_fixture.py). `glm-export quantize` records the measured figures in every bundle's manifest.
ACCURACY_BOUNDS: Dict[str, Dict[str, float]] = {
    "fp16": {"min_top1": 0.995},
    "int8": {"min_top1": 0.97, "max_ppl_ratio": 1.03},
    "int8-dynamic": {"min_top1": 0.97, "max_ppl_ratio": 1.03},
    "int4": {"max_ppl_ratio": 1.10},
}

# What the fused graph's int8 KV cache (calibration/kv_cache.py) may cost on top of its precision, against the same
# bundle with a float32 cache, on the trained test model's held-out text
KV_CACHE_BOUNDS: Dict[str, Dict[str, float]] = {
    "int8": {"max_top1_drop": 0.01, "max_ppl_ratio_rise": 0.01, "min_greedy_agreement": 0.9},
}
