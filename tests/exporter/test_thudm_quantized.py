"""THUDM's quantized checkpoints (quantization_bit 4 and 8), packed here by the test itself: unpacking follows the
written-down byte layout, the dequantized export holds exactly the numpy dequantization, and
--keep-checkpoint-quantization bundles hold exactly the checkpoint's integers and scales and run in the runtime."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from exporter.cli import main
from checkpoint_copies import edited_checkpoint
from exporter.thudm_quant import QUANTIZED_LINEARS, bundle_integers, unpack_int4
from onnx_steps import OnnxStepper, left_padded_batch
from runtime.tolerances import allowed_diff


def test_int4_byte_layout_written_down():
    """Row [1, -2, 7, -8]: byte 0 = (1 << 4) | (-2 & 0xF) = 0x1E; byte 1 = (7 << 4) | (-8 & 0xF) = 0x78."""
    packed = np.array([[0x1E, 0x78]], dtype=np.uint8).view(np.int8)
    assert unpack_int4(packed).tolist() == [[1, -2, 7, -8]]
    packed = np.array([[0xF0, 0x81]], dtype=np.uint8).view(np.int8)  # (-1, 0), (-8, 1)
    assert unpack_int4(packed).tolist() == [[-1, 0, -8, 1]]


def _quantize_rows(w: np.ndarray, bits: int):
    """What THUDM's quantize() stores: fp16 scale = max|row| / (2^(bits-1) - 1), q = round(w / scale)."""
    scale = (np.abs(w).max(1) / (2 ** (bits - 1) - 1)).astype(np.float16)
    q = np.round(w / scale.astype(np.float32)[:, None]).astype(np.int8)
    return q, scale


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """Two values per byte, even column in the high nibble (the layout test_int4_byte_layout_written_down pins)."""
    u = q.astype(np.uint8) & 0xF
    return ((u[:, 0::2] << 4) | u[:, 1::2]).astype(np.uint8).view(np.int8)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("q") / "float"), generation="chatglm3", seed=21,
                                 vocab_size=701)


def _quantized_copy(float_ckpt, out, bits):
    """The float checkpoint quantized the way THUDM ships it; returns (dir, {key: (q int8 (N, K), scale fp16)})."""
    expected = {}

    def quantize(tensors, cfg):
        for key in list(tensors):
            if any(key.endswith(m + ".weight") for m in QUANTIZED_LINEARS):
                q, scale = _quantize_rows(tensors[key].numpy(), bits)
                expected[key] = (q, scale)
                tensors[key] = torch.from_numpy(_pack_int4(q) if bits == 4 else q)
                tensors[key + "_scale"] = torch.from_numpy(scale)

    return edited_checkpoint(float_ckpt, out, {"quantization_bit": bits}, quantize), expected


def _export(ckpt, out, *extra):
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return out


def _initializers(bundle):
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(os.path.join(bundle, "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}, proto


_CANONICAL = {"self_attention.query_key_value": "qkv", "self_attention.dense": "attn_out",
              "mlp.dense_h_to_4h": "gate_up", "mlp.dense_4h_to_h": "down"}


def _canonical(key):
    layer = key.split(".layers.")[1].split(".")[0]
    module = next(m for m in _CANONICAL if key.endswith(m + ".weight"))
    return f"layers.{layer}.{_CANONICAL[module]}"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoint_exports_dequantized_and_kept(float_ckpt, tmp_path, bits):
    ckpt, expected = _quantized_copy(float_ckpt, tmp_path / "ckpt", bits)
    assert len(expected) == 4 * 2
    # 1. dequantized export: every linear weight is exactly q * scale (numpy, from the test's own integers)
    deq = _export(ckpt, tmp_path / "deq")
    inits, _ = _initializers(deq)
    for key, (q, scale) in expected.items():
        want = q.astype(np.float32) * scale.astype(np.float32)[:, None]
        assert np.array_equal(inits[_canonical(key) + ".weight_t"], want.T), key
    manifest = json.loads((deq / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["source"]["checkpoint_quantization"]["quantization_bit"] == bits

    # 2. kept: the bundle's integers and scales are the checkpoint's
    kept = _export(ckpt, tmp_path / "kept", "--keep-checkpoint-quantization")
    inits, proto = _initializers(kept)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 8 and all(a.i == bits for n in nbits for a in n.attribute if a.name == "bits")
    from safetensors.torch import load_file

    stored = load_file(str(ckpt / "model.safetensors"))
    for key, (q, scale) in expected.items():
        k = q.shape[1]
        got_q, got_scale = bundle_integers(inits, _canonical(key), bits, k)
        assert np.array_equal(got_q, q), key
        assert got_scale.astype(np.float16).tobytes() == stored[key + "_scale"].numpy().tobytes(), key
        assert np.array_equal(got_scale, scale.astype(np.float32)), key
        name = _canonical(key) + ".weight_t"
        ck = stored[key].numpy().view(np.uint8)  # (N, K) int8 or (N, K / 2) packed int4
        ours = inits[name + ".q"].reshape(ck.shape[0], -1)[:, : ck.shape[1]]  # without the padded block's tail
        if bits == 8:  # each byte is the checkpoint's byte with the sign bit flipped (zero point 128)
            assert ours.tobytes() == (ck ^ 0x80).tobytes(), key
        else:  # each byte is the checkpoint's byte with the nibbles swapped and both sign bits flipped
            assert ours.tobytes() == (((ck >> 4) | (ck << 4)).astype(np.uint8) ^ 0x88).tobytes(), key
    manifest = json.loads((kept / "manifest.json").read_text())
    assert manifest["precision"] == ("int4" if bits == 4 else "int8")
    assert manifest["source"]["checkpoint_quantization"]["kept"] is True
    assert manifest["graphs"] == {} and "kept THUDM" in manifest["extra"]["graphs_decided"]["fused"]

    # 3. both bundles compute the same model, and the kept one runs through the runtime
    ids, mask = left_padded_batch(701, (6, 3), seed=4)
    a, b = OnnxStepper(str(deq)), OnnxStepper(str(kept))
    la, lb = a.start(ids, mask), b.start(ids, mask)
    tol = allowed_diff("onnx_vs_torch", "fp32", float(np.abs(la).max()))
    assert np.abs(la - lb)[mask > 0].max() <= tol
    from runtime import GenerationConfig, GlmModel

    with GlmModel.load(str(kept)) as m1, GlmModel.load(str(deq)) as m2:
        assert getattr(m1.backend, "graph_flavour", "portable") == "portable"  # kept integers: portable graph only
        cfg = GenerationConfig(max_new_tokens=6)
        r1, r2 = m1.generate([5, 6, 7, 8], cfg), m2.generate([5, 6, 7, 8], cfg)
        assert len(r1.generated_ids) >= 1 and r1.generated_ids == r2.generated_ids


def test_quantization_bit_2_is_refused(float_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(float_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, quantization_bit=2)))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'quantization_bit' = 2" in lines[0] and "4 or 8" in lines[0]
    assert not os.path.exists(out)


def test_keep_quantization_needs_a_quantized_checkpoint(float_ckpt, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["onnx", "--model", float_ckpt, "--out", str(out), "--quiet",
                                       "--keep-checkpoint-quantization"])
    assert result.exit_code == 2 and "not a quantized checkpoint" in result.output
    assert not os.path.exists(out)


def test_pytorch_model_bin_form_dequantizes_the_same(float_ckpt, tmp_path):
    """THUDM ships its int4 checkpoints as pytorch_model.bin: the same tensors read from a .bin dequantize alike."""
    from safetensors.torch import load_file

    from exporter.checkpoint_forms import prepare_forms

    st, _ = _quantized_copy(float_ckpt, tmp_path / "st", 4)
    binary = tmp_path / "bin"
    shutil.copytree(st, binary)
    torch.save(load_file(str(binary / "model.safetensors")), str(binary / "pytorch_model.bin"))
    os.remove(binary / "model.safetensors")
    a = dict(prepare_forms(str(st)).weights(torch.float32, None))
    b = dict(prepare_forms(str(binary)).weights(torch.float32, None))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["layers.0.qkv.weight"].dtype == torch.float32
