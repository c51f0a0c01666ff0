"""Which graph flavours an export writes: the one place that decides whether the fused onnxruntime graph
(exporter/fused_graph.py) can express a model, and why not when it cannot.

The fused builder knows only the ChatGLM2+ block (RMSNorm, SwiGLU, grouped QKV, interleaved rotary on sequential
positions, causal attention) over float weights; a bundle precision takes it where ``runtime.manifest.PRECISION_TABLE``
says ``fused_graph`` (fp32, and int8 / int8-dynamic / int4 with the portable graph's quantized linear layers: the
streamed export's direct precisions, and ``glm-export quantize`` of a bundle that has one; not fp16). Anything else gets the portable graph alone, and the reason is
recorded in the manifest (``graphs_decided``), so the runtime (which finds no fused graph) uses the Concat path.
"""

from __future__ import annotations

from typing import Optional

from runtime.manifest import PRECISION_TABLE
from runtime.spec import (
    ACT_SWIGLU,
    ATTENTION_CAUSAL,
    NORM_RMS,
    POSITIONS_SEQUENTIAL,
    QKV_GROUPED,
    RESIDUAL_INPUT,
    ROTARY_INTERLEAVED,
    ModelSpec,
)


def fused_graph_refusal(spec: ModelSpec, precision: str, kept_quantization: bool) -> Optional[str]:
    """None when the fused graph can express this model; else the reason it cannot (one phrase). ``precision``: the
    bundle's precision; ``kept_quantization``: a THUDM checkpoint's integers kept in the graph."""
    if not PRECISION_TABLE[precision].fused_graph:
        takes = ", ".join(p for p, facts in PRECISION_TABLE.items() if facts.fused_graph)
        return (f"precision {precision} (the fused graph is written for {takes} bundles; onnxruntime's x86 CPU "
                "kernels upcast fp16 MatMuls, and the fp16 target is TensorRT, which runs the portable graph)")
    if kept_quantization:
        return "kept THUDM checkpoint quantization (the fused builder fuses float weights only)"
    if spec.prefix_len:
        return f"P-tuning v2 prefix of {spec.prefix_len} positions (GroupQueryAttention has no fixed-prefix input)"
    variants = (("position_kind", POSITIONS_SEQUENTIAL), ("attention_kind", ATTENTION_CAUSAL),
                ("rotary_kind", ROTARY_INTERLEAVED), ("norm_kind", NORM_RMS), ("activation", ACT_SWIGLU),
                ("residual", RESIDUAL_INPUT), ("qkv_layout", QKV_GROUPED))
    odd = [f"{name} {getattr(spec, name)}" for name, want in variants if getattr(spec, name) != want]
    if spec.linear_bias:
        odd.append("linear_bias")
    if spec.query_key_layer_scaling:
        odd.append("query_key_layer_scaling")
    if odd:
        return f"{spec.generation} block ({', '.join(odd)}) is not the one the fused builder writes"
    return None
