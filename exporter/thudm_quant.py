"""THUDM's quantized checkpoints (``quantization_bit`` 4 or 8: chatglm2-6b-int4, chatglm3-6b int4 builds), read
without running their ``quantization.py``.

The format (THUDM's quantization.py and its CPU kernel source, read, not copied; restated here as data):
- Quantized: the four linear weights of every layer, ``self_attention.query_key_value``, ``self_attention.dense``,
  ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``. The embedding, output layer, norms and the qkv bias stay float.
- Per output row ``n``: ``weight_scale[n] = max|w[n, :]| / (2^(bits-1) - 1)`` (fp16, shape (N,)), and
  ``q = round(w / scale)`` as int8. Dequantized ``w[n, k] = q[n, k] * weight_scale[n]`` (symmetric, no zero point).
- int8: ``weight`` is int8 (N, K). int4: ``weight`` is int8 (N, K / 2), two signed 4-bit values per byte: byte
  ``j`` holds column ``2j`` in the high nibble and column ``2j + 1`` in the low nibble,
  ``byte = (q[2j] << 4) | (q[2j+1] & 0xF)``; unpacking sign-extends each nibble.

Two ways out: :func:`dequantizing_reader` gives the float weights to the ordinary export (verified against the
PyTorch model); :func:`keep_quantization_rewrite` writes the checkpoint's own integers and scales into the graph as
com.microsoft MatMulNBits (bits 4 or 8, accuracy_level 0: float32 compute). MatMulNBits stores unsigned values with a
zero point and a scale per block of K; the exact representation of a per-row symmetric int4/int8 is: zero point
2^(bits-1) (its default: 8 or 128), each value ``q + 2^(bits-1)`` (the same bits with the sign bit flipped), every
block of a row carrying the row's scale (per-row scales have no other MatMulNBits form: blocks are powers of two
<= 256, so a K of 4096 or 13696 takes several blocks). So the bundle holds the same integers (a fixed bijection per
value) and the same scales (fp16 -> fp32 is exact), and dequantizes to bit-identical weights.

Why not DequantizeLinear -> MatMul for int8 (its bytes would be the checkpoint's unchanged): onnxruntime's
extended graph optimizer fuses that pair into an 8-bit MatMulNBits with its session default accuracy level 4, which
quantizes the activations to int8 (measured on the tiny model: logits 0.16 off the dequantized graph, against 7e-6
for the same graph unfused); writing MatMulNBits with accuracy_level 0 ourselves keeps float32 activations.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from runtime.errors import WeightsError
from runtime.spec import ModelSpec

# THUDM layer keys that quantization_bit quantizes -> our canonical linear
QUANTIZED_LINEARS = {
    "self_attention.query_key_value": "qkv",
    "self_attention.dense": "attn_out",
    "mlp.dense_h_to_4h": "gate_up",
    "mlp.dense_4h_to_h": "down",
}
THUDM_LAYER_KEY = "transformer.encoder.layers.{i}.{module}.weight"
SCALE_SUFFIX = "_scale"  # "...query_key_value.weight" -> "...query_key_value.weight_scale"
MATMULNBITS_BLOCKS = (256, 128, 64, 32, 16)  # block sizes onnxruntime's CPU MatMulNBits supports


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """int8 (N, K/2) -> int8 (N, K) in [-8, 7]: high nibble = even column, low nibble = odd column."""
    p = np.asarray(packed).view(np.int8)
    high = p >> 4  # arithmetic shift sign-extends
    low = (p << 4).astype(np.int8) >> 4
    out = np.empty((p.shape[0], p.shape[1] * 2), dtype=np.int8)
    out[:, 0::2], out[:, 1::2] = high, low
    return out


def checkpoint_integers(weight: np.ndarray, bits: int) -> np.ndarray:
    """The checkpoint's quantized values as int8 (N, K), whatever the packing."""
    return unpack_int4(weight) if bits == 4 else np.asarray(weight).view(np.int8)


def dequantize(weight: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """float32 (N, K): q * scale per row (the fp16 scale widened to fp32 exactly; each product is exact in fp32)."""
    q = checkpoint_integers(weight, bits).astype(np.float32)
    return q * np.asarray(scale, dtype=np.float32)[:, None]


def quantized_keys(spec: ModelSpec) -> List[Tuple[str, str]]:
    """(THUDM weight key, canonical linear name) of every quantized tensor."""
    out = []
    for i in range(spec.num_layers):
        for module, canonical in QUANTIZED_LINEARS.items():
            out.append((THUDM_LAYER_KEY.format(i=i, module=module), f"layers.{i}.{canonical}"))
    return out


def scale_keys(spec: ModelSpec) -> List[str]:
    return [key + SCALE_SUFFIX for key, _ in quantized_keys(spec)]


def _read_pair(source, key: str, bits: int):
    """(int8 weight, fp16 scale) numpy arrays of one quantized linear, checked."""
    files = source.files.key_to_file
    scale_key = key + SCALE_SUFFIX
    if scale_key not in files:
        raise WeightsError(f"{source.files.files[0]}: quantization_bit is {bits} but '{scale_key}' is missing")
    w, s = source.get(key), source.get(scale_key)
    import torch

    if w.dtype != torch.int8:
        raise WeightsError(f"weight '{key}' is {str(w.dtype).replace('torch.', '')}, expected int8 "
                           f"(quantization_bit {bits})")
    if tuple(s.shape) != (w.shape[0],):
        raise WeightsError(f"weight '{scale_key}' has shape {tuple(s.shape)}, expected ({w.shape[0]},)")
    return w.numpy(), s.to(torch.float16).numpy()


def dequantizing_reader(spec: ModelSpec, bits: int) -> Callable[[Any, str], Any]:
    """A ``load_canonical_weights`` reader: quantized keys come back as float32 (N, K), others unchanged."""
    import torch

    quantized = {key for key, _ in quantized_keys(spec)}

    def read(source, key: str):
        if key not in quantized:
            return source.get(key)
        w, s = _read_pair(source, key, bits)
        return torch.from_numpy(dequantize(w, s, bits))

    return read


def read_quantized(ckpt_dir: str, spec: ModelSpec, bits: int) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """canonical linear name -> (int8 integers (N, K), fp16 scales (N,)), straight from the checkpoint."""
    from exporter.weights import TensorSource, find_weight_files

    source = TensorSource(find_weight_files(ckpt_dir))
    try:
        out = {}
        for key, canonical in quantized_keys(spec):
            w, s = _read_pair(source, key, bits)
            out[canonical] = (checkpoint_integers(w, bits).copy(), s.copy())
        return out
    finally:
        source.close()


def matmulnbits_block(k: int) -> int:
    """The largest supported block that divides K (no padding), else 32 with the last block padded."""
    return next((b for b in MATMULNBITS_BLOCKS if k % b == 0), 32)


def to_matmulnbits(q: np.ndarray, scale: np.ndarray, bits: int = 4) -> Tuple[np.ndarray, np.ndarray, int]:
    """Signed int4/int8 (N, K) with a per-row scale -> MatMulNBits' B uint8 (N, blocks, block * bits / 8), scales
    float32 (N * blocks,), block size. Stored value = q + 2^(bits-1) (MatMulNBits' default zero point: 8 or 128),
    i.e. the same bits with the sign bit flipped; int4 pairs hold the first element in the low nibble; padding
    (when K is not a multiple of the block) holds the zero point, i.e. zero."""
    n, k = q.shape
    block = matmulnbits_block(k)
    blocks = -(-k // block)
    offset = 1 << (bits - 1)
    u = np.full((n, blocks * block), offset, dtype=np.uint8)
    u[:, :k] = (q.astype(np.int16) + offset).astype(np.uint8)
    if bits == 4:
        u = (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)
    packed = u.reshape(n, blocks, block * bits // 8)
    scales = np.repeat(np.asarray(scale, dtype=np.float32)[:, None], blocks, axis=1).reshape(-1)
    return packed, scales, block


def keep_quantization_rewrite(quantized: Dict[str, Tuple[np.ndarray, np.ndarray]], bits: int):
    """A ``trace_to_onnx`` graph rewrite: each quantized linear's float MatMul weight is replaced by the checkpoint's
    integers and scales (MatMulNBits, see the module docstring). Returns (rewrite, record)."""
    record: Dict[str, Any] = {"bits": bits, "linears": len(quantized), "accuracy_level": 0,
                              "form": f"MatMulNBits bits={bits} (zero point {1 << (bits - 1)}, the row's scale in "
                                      "every block)"}

    def rewrite(proto, tensors: Dict[str, Any]) -> None:
        import torch
        from onnx import TensorProto, helper

        consumers = {}
        for node in proto.graph.node:
            if node.op_type == "MatMul":
                consumers.setdefault(node.input[1], []).append(node)
        for canonical, (q, scale) in quantized.items():
            name = canonical + ".weight_t"
            nodes = consumers.get(name, [])
            if len(nodes) != 1:
                raise RuntimeError(f"expected one MatMul on {name}, found {len(nodes)}")
            matmul = nodes[0]
            n, k = q.shape
            del tensors[name]
            packed, scales, block = to_matmulnbits(q, scale, bits)
            tensors[name + ".q"] = torch.from_numpy(packed)
            tensors[name + ".scales"] = torch.from_numpy(scales)
            nbits = helper.make_node("MatMulNBits", [matmul.input[0], name + ".q", name + ".scales"],
                                     list(matmul.output), name=matmul.name + "_nbits", domain="com.microsoft",
                                     K=k, N=n, bits=bits, block_size=block, accuracy_level=0)
            matmul.CopyFrom(nbits)
            added = [(name + ".q", TensorProto.UINT8, packed.shape), (name + ".scales", TensorProto.FLOAT,
                                                                       scales.shape)]
            kept = [v for v in proto.graph.input if v.name != name]
            del proto.graph.input[:]
            proto.graph.input.extend(kept)
            for tname, dtype, shape in added:
                proto.graph.input.append(helper.make_tensor_value_info(tname, dtype, list(shape)))
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    return rewrite, record


def bundle_integers(initializers: Dict[str, np.ndarray], canonical: str, bits: int, k: int) -> Tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """Read back (signed int8 (N, K), float32 scales (N,)) of one linear from a keep-quantization bundle's
    initializers (for checks and tests): the inverse of :func:`to_matmulnbits`."""
    name = canonical + ".weight_t"
    packed = initializers[name + ".q"]
    n, blocks = packed.shape[:2]
    flat = packed.reshape(n, -1).astype(np.int16)
    if bits == 4:
        u = np.empty((n, flat.shape[1] * 2), dtype=np.int16)
        u[:, 0::2], u[:, 1::2] = flat & 0xF, flat >> 4
    else:
        u = flat
    scales = initializers[name + ".scales"].reshape(n, blocks)
    if not (scales == scales[:, :1]).all():
        raise ValueError(f"{name}: scales differ between blocks of a row")
    return (u[:, :k] - (1 << (bits - 1))).astype(np.int8), scales[:, 0].copy()
