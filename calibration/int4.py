"""INT4 weight-only quantization in the form onnxruntime runs fast: com.microsoft MatMulNBits.

Where it stands: applied directly to the fp32 graph (no calibration: weights only). Each chosen linear layer's
(K, N) weight is quantized in blocks of ``block_size`` consecutive input rows (K) per output column (the last block
zero-padded), with one fp32 scale (and, unless symmetric, one 4-bit zero point) per block, by
onnxruntime.quantization's MatMulNBitsQuantizer; the MatMul becomes a MatMulNBits. ``accuracy_level`` is
MatMulNBits' compute type: 0 lets onnxruntime choose, 1 fp32, 4 quantizes activations to INT8 per block (fastest on
CPU).

The embedding is not a MatMul and stays float (fp16 by default, see ``calibration.embedding``). The LM head is a
linear layer like the others: quantized unless kept with --keep-float lm_head; docs/precision.md gives the measured
cost of each choice. MatMulNBits is an onnxruntime contrib op: an INT4 bundle runs on onnxruntime only, which the
manifest records.
"""
from __future__ import annotations

import importlib
import logging
from typing import Sequence

from calibration.defaults import INT4_BLOCK_SIZE, INT4_SYMMETRIC
from calibration.errors import QuantizationError
from calibration.quantize import quiet_onnxruntime_quantization
from calibration.targets import Linear

BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _nbits_module():
    """onnxruntime's matmul_nbits_quantizer, imported without the ``logging.basicConfig(level=INFO)`` it runs at
    import time (which would make every library in the process log at INFO)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return importlib.import_module("onnxruntime.quantization.matmul_nbits_quantizer")
    except ImportError as e:
        raise QuantizationError(f"--precision int4 needs onnxruntime's INT4 quantizer, which needs {e.name!r}: "
                                "pip install 'glm-export[export]' (or pip install onnx-ir)") from None
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


def check_int4(block_size: int, accuracy_level: int) -> None:
    """The INT4 settings (``calibration.pipeline.check_options`` runs this before any work)."""
    if block_size not in BLOCK_SIZES:
        raise QuantizationError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizationError(f"--int4-accuracy-level must be 0..4, got {accuracy_level}")


def int4_weight_only(
    proto,
    linears: Sequence[Linear],
    block_size: int = INT4_BLOCK_SIZE,
    symmetric: bool = INT4_SYMMETRIC,
    accuracy_level: int = 4,
):
    """``proto`` (weights loaded) with the chosen linear layers as MatMulNBits; returns the new ModelProto.
    ``block_size`` and ``accuracy_level`` are those :func:`check_int4` accepts."""
    nbits = _nbits_module()
    chosen = {lin.node for lin in linears}
    inits = {i.name for i in proto.graph.initializer}
    # The quantizer takes every MatMul with a constant weight of op_types_to_quantize; exclusion is the reliable
    # way to leave the others (kept-float linear layers) alone.
    exclude = [n.name for n in proto.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and n.name not in chosen]
    with quiet_onnxruntime_quantization():
        quantizer = nbits.MatMulNBitsQuantizer(
            proto, bits=4, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
            nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),),
        )
        quantizer.process()
    return quantizer.model.model
