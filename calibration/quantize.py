"""INT8 on the linear layers of a float graph: static Q/DQ from a calibration ranges file, or dynamic.

Where it stands: after calibration (``calibration.ranges``) for static INT8; directly on the fp32 graph for dynamic
INT8. Both quantize exactly the linear layers that ``calibration.targets.select`` chose (weights and their input
activations) and leave attention's QK^T / PV, norms, softmax, rotary and the embedding in float.

* Static INT8 writes QuantizeLinear/DequantizeLinear pairs on each chosen linear layer's input (per-tensor scale
  amax / 127 from the ranges file) and stores the weight as INT8 with a per-output-channel DequantizeLinear (axis 1
  of the (K, N) weight). Everything is symmetric INT8 with zero point 0: the explicit-quantization form TensorRT
  consumes, which onnxruntime's CPU provider also fuses into integer MatMuls.
* Dynamic INT8 (onnxruntime.quantization.quantize_dynamic) stores INT8 per-channel weights and quantizes each
  activation at run time (DynamicQuantizeLinear + MatMulInteger, fused by onnxruntime on CPU); it needs no
  calibration and runs on onnxruntime only.

The rewriting itself is onnxruntime's (QDQQuantizer / quantize_dynamic); what is ours is the choice of tensors and
the ranges, handed over as onnxruntime's TensorsData.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Dict, Sequence

import numpy as np

from calibration.errors import QuantizationError
from calibration.ranges import CalibrationRanges
from calibration.targets import Linear


class _DropOnnxruntimeQuantizationLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "/onnxruntime/quantization/" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_onnxruntime_quantization():
    """onnxruntime's quantizers log every node at INFO and warn about pre-processing through the root logger;
    drop their records (only theirs) while they run."""
    root = logging.getLogger()
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    dropper, level = _DropOnnxruntimeQuantizationLogs(), nbits.level
    root.addFilter(dropper)
    nbits.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(dropper)
        nbits.setLevel(level)


def activation_ranges(linears: Sequence[Linear], ranges: CalibrationRanges) -> Dict[str, tuple]:
    """tensor name -> (lowest, highest) handed to the quantizer: [-amax, amax] (symmetric INT8)."""
    missing = [lin.activation for lin in linears if lin.activation not in ranges.tensors]
    if missing:
        raise QuantizationError(
            f"the calibration ranges have no entry for {len(missing)} tensor(s) to quantize (first: {missing[0]}); "
            "they were calibrated for another graph or another --keep-float choice"
        )
    out = {}
    for lin in linears:
        a = ranges.amax(lin.activation)
        out[lin.activation] = (-a, a)
    return out


def static_int8(proto, linears: Sequence[Linear], ranges: CalibrationRanges):
    """``proto`` (weights loaded) with the chosen linear layers in Q/DQ form; returns the new ModelProto."""
    from onnxruntime.quantization import CalibrationMethod, QDQQuantizer, QuantType, TensorData, TensorsData

    bounds = activation_ranges(linears, ranges)
    data = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in bounds.items()
    })
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,  # only MatMuls with a weight; QK^T and PV never
        "OpTypesToExcludeOutputQuantization": ["MatMul"],  # quantize inputs only; outputs stay float
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # one scale per output column of the (K, N) weight
        "DefaultTensorType": 1,  # FLOAT: shape inference cannot type the fused graph's contrib-op outputs
    }
    with quiet_onnxruntime_quantization():
        quantizer = QDQQuantizer(proto, True, False, QuantType.QInt8, QuantType.QInt8, data,
                                 [lin.node for lin in linears], [], ["MatMul"], extra)
        quantizer.quantize_model()
    out = quantizer.model.model
    restore_float_side_reads(out, linears)
    return out


def restore_float_side_reads(proto, linears: Sequence[Linear]) -> int:
    """Let every node but the quantized MatMul read the float activation again; returns how many were rewired.

    The quantizer points every reader of a quantized tensor at its DequantizeLinear output, including the Shape
    nodes the trace took from the same tensor. A DequantizeLinear with several readers keeps onnxruntime from fusing
    the Q/DQ/MatMul group into an integer MatMul (measured on the mid-size model: 0.38x fp32 decode speed with the
    extra readers, about 3x without); TensorRT too wants Q/DQ to feed only the layer it quantizes.
    """
    producers = {o: n for n in proto.graph.node for o in n.output}
    matmuls = {lin.node for lin in linears}
    rewired = 0
    for node in proto.graph.node:
        if node.name in matmuls:
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":  # an activation pair (weights have no Q)
                node.input[k] = q.input[0]
                rewired += 1
    return rewired


def dynamic_int8(model_path: str, linears: Sequence[Linear], work_dir: str):
    """The graph at ``model_path`` with the chosen linear layers dynamically quantized; returns the ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = tempfile.mkdtemp(prefix=".dynamic-", dir=work_dir)
    out = os.path.join(tmp, "model.onnx")
    try:
        with quiet_onnxruntime_quantization():
            quantize_dynamic(model_path, out, op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_quantize=[lin.node for lin in linears],
                             use_external_data_format=True,
                             # DefaultTensorType: shape inference cannot type the fused graph's contrib-op outputs
                             extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return onnx.load(out, load_external_data=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
