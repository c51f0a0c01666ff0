"""An int8 KV cache for the fused graph: calibrated per-channel scales, onnxruntime's quantized-cache attention.

Where it stands: ``glm-export quantize --kv-cache int8`` (``QuantizeOptions(kv_cache="int8")``) calls
:func:`write_int8_kv_cache` on the bundle being written, after its fused graph is in place and before the manifest's
checksums are taken. The portable graph (TensorRT, every ONNX consumer) and ``model.genai.onnx`` keep their float32
cache; only ``model.fused.onnx`` changes, and the manifest's ``graphs["fused"]["kv_cache_dtype"]`` says so (the
runtime allocates its shared buffers in that dtype: runtime/manifest.py ``Manifest.fused_kv_dtype``).

Why: at long contexts a decode step's attention reads the whole cache; onnxruntime's CPU GroupQueryAttention walks
it once per query head, so its cost grows with the bytes it holds. An int8 cache holds a quarter of them (a 32k
context of ChatGLM3-6B-32k: 3.8 GB float32, 0.94 GB int8) and measured faster at 2,048 positions (README).

The kernel's contract (tests/calibration/test_kv_cache_int8.py checks it against numpy, prefill and cached steps):
with ``kv_cache_bit_width=8`` and ``k_quant_type = v_quant_type = "PER_CHANNEL"``, ``k_scale``/``v_scale`` are float32
``[kv_heads, 1, head_dim]``; a new key is stored as ``clip(round(k / k_scale), -128, 127)`` (keys after rotary), and
attention reads every cached key and value, the new ones included, as ``int8 * scale``.

The scales are static, so they are calibrated: the fused graph (float cache) runs the calibration sequences and 1.5x
the largest magnitude each (layer, kv head, channel) takes becomes 127 (:func:`channel_bounds`, ``HEADROOM``). A
key's rotary channels are rotated in interleaved pairs (2i, 2i+1) by an angle that depends on the position, so a
pair's two channels get the largest *norm* of the pair: rotation keeps that norm, so the bound holds at every
position, not only at the calibrated ones. Values beyond 1.5x the calibrated range saturate at +-127 steps.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from runtime.graph_contract import past_key_name
from runtime.manifest import FUSED_MODEL_FILE, GRAPH_FUSED
from runtime.spec import ModelSpec

from calibration.errors import QuantizationError

log = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("float32", "int8")  # --kv-cache choices; float32 is the default (no change to the fused graph)
INT8_MAX = 127.0
# the calibrated bound maps to 127 / HEADROOM: values up to 1.5x the largest calibrated one are stored unclipped. With
# no headroom, tokens unlike the calibration text saturate: on the tiny random test models that doubled the logit
# error (0.78 against 0.34 at 1.5x; 0.43 at 2x, 0.53 at 4x as rounding steps grow), and on the trained fixture
# the accuracy is the same either way (README)
HEADROOM = 1.5
_MIN_BOUND = 1e-6  # a channel that is zero on every calibration token still gets a usable scale


def channel_bounds(keys: np.ndarray, values: np.ndarray, rotary_dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """The largest magnitude per (kv head, channel) of one layer's cached ``keys``/``values``
    [batch, kv_heads, positions, head_dim] (keys after rotary) -> (key bound, value bound), each [kv_heads, head_dim].
    Rotary channels of keys (the first ``rotary_dim``, interleaved pairs) take their pair's largest norm."""
    k = np.abs(keys.astype(np.float64))
    k_bound = k.max(axis=(0, 2))  # (kv_heads, head_dim)
    if rotary_dim:
        pairs = keys[..., :rotary_dim].astype(np.float64).reshape(keys.shape[:3] + (rotary_dim // 2, 2))
        norm = np.sqrt((pairs ** 2).sum(-1)).max(axis=(0, 2))  # (kv_heads, rotary_dim / 2)
        k_bound[:, :rotary_dim] = np.repeat(norm, 2, axis=-1)
    v_bound = np.abs(values.astype(np.float64)).max(axis=(0, 2))
    return k_bound, v_bound


def calibrate_bounds(backend, spec: ModelSpec, sequences: Sequence[Sequence[int]], progress) -> List[Tuple]:
    """Per layer (key bound, value bound) [kv_heads, head_dim] over ``sequences``, run one at a time through the
    float-cache fused ``backend`` (runtime.backends.onnxruntime_fused)."""
    bounds: List[Any] = [None] * spec.num_layers
    for seq in progress.iterate(sequences, total=len(sequences), desc="calibrating the KV cache"):
        ids = np.asarray([list(seq)], dtype=np.int64)  # (1, T)
        cache = backend.empty_cache(1, ids.shape[1])
        _, cache = backend.forward(ids, np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None, :], cache)
        arrays = backend.cache_to_numpy(cache)  # key, value of layer 0, then layer 1, ...
        for i in range(spec.num_layers):
            kb, vb = channel_bounds(arrays[2 * i], arrays[2 * i + 1], spec.rotary_dim)
            if bounds[i] is None:
                bounds[i] = (kb, vb)
            else:
                bounds[i] = (np.maximum(bounds[i][0], kb), np.maximum(bounds[i][1], vb))
    return bounds


def scales_of(bound: np.ndarray) -> np.ndarray:
    """[kv_heads, head_dim] bound -> the kernel's float32 scale [kv_heads, 1, head_dim] (HEADROOM x bound maps to
    127)."""
    return (np.maximum(bound, _MIN_BOUND) * HEADROOM / INT8_MAX).astype(np.float32)[:, None, :]


def int8_kv_graph(proto, scales: Sequence[Tuple[np.ndarray, np.ndarray]]) -> int:
    """Edit the fused ModelProto in place: past/present declared int8, each GroupQueryAttention given its layer's
    ``k_scale``/``v_scale`` initializers (``scales[i]``: [kv_heads, 1, head_dim] each) and the int8 per-channel
    attributes. Returns the number of attention nodes changed."""
    from onnx import TensorProto, helper, numpy_helper

    for vi in list(proto.graph.input) + list(proto.graph.output):
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.elem_type = TensorProto.INT8
    layer_of = {past_key_name(i): i for i in range(len(scales))}  # the graph contract's names
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "GroupQueryAttention" or node.input[3] not in layer_of:  # input 3: past_key
            continue
        layer = layer_of[node.input[3]]
        k_name, v_name = f"layers.{layer}.attention.k_cache_scale", f"layers.{layer}.attention.v_cache_scale"
        proto.graph.initializer.extend([numpy_helper.from_array(scales[layer][0], k_name),
                                        numpy_helper.from_array(scales[layer][1], v_name)])
        inputs = list(node.input) + [""] * max(0, 14 - len(node.input))
        inputs[12], inputs[13] = k_name, v_name  # k_scale, v_scale
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([helper.make_attribute("kv_cache_bit_width", 8),
                               helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL")])
        changed += 1
    return changed


def write_int8_kv_cache(bundle_dir: str, spec: ModelSpec, sequences: Sequence[Sequence[int]], threads, progress,
                        fused_file: str = FUSED_MODEL_FILE) -> Dict[str, Any]:
    """Calibrate the cache scales on ``sequences`` with ``bundle_dir``'s float-cache fused graph, then rewrite that
    graph with an int8 cache. Returns the fields to add to the manifest's ``graphs["fused"]`` entry."""
    import onnx

    from runtime.backends.onnxruntime_fused import FusedOnnxRuntimeBackend

    if not sequences:
        raise QuantizationError("--kv-cache int8 calibrates the cache scales: give --calib-data")
    path = os.path.join(bundle_dir, fused_file)
    progress.stage(f"calibrating the int8 KV cache on {len(sequences)} samples")
    backend = FusedOnnxRuntimeBackend(path, spec, threads=threads)
    try:
        bounds = calibrate_bounds(backend, spec, sequences, progress)
    finally:
        backend.close()
    proto = onnx.load(path, load_external_data=False)
    changed = int8_kv_graph(proto, [(scales_of(kb), scales_of(vb)) for kb, vb in bounds])
    if changed != spec.num_layers:
        raise QuantizationError(f"{fused_file}: {changed} GroupQueryAttention nodes for {spec.num_layers} layers; "
                                "re-export the bundle")
    onnx.save_model(proto, path)
    log.info("%s: int8 KV cache, %d layers", GRAPH_FUSED, changed)
    return {"kv_cache_dtype": "int8",
            "kv_cache_scales": {"granularity": "per layer, kv head and channel (static, in the graph)",
                                "calibration": f"{HEADROOM}x the largest magnitude over {len(sequences)} samples "
                                               f"({sum(len(s) for s in sequences)} tokens); rotary key pairs by norm",
                                "saturates": "values beyond it clip at +-127 steps"}}
