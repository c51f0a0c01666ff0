"""The memory-saving pieces of the streaming export (issue 15) against what they replace: the trace without the
parameter values in shape inference, INT4 through onnxruntime's kernel directly, the row-blocked checkpoint reads,
the column-blocked quantized-weight check. Each must give the same bytes (or numbers) as the longer way round.

Tiny shapes only; the memory itself is measured by bench/stream_memory.py (README "Scale").
"""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("mem") / "ckpt"), generation="chatglm3",
                                 dtype="bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_trace_without_parameter_values_is_the_same_graph(ckpt, tmp_path, dtype):
    import torch

    from exporter.config import spec_from_checkpoint
    from exporter.stream_weights import trace_weightless

    spec = spec_from_checkpoint(ckpt)[0]
    torch_dtype = getattr(torch, dtype)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with_values = trace_weightless(spec, torch_dtype, str(tmp_path / "a"), 17, parameter_values=True)
    without = trace_weightless(spec, torch_dtype, str(tmp_path / "b"), 17)
    assert with_values.SerializeToString() == without.SerializeToString()
    assert torch._C._jit_pass_onnx_graph_shape_type_inference.__name__ != "without_values"  # restored


def _one_matmul(k, n, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    from calibration.targets import Linear

    w = np.random.default_rng(seed).normal(size=(k, n)).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero column: scale 0 in the kernel
    node = helper.make_node("MatMul", ["x", "layers.0.qkv.weight_t"], ["y"], name="/layers.0/qkv/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "layers.0.qkv.weight_t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    lin = Linear("layers.0.qkv", node.name, "x", "layers.0.qkv.weight_t", (k, n))
    return model, w, lin


@pytest.mark.parametrize("k, n, block, symmetric, level", [(96, 24, 32, False, 4), (80, 7, 32, True, 0),
                                                           (100, 5, 16, False, 0), (64, 3, 64, True, 1)])
def test_int4_kernel_is_onnxruntime_quantizer(k, n, block, symmetric, level):
    """Int4Converter (onnxruntime's quantize_matmul_4bits called directly, the node written by hand) equals
    MatMulNBitsQuantizer on the same MatMul: nodes, tensors, bytes, opsets; K not a multiple of the block too."""
    import onnx
    from onnx import numpy_helper

    from calibration.int4 import int4_weight_only
    from calibration.stream_quant import Int4Converter

    model, w, lin = _one_matmul(k, n)
    header = onnx.TensorProto(name=lin.weight, dims=[k, n], data_type=onnx.TensorProto.FLOAT)
    weightless = onnx.ModelProto()
    weightless.CopyFrom(model)
    want = int4_weight_only(model, [lin], block, symmetric, level)  # (rewrites ``model`` in place)
    del weightless.graph.initializer[:]
    weightless.graph.initializer.append(header)
    conv = Int4Converter([lin], block, symmetric, level, embedding_fp16=False)
    conv.prepare(weightless)
    piece = conv.convert(header, w.copy())
    want_tensors = {i.name: numpy_helper.to_array(i) for i in want.graph.initializer}
    got_tensors = dict(piece.tensors)
    assert sorted(got_tensors) == sorted(want_tensors)
    for name, array in want_tensors.items():
        assert got_tensors[name].dtype == array.dtype and got_tensors[name].shape == array.shape, name
        assert got_tensors[name].tobytes() == array.tobytes(), name
    assert [n.SerializeToString() for n in piece.replace[1]] == [n.SerializeToString() for n in want.graph.node]
    assert piece.replace[0] == lin.node
    want_ms = {o.domain: o.version for o in want.opset_import}["com.microsoft"]
    assert conv.opsets["com.microsoft"] == want_ms


@pytest.mark.parametrize("name", ["layers.0.qkv.weight_t", "layers.1.down.weight_t", "embed.weight",
                                  "lm_head.weight_t", "layers.0.input_norm.weight"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_row_blocked_reads_are_the_whole_tensor(ckpt, monkeypatch, name, dtype):
    """graph_array in blocks of a few rows equals converting and transposing the whole canonical tensor."""
    import torch

    import exporter.stream_source as ss
    from exporter.config import spec_from_checkpoint

    spec, info = spec_from_checkpoint(ckpt)
    reader = ss.CheckpointReader(ckpt, spec, info.layout)
    if ss.canonical_name_of(name) not in reader.table:
        pytest.skip(f"{name} not in this model")
    whole = reader.canonical(ss.canonical_name_of(name), {np.float32: torch.float32, np.float16: torch.float16}[dtype])
    if name.endswith(ss.LINEAR_SUFFIX):
        whole = whole.t().contiguous()
    monkeypatch.setattr(ss, "READ_BLOCK_BYTES", 3000)  # a few rows per block
    got = reader.graph_array(name, dtype)
    assert got.dtype == dtype and got.shape == tuple(whole.shape)
    assert got.tobytes() == whole.numpy().tobytes()


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_column_blocked_weight_error_is_the_whole_weights(monkeypatch, precision):
    import calibration.stream_quant as sq
    from calibration.stream_quant import dequantized_weight, int4_blocks, quantized_weight_error

    _, w, lin = _one_matmul(64, 40, seed=1)
    if precision == "int4":
        packed, scales, zp = int4_blocks(w, 32, False)
        tensors = {lin.weight + "_Q4": packed, lin.weight + "_scales": scales, lin.weight + "_zero_points": zp}
    else:
        scale = np.maximum(np.abs(w).max(axis=0), 1e-8) / 127.0
        tensors = {lin.weight + "_quantized": np.round(w / scale).astype(np.int8),
                   lin.weight + "_scale": scale.astype(np.float32),
                   lin.weight + "_zero_point": np.zeros(40, dtype=np.int8)}
    got = dequantized_weight(tensors.__getitem__, lin, precision)  # the whole weight at once, (K, N)
    whole = float(np.sqrt(np.mean(np.square(got - w, dtype=np.float64)))
                  / np.sqrt(np.mean(np.square(w, dtype=np.float64))))  # relative RMS error
    monkeypatch.setattr(sq, "CHECK_BYTES", 4 * 64 * 6)  # 6 columns a block
    blocked = quantized_weight_error(np.ascontiguousarray(w.T), tensors.__getitem__, lin, precision)
    assert 0 < whole < 0.2
    assert blocked == pytest.approx(whole, rel=1e-9)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("mem-hf") / "ckpt"), generation="glm4", layout="hf",
                                 dtype="bfloat16")


@pytest.mark.parametrize("layout", ["thudm", "hf"])
def test_canonical_rows_and_blocked_reads_across_parts(ckpt, hf_ckpt, monkeypatch, layout):
    """canonical_rows gives the rows of the whole canonical tensor, also where a range crosses the q/k/v parts of
    the hf layout; graph_array's row blocks cross them too."""
    import torch

    import exporter.stream_source as ss
    from exporter.config import spec_from_checkpoint

    path = ckpt if layout == "thudm" else hf_ckpt
    spec, info = spec_from_checkpoint(path)
    reader = ss.CheckpointReader(path, spec, info.layout)
    whole = reader.canonical("layers.0.qkv.weight", torch.float32)
    if layout == "hf":
        assert len(reader.table["layers.0.qkv.weight"]) == 3
    n = whole.shape[0]
    for start, stop in ((0, n), (0, 5), (n // 2 - 3, n // 2 + 40), (n - 7, n)):
        got = reader.canonical_rows("layers.0.qkv.weight", start, stop, torch.float32)
        assert torch.equal(got, whole[start:stop])
    monkeypatch.setattr(ss, "READ_BLOCK_BYTES", 4 * whole.shape[1] * 7)  # 7 rows a block
    assert reader.graph_array("layers.0.qkv.weight_t", np.float32).tobytes() == whole.t().contiguous().numpy().tobytes()


def test_bundle_reader_blocked_reads(tmp_path, monkeypatch):
    """BundleReader maps and copies a tensor a block at a time: the same arrays as reading each whole."""
    import onnx
    from onnx import TensorProto, helper

    import calibration.stream_write as sw

    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(37, 11)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float16),
              "c": np.array(3.5, dtype=np.float32), "d": rng.integers(0, 255, size=(9, 3, 4)).astype(np.uint8)}
    writer = sw.ExternalDataWriter(str(tmp_path / "model.onnx.data"))
    inits = [writer.add(name, a) for name, a in arrays.items()]
    writer.close()
    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    onnx.save_model(helper.make_model(graph), str(tmp_path / "model.onnx"))
    monkeypatch.setattr(sw, "READ_BLOCK_BYTES", 24)  # a few elements a block
    reader = sw.BundleReader(str(tmp_path / "model.onnx"))
    for name, want in arrays.items():
        got = reader.graph_array(name)
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name
