"""The fused onnxruntime graph: the portable graph's weights, rewired through onnxruntime's contrib operators.

Where it stands: ``exporter.onnx_export`` writes the portable graph (standard ONNX operators; TensorRT and any ONNX
consumer) and then calls :func:`write_fused_graph`, which writes ``model.fused.onnx`` beside it. The fused graph is
written node by node with ``onnx.helper`` (not traced): that is the simplest way to control exactly which kernels
run, and its initializers are *references* to the portable graph's tensors (the same ``model.onnx.data`` offsets), so
the bundle holds one copy of the weights and no weight is read while the graph is built.

Per decoder layer (12 nodes; 13-14 with a QKV bias or GLM-4-0414's sandwich norms)::

    qkv   = MatMul(norm1, qkv.weight_t) (+ bias)         packed [B, S, (heads + 2 kv_heads) * head_dim]
    attn  = GroupQueryAttention(qkv, past_k, past_v, seqlens_k, total, cos, sin, attention_bias, query_seqlens)
            rotary inside (interleaved pairs on the first rotary_dim dims of each head: ChatGLM's layout), KV appended
            in place into the shared max-length buffer (present.i.* is the same buffer as past_key_values.i.*)
    a     = MatMul(attn, attn_out.weight_t)              [post_self_attn norm: SimplifiedLayerNormalization]
    norm2, h = SkipSimplifiedLayerNormalization(a, h)    residual add + RMSNorm in one kernel
    g, u  = Split(MatMul(norm2, gate_up.weight_t))       fused gate/up projection
    m     = MatMul(g * Sigmoid(g) * u, down.weight_t)    [post_mlp norm]
    norm1', h = SkipSimplifiedLayerNormalization(m, h)   (the next layer's input norm, or the final norm)

Padding: every row of a batch occupies the same positions of the shared buffer (left padding, as the portable
graph), so ``seqlens_k`` is ``total - 1`` for every row and GroupQueryAttention's own causal mask is right; pad
positions are masked by ``attention_bias`` (0 for a real key, -FLT_MAX for a pad, from ``attention_mask``).
Rotary positions are buffer positions (GroupQueryAttention's own: the column of ``attention_mask``), not
``position_ids``: onnxruntime 1.32's CPU kernel reads only the first element of ``position_ids`` in a prompt (so a
left-padded row would be rotated by positions shifted by its padding in the prompt and unshifted in later steps,
measured: logits off by 2-6). With buffer positions every query and key of a row is shifted by the same padding,
and rotary attention depends only on position differences, so the logits are those of the portable graph
(measured: within 1e-5). ``position_ids`` stays an input (the contract; onnxruntime-genai and optimum feed it) and
is unused. ``tests/exporter/test_fused_graph.py`` checks this against transformers for every case, batch 2
left-padded, prefill and cached steps.

Logits: ``logits_to_keep`` (int64 [1]; 0 = every position, as the accuracy evaluation needs) keeps only the last k
positions; the runtime passes 1 (prefill then computes one row of logits instead of one per prompt token).
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import numpy as np

from runtime import graph_contract as gc
from runtime.manifest import DATA_FILE, FUSED_MODEL_FILE, MODEL_FILE
from runtime.spec import ModelSpec

MS_DOMAIN = "com.microsoft"
OPSET = 17
LOGITS_TO_KEEP = gc.LOGITS_TO_KEEP
_NEG = -float(np.finfo(np.float32).max)  # attention_bias of a pad key (softmax of an all-pad row stays finite)


def rotary_rows(spec: ModelSpec) -> int:
    """Rows of the rotary tables: twice the context. GroupQueryAttention rotates by buffer position, and a
    left-padded row's buffer position is its own position plus its padding (less than one context more)."""
    return 2 * spec.max_position_embeddings


def rotary_tables(spec: ModelSpec):
    """cos, sin caches [rotary_rows, rotary_dim / 2] float32: row p holds cos/sin((p / position scale) * inv_freq),
    with inv_freq = 1 / theta^(2i / rotary_dim) (theta already multiplied for base scaling). Computed in float64 and
    rounded once."""
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, spec.rotary_dim, 2, dtype=np.float64) / spec.rotary_dim))
    pos = np.arange(rotary_rows(spec), dtype=np.float64) / spec.rope_position_scale
    freqs = np.outer(pos, inv)  # (P, R/2)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class _Graph:
    """A small node writer: unique names, constants as initializers."""

    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes: List = []
        self.inits: List = []
        self._n = 0

    def node(self, op, inputs, n_out=1, domain="", name=None, outputs=None, **attrs):
        self._n += 1
        name = name or f"{op}_{self._n}"
        outs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(self.h.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name, array):
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name


def fused_graph(spec: ModelSpec, weights: Dict[str, object], kv_dtype: str = "float32",
                logits_to_keep_input: bool = True):
    """The fused ModelProto over ``weights`` (portable initializer name -> TensorProto, inline or external).

    ``logits_to_keep_input``: a required int64 [1] input (0 = every position); False fixes it at 0 (every position)
    for consumers that feed only the standard inputs (onnxruntime-genai). It is not an initializer-with-default
    input because onnxruntime cannot I/O-bind those."""
    from onnx import TensorProto, helper

    if kv_dtype != "float32":
        raise ValueError("the fused graph is built for float32 activations and cache")
    g = _Graph()
    s = spec
    nh, nkv, d = s.num_heads, s.num_kv_heads, s.head_dim
    if s.rotary_dim > d or s.rotary_dim % 2:
        raise ValueError(f"rotary_dim {s.rotary_dim} does not fit head_dim {d}")
    cos, sin = rotary_tables(spec)
    g.const("rotary.cos_cache", cos)  # (P, R/2)
    g.const("rotary.sin_cache", sin)
    zero_f = g.const("const.zero_f", np.array(0.0, np.float32))
    neg_f = g.const("const.neg_max", np.array(_NEG, np.float32))
    axes12 = g.const("const.axes12", np.array([1, 2], np.int64))
    idx0 = g.const("const.idx0", np.array([0], np.int64))
    idx1 = g.const("const.idx1", np.array([1], np.int64))
    at1 = g.const("const.at1", np.array(1, np.int64))  # a scalar index: Gather then yields a scalar
    int_max = g.const("const.int64_max", np.array([np.iinfo(np.int64).max], np.int64))

    # ---- shared per-step tensors: lengths, padding bias
    ids_shape = g.node("Shape", [gc.INPUT_IDS], name="shape_ids")  # [B, S]
    mask_shape = g.node("Shape", [gc.ATTENTION_MASK], name="shape_mask")  # [B, T]
    batch = g.node("Gather", [ids_shape, idx0], name="batch", axis=0)  # [1]
    seq = g.node("Gather", [ids_shape, idx1], name="seq", axis=0)  # [1]
    total = g.node("Gather", [mask_shape, at1], name="total", axis=0)  # scalar = past + S
    total_i32 = g.node("Cast", [total], name="total_i32",
                       to=TensorProto.INT32)  # scalar: an upper bound of every row's length (query_seqlens given)
    # seqlens_k: every row's cache length - 1 = total - 1 (left padding: all rows span the same buffer positions;
    # onnxruntime-genai's shared-buffer mode passes masks of the current length too, tested)
    one_i = g.const("const.one_i32", np.array(1, np.int32))
    seqlens_k = g.node("Expand", [g.node("Sub", [total_i32, one_i], name="total_minus_1"), batch],
                       name="seqlens_k")  # [B] int32
    # every row's chunk is whole (no right padding); given so that a batched multi-token chunk after a past (chunked
    # prefill) is accepted, which GroupQueryAttention refuses without it
    seq_i32 = g.node("Cast", [seq], name="seq_i32", to=TensorProto.INT32)  # [1]
    query_seqlens = g.node("Expand", [seq_i32, batch], name="query_seqlens")  # [B] int32
    real = g.node("Cast", [gc.ATTENTION_MASK], name="mask_bool", to=TensorProto.BOOL)  # (B, T)
    bias2 = g.node("Where", [real, zero_f, neg_f], name="pad_bias")  # (B, T): 0 for a real key, -max for a pad
    bias4 = g.node("Unsqueeze", [bias2, axes12], name="pad_bias_4d")  # (B, 1, 1, T)
    bias_shape = g.node("Concat", [idx1, idx1, seq, idx1], name="bias_shape", axis=0)  # [1, 1, S, 1]: Expand
    attn_bias = g.node("Expand", [bias4, bias_shape], name="attention_bias")  # broadcasts to (B, 1, S, T)

    def w(name):
        if name not in weights:
            raise KeyError(f"the portable graph has no initializer {name!r}")
        return name

    def rms(x, gamma, tag):
        return g.node("SimplifiedLayerNormalization", [x, w(gamma)], name=tag, axis=-1, epsilon=s.norm_eps,
                      stash_type=1)

    def skip_rms(x, skip, gamma, tag):
        """-> (RMSNorm(x + skip) * gamma, x + skip)"""
        outs = g.node("SkipSimplifiedLayerNormalization", [x, skip, w(gamma)], name=tag, domain=MS_DOMAIN,
                      outputs=[f"{tag}/norm", "", "", f"{tag}/sum"], epsilon=s.norm_eps)
        return outs[0], outs[3]

    x = g.node("Gather", [w("embed.weight"), gc.INPUT_IDS], name="embed", axis=0)  # (B, S, H)
    resid = x
    normed = rms(x, "layers.0.input_norm.weight", "layers.0/input_norm")
    for i in range(s.num_layers):
        p = f"layers.{i}"
        qkv = g.node("MatMul", [normed, w(f"{p}.qkv.weight_t")], name=f"{p}/qkv/MatMul")  # (B, S, (nh+2kv) D)
        if s.qkv_bias:
            qkv = g.node("Add", [qkv, w(f"{p}.qkv.bias")], name=f"{p}/qkv/Add")
        attn = g.node(
            "GroupQueryAttention",
            [qkv, "", "", gc.past_key_name(i), gc.past_value_name(i), seqlens_k, total_i32,
             "rotary.cos_cache", "rotary.sin_cache", "", attn_bias, "", "", "", "", "", query_seqlens],
            name=f"{p}/attention", domain=MS_DOMAIN,
            outputs=[f"{p}/attention/out", gc.present_key_name(i), gc.present_value_name(i)],
            num_heads=nh, kv_num_heads=nkv, scale=1.0 / math.sqrt(d), do_rotary=1, rotary_interleaved=1,
        )[0]  # (B, S, nh D)
        a = g.node("MatMul", [attn, w(f"{p}.attn_out.weight_t")], name=f"{p}/attn_out/MatMul")  # (B, S, H)
        if s.sandwich_norms:
            a = rms(a, f"{p}.post_self_attn_norm.weight", f"{p}/post_self_attn_norm")
        normed, resid = skip_rms(a, resid, f"{p}.post_attn_norm.weight", f"{p}/post_attn_norm")
        gu = g.node("MatMul", [normed, w(f"{p}.gate_up.weight_t")], name=f"{p}/gate_up/MatMul")  # (B, S, 2F)
        gate, up = g.node("Split", [gu], n_out=2, name=f"{p}/gate_up/Split", axis=-1)  # (B, S, F) each
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/silu")
        m = g.node("MatMul", [g.node("Mul", [silu, up], name=f"{p}/mlp/gated"), w(f"{p}.down.weight_t")],
                   name=f"{p}/down/MatMul")  # (B, S, H)
        if s.sandwich_norms:
            m = rms(m, f"{p}.post_mlp_norm.weight", f"{p}/post_mlp_norm")
        nxt = f"layers.{i + 1}.input_norm.weight" if i + 1 < s.num_layers else "final_norm.weight"
        normed, resid = skip_rms(m, resid, nxt, f"layers.{i + 1}/input_norm" if i + 1 < s.num_layers
                                 else "final_norm")
    # logits of the last logits_to_keep positions (0: all)
    start = g.node("Neg", [LOGITS_TO_KEEP], name="logits_start")
    kept = g.node("Slice", [normed, start, int_max, idx1], name="logits_positions")  # (B, k, H)
    if s.tie_word_embeddings:
        head = g.node("Transpose", [w("embed.weight")], name="lm_head_t", perm=[1, 0])
    else:
        head = w("lm_head.weight_t")
    g.node("MatMul", [kept, head], name="lm_head/MatMul", outputs=[gc.LOGITS])

    inputs = [helper.make_tensor_value_info(t.name, _onnx_dtype(t.dtype), list(t.shape))
              for t in gc.fused_graph_inputs(spec, kv_dtype) if logits_to_keep_input or t.name != LOGITS_TO_KEEP]
    if not logits_to_keep_input:
        g.const(LOGITS_TO_KEEP, np.array([0], np.int64))
    outputs = [helper.make_tensor_value_info(t.name, _onnx_dtype(t.dtype), list(t.shape))
               for t in gc.fused_graph_outputs(spec, kv_dtype)]
    used = {n for node in g.nodes for n in node.input}
    initializers = [weights[n] for n in weights if n in used] + g.inits
    graph = helper.make_graph(g.nodes, "glm_export_fused", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="glm-export")
    model.ir_version = 8
    return model


def _onnx_dtype(name: str) -> int:
    from onnx import TensorProto

    return {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[name]


def write_fused_graph(bundle_dir: str, spec: ModelSpec, portable_file: str = "model.onnx",
                      out_file: str = FUSED_MODEL_FILE, logits_to_keep_input: bool = True) -> str:
    """Write ``bundle_dir/out_file`` over the portable graph's weights. Weights stored in ``model.onnx.data`` are
    referenced (same file, same offsets: nothing is copied or read); weights inline in a small portable graph are
    copied inline. Returns the path written."""
    import onnx

    portable = onnx.load(os.path.join(bundle_dir, portable_file), load_external_data=False)
    for init in portable.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location" and kv.value != DATA_FILE:
                raise ValueError(f"{portable_file}: initializer {init.name} lives in {kv.value!r}, not {DATA_FILE}")
    weights = {init.name: init for init in portable.graph.initializer}
    model = fused_graph(spec, weights, logits_to_keep_input=logits_to_keep_input)
    path = os.path.join(bundle_dir, out_file)
    onnx.save_model(model, path)
    return path


def write_fused_streamed(bundle_dir: str, spec: ModelSpec, float_headers, replaced, precision: str) -> Dict:
    """``bundle_dir/model.fused.onnx`` over the portable graph ``calibration.stream_write.write_streamed`` has just
    written (any precision PRECISION_TABLE gives a fused graph): the float fused graph built over the portable
    graph's float initializer headers ``float_headers`` (no data), then rewired onto the written tensors, quantized
    layers included (``calibration.fused.rewire_onto_portable``; ``replaced`` as write_streamed filled it). Nothing
    is quantized again and no weight is read. Returns the manifest's ``graphs["fused"]`` entry."""
    import onnx

    from calibration.fused import rewire_onto_portable
    from calibration.graph_io import contrib_ops

    written = onnx.load(os.path.join(bundle_dir, MODEL_FILE), load_external_data=False)
    weights = {h.name: h for h in float_headers}
    model = rewire_onto_portable(fused_graph(spec, weights), set(weights), written, replaced, precision)
    del written
    onnx.save_model(model, os.path.join(bundle_dir, FUSED_MODEL_FILE))
    record = fused_graph_record()
    if replaced:
        record.update(contrib_ops=contrib_ops(model), weights="shared with the portable graph (its quantized tensors)")
    return record


def node_count(path: str, optimized: bool = True, threads: Optional[int] = 1) -> int:
    """Nodes of the graph at ``path`` as written, or after onnxruntime's full optimization (the kernels a step
    launches: the GPU kernel-count proxy)."""
    import tempfile

    import onnx

    if not optimized:
        return len(onnx.load(path, load_external_data=False).graph.node)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return len(onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)


def run_fused(path: str, spec: ModelSpec, plan, threads: Optional[int] = None):
    """``exporter.verify.run_onnx`` for the fused graph: the plan's steps through the runtime's fused backend (its
    portable-contract ``run``), presents fed back as pasts."""
    from runtime.backends.onnxruntime_fused import FusedOnnxRuntimeBackend
    from runtime.steps import empty_past, past_from_outputs

    from exporter.verify import step_feeds

    backend = FusedOnnxRuntimeBackend(path, spec, threads=threads)
    try:
        past = empty_past(spec, plan.input_ids.shape[0], np.float32)
        out = []
        for feed in step_feeds(plan):
            results = backend.run({**feed, **past})
            past = past_from_outputs(spec, results)
            out.append({gc.LOGITS: results[gc.LOGITS].astype(np.float32)})
        out[-1]["present"] = [past[name] for name in gc.past_names(spec.num_layers)]
        return out
    finally:
        backend.close()


def fused_graph_record(file: str = FUSED_MODEL_FILE) -> Dict[str, object]:
    """The manifest's ``graphs["fused"]`` entry."""
    from runtime.manifest import KV_SHARED_BUFFER

    return {"file": file, "kv_cache": KV_SHARED_BUFFER, "runs_on": ["onnxruntime"],
            "contrib_ops": ["GroupQueryAttention", "SkipSimplifiedLayerNormalization"],
            "inputs_added": [LOGITS_TO_KEEP], "weights": "shared with the portable graph"}
