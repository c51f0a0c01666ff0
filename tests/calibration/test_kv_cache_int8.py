"""The fused graph's int8 KV cache (calibration/kv_cache.py): onnxruntime's quantized-cache GroupQueryAttention checked
against numpy, the calibrated per-channel scales, and an INT4 bundle with an int8 cache on the trained tiny ChatGLM
(accuracy against the float-cache bundle, int8 buffers written in place, batches with left padding, refusals)."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import onnx
import pytest

from genai_greedy import genai_greedy
from calibration.kv_cache import HEADROOM, INT8_MAX, channel_bounds, scales_of
from runtime import GenerationConfig, GlmModel
from runtime.errors import BundleError
from calibration.genai_files import GENAI_MODEL_FILE
from runtime.manifest import FUSED_MODEL_FILE, GRAPH_FUSED, MODEL_FILE
from runtime.tolerances import ACCURACY_BOUNDS, KV_CACHE_BOUNDS

KV8 = dict(precision="int4", kv_cache="int8")


# ------------------------------------------------------------------------------------------------ the kernel


def _gqa_int8(nh, nkv, d):
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper

    f = TP.FLOAT
    node = helper.make_node(
        "GroupQueryAttention", ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total", "", "", "", "", "",
                                "k_scale", "v_scale"], ["out", "present_k", "present_v"], domain="com.microsoft",
        num_heads=nh, kv_num_heads=nkv, scale=1 / math.sqrt(d), kv_cache_bit_width=8, k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL")
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([node], "gqa_int8", [
        vi("qkv", f, ["B", "S", (nh + 2 * nkv) * d]), vi("past_k", TP.INT8, ["B", nkv, "T", d]),
        vi("past_v", TP.INT8, ["B", nkv, "T", d]), vi("seqlens_k", TP.INT32, ["B"]), vi("total", TP.INT32, []),
        vi("k_scale", f, [nkv, 1, d]), vi("v_scale", f, [nkv, 1, d])],
        [vi("out", f, ["B", "S", nh * d]), vi("present_k", TP.INT8, ["B", nkv, "T", d]),
         vi("present_v", TP.INT8, ["B", nkv, "T", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_gqa_int8_cache_stores_rounded_steps_and_attends_over_dequantized_values():
    """The contract kv_cache.py builds on, prefill (two chunks) then cached steps in the shared buffer: a new key or
    value is stored as clip(round(x / scale), -128, 127) per (kv head, channel), and attention reads every position,
    the new ones included, as int8 * scale (numpy reference, grouped heads, causal). Small scales make some values
    saturate."""
    import onnxruntime as ort

    nh, nkv, d, cap = 4, 2, 16, 24
    group = nh // nkv
    rng = np.random.default_rng(3)
    session = _gqa_int8(nh, nkv, d)
    k_scale = rng.uniform(0.004, 0.03, (nkv, 1, d)).astype(np.float32)
    v_scale = rng.uniform(0.004, 0.03, (nkv, 1, d)).astype(np.float32)
    bufs = [np.zeros((1, nkv, cap, d), np.int8) for _ in range(2)]
    values = [ort.OrtValue.ortvalue_from_numpy(b) for b in bufs]
    keys_q, vals_q = np.zeros((1, nkv, 0, d)), np.zeros((1, nkv, 0, d))
    length, saturated = 0, 0
    for s in (5, 3, 1, 1, 1):  # a prompt, a second chunk after it (chunked prefill), cached steps
        qkv = rng.standard_normal((1, s, (nh + 2 * nkv) * d)).astype(np.float32)
        binding = session.io_binding()
        binding.bind_cpu_input("qkv", qkv)
        binding.bind_cpu_input("seqlens_k", np.array([length + s - 1], np.int32))
        binding.bind_cpu_input("total", np.array(length + s, np.int32))
        binding.bind_cpu_input("k_scale", k_scale)
        binding.bind_cpu_input("v_scale", v_scale)
        for name, v in zip(("k", "v"), values):
            binding.bind_ortvalue_input("past_" + name, v)
            binding.bind_ortvalue_output("present_" + name, v)  # the shared buffer, written in place
        binding.bind_output("out")
        session.run_with_iobinding(binding)
        out = binding.get_outputs()[2].numpy()
        q = qkv[..., :nh * d].reshape(1, s, nh, d).transpose(0, 2, 1, 3)
        k = qkv[..., nh * d:(nh + nkv) * d].reshape(1, s, nkv, d).transpose(0, 2, 1, 3)
        v = qkv[..., (nh + nkv) * d:].reshape(1, s, nkv, d).transpose(0, 2, 1, 3)
        k_steps = np.clip(np.round(k / k_scale[None]), -128, 127)
        v_steps = np.clip(np.round(v / v_scale[None]), -128, 127)
        saturated += int((np.abs(k / k_scale[None]) > 127.5).sum())
        np.testing.assert_array_equal(bufs[0][:, :, length:length + s], k_steps)
        np.testing.assert_array_equal(bufs[1][:, :, length:length + s], v_steps)
        keys_q = np.concatenate([keys_q, k_steps * k_scale[None]], 2)
        vals_q = np.concatenate([vals_q, v_steps * v_scale[None]], 2)
        total = length + s
        scores = q @ np.repeat(keys_q, group, 1).transpose(0, 1, 3, 2) / math.sqrt(d)  # (1, nh, s, total)
        future = np.arange(total)[None, :] > (length + np.arange(s))[:, None]
        scores = np.where(future, -np.inf, scores)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        ref = ((p / p.sum(-1, keepdims=True)) @ np.repeat(vals_q, group, 1)).transpose(0, 2, 1, 3).reshape(1, s, -1)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        length = total
    assert saturated > 0  # the clip was exercised


def test_channel_bounds_cover_every_rotation_of_a_rotary_pair():
    """A key's rotary pairs take their largest norm: rotating the calibrated keys by any angle (another position)
    never leaves the bound, while the plain channel maximum would be exceeded."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2, 2, 50, 8)) * np.array([1, 3, 0.5, 2, 1, 1, 4, 1])
    values = rng.standard_normal((2, 2, 50, 8))
    kb, vb = channel_bounds(keys, values, rotary_dim=4)
    np.testing.assert_allclose(vb, np.abs(values).max(axis=(0, 2)))
    np.testing.assert_allclose(kb[:, 4:], np.abs(keys[..., 4:]).max(axis=(0, 2)))  # not rotary: plain maximum
    pair_norm = np.sqrt(keys[..., 0] ** 2 + keys[..., 1] ** 2).max(axis=(0, 2))
    np.testing.assert_allclose(kb[:, 0], pair_norm)
    np.testing.assert_allclose(kb[:, 1], pair_norm)
    exceeded_plain = False
    for angle in np.linspace(0, 2 * np.pi, 37):
        c, s = np.cos(angle), np.sin(angle)
        x, y = keys[..., 0], keys[..., 1]
        rx, ry = x * c - y * s, x * s + y * c
        assert np.abs(rx).max(axis=(0, 2)).max() <= kb[:, 0].max() + 1e-12
        assert (np.abs(ry).max(axis=(0, 2)) <= kb[:, 1] + 1e-12).all()
        exceeded_plain |= bool((np.abs(ry).max(axis=(0, 2)) > np.abs(keys[..., 1]).max(axis=(0, 2)) + 1e-9).any())
    assert exceeded_plain
    scale = scales_of(kb)
    assert scale.shape == (2, 1, 8) and scale.dtype == np.float32
    np.testing.assert_allclose(scale[:, 0, :] * INT8_MAX, HEADROOM * kb, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the bundle


def _inputs(path):
    proto = onnx.load(path, load_external_data=False)
    return {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}


def test_int8_kv_bundle_within_bounds_of_the_float_cache(trained):
    """INT4 with an int8 cache: only the fused graph changes (the portable and genai graphs keep float32), its
    measured accuracy is within the int4 bounds and within KV_CACHE_BOUNDS of the float-cache INT4 fused graph."""
    kv8 = trained.quantized("int4-kv8", **KV8)
    base = trained.quantized("int4", precision="int4")
    rec = kv8.manifest.graphs[GRAPH_FUSED]
    assert rec["kv_cache_dtype"] == "int8" and kv8.manifest.fused_kv_dtype == "int8"
    assert base.manifest.fused_kv_dtype == "float32"
    int8, f32 = onnx.TensorProto.INT8, onnx.TensorProto.FLOAT
    assert {t for n, t in _inputs(os.path.join(kv8.bundle_dir, FUSED_MODEL_FILE)).items()
            if n.startswith("past_key_values.")} == {int8}
    for other in (MODEL_FILE, GENAI_MODEL_FILE):
        assert {t for n, t in _inputs(os.path.join(kv8.bundle_dir, other)).items()
                if n.startswith("past_key_values.")} == {f32}
    fused, ref = kv8.manifest.extra["accuracy_fused"], base.manifest.extra["accuracy_fused"]
    print(f"\n[int4 + int8 KV] fused top-1 {fused['top1_agreement']:.4f} ppl x{fused['ppl_ratio']:.4f}; float cache "
          f"top-1 {ref['top1_agreement']:.4f} ppl x{ref['ppl_ratio']:.4f}")
    assert fused["ppl_ratio"] <= ACCURACY_BOUNDS["int4"]["max_ppl_ratio"]
    bounds = KV_CACHE_BOUNDS["int8"]
    assert ref["top1_agreement"] - fused["top1_agreement"] <= bounds["max_top1_drop"]
    assert fused["ppl_ratio"] - ref["ppl_ratio"] <= bounds["max_ppl_ratio_rise"]
    assert kv8.manifest.extra["quantization"]["settings"]["kv_cache"] == "int8"


def test_int8_kv_runtime_buffers_and_greedy_ids(trained):
    """The runtime allocates int8 shared buffers (a quarter of the float bytes) written in place across steps; a
    left-padded batch of two gives each prompt's own greedy ids; greedy ids follow the float-cache bundle's."""
    kv8 = trained.quantized("int4-kv8", **KV8)
    base = trained.quantized("int4", precision="int4")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    cfg = GenerationConfig(max_new_tokens=24, eos_token_ids=())
    with GlmModel.load(kv8.bundle_dir, threads=1) as m8, GlmModel.load(base.bundle_dir, threads=1) as mf:
        backend8, backendf = m8.backend, mf.backend
        assert backend8.graph_flavour == "fused" and backend8.kv_dtype == np.int8
        c8, cf = backend8.empty_cache(1, 16), backendf.empty_cache(1, 16)
        assert all(a.dtype == np.int8 for a in c8.arrays)
        assert sum(a.nbytes for a in cf.arrays) == 4 * sum(a.nbytes for a in c8.arrays)
        ids = np.array([prompts[0]], np.int64)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        _, c8 = backend8.forward(ids, np.ones_like(ids), pos, c8)
        held = [a.__array_interface__["data"][0] for a in c8.arrays]
        logits, c8 = backend8.forward(np.array([[3]], np.int64), np.ones((1, ids.shape[1] + 1), np.int64),
                                      np.array([[ids.shape[1]]], np.int64), c8)
        assert [a.__array_interface__["data"][0] for a in c8.arrays] == held  # appended in place
        filled = ids.shape[1] + 1
        assert np.abs(c8.arrays[0][:, :, :filled]).max() > 0 and not c8.arrays[0][:, :, filled:].any()
        assert np.isfinite(logits).all()
        batch = [r.generated_ids for r in m8.generate(prompts, cfg)]
        alone = [m8.generate(p, cfg).generated_ids for p in prompts]
        floats = [mf.generate(p, cfg).generated_ids for p in prompts]
    assert batch == alone
    agree = sum(a == b for x, y in zip(alone, floats) for a, b in zip(x, y)) / sum(len(x) for x in floats)
    print(f"\n[int4 + int8 KV] greedy ids equal to the float cache's: {agree:.3f}")
    assert agree >= KV_CACHE_BOUNDS["int8"]["min_greedy_agreement"]


def test_int8_kv_manifest_value_is_checked(trained, tmp_path):
    """A manifest's kv_cache_dtype outside float32/int8 is a one-line BundleError naming the field at load."""
    kv8 = trained.quantized("int4-kv8", **KV8)
    copy = str(tmp_path / "bundle")
    shutil.copytree(kv8.bundle_dir, copy)
    path = os.path.join(copy, "manifest.json")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    for bad in ("float64", ["int8"]):
        d["graphs"]["fused"]["kv_cache_dtype"] = bad
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f)
        with pytest.raises(BundleError, match="graphs.fused.kv_cache_dtype") as e:
            GlmModel.load(copy, threads=1)
        assert "\n" not in str(e.value)


def test_genai_runs_an_int8_kv_bundle_with_its_float_cache(trained):
    """onnxruntime-genai loads such a bundle through model.genai.onnx (float32 cache, the same INT4 weights): its
    greedy ids equal the runtime's on the bundle's float-cache portable graph."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the 'test' and 'bench' extras' peer")
    kv8 = trained.quantized("int4-kv8", **KV8)
    prompt, new = [5, 6, 7, 8, 9, 10], 16
    theirs = genai_greedy(og, kv8.bundle_dir, prompt, new)
    with GlmModel.load(kv8.bundle_dir, threads=1, graph="portable") as ours:
        assert theirs == ours.generate(prompt, GenerationConfig(max_new_tokens=new, eos_token_ids=())).generated_ids


def test_bench_reports_the_int8_cache(trained):
    from click.testing import CliRunner

    from exporter.cli import main

    kv8 = trained.quantized("int4-kv8", **KV8)
    r = CliRunner().invoke(main, ["bench", "--model", kv8.bundle_dir, "--prompt-len", "4", "--new-tokens", "3",
                                  "--runs", "1", "--warmup", "0", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["graph"] == "fused" and out["kv_cache"] == "int8" and out["results"][0]["decode_tokens_per_s"] > 0


# ------------------------------------------------------------------------------------------------ every generation


@pytest.fixture(scope="module")
def calib_jsonl(tmp_path_factory):
    from exporter.tiny.train import corpus_records

    path = str(tmp_path_factory.mktemp("kv8-calib") / "calib.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in corpus_records(24, seed=11):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _fused_steps(bundle, prompts, steps):
    """Last-position logits of a left-padded batch: the prefill, then ``steps`` cached steps fed fixed tokens (the
    same for every bundle compared, so only the cache differs)."""
    from runtime.positions import left_pad_positions

    with GlmModel.load(bundle, threads=1, graph="fused") as model:
        backend, spec = model.backend, model.manifest.spec
        ids, mask, pos = left_pad_positions(spec, prompts, spec.pad_token_id)
        cache = backend.empty_cache(len(prompts), ids.shape[1] + steps)
        logits, cache = backend.forward(ids, mask, pos, cache)
        out = [logits]
        for step in range(steps):
            nxt = np.array([[20 + step], [30 + step]], dtype=np.int64)[: len(prompts)]  # (B, 1)
            mask = np.concatenate([mask, np.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
            logits, cache = backend.forward(nxt, mask, pos, cache)
            out.append(logits)
    return out, backend


@pytest.mark.parametrize("case", ["chatglm3-thudm-hd32", "chatglm3_32k-thudm-hd64", "chatglm2_32k-thudm-interp",
                                  "glm4-thudm", "glm4-hf", "glm4_0414-hf"])
def test_int8_kv_follows_the_float_cache_for_every_generation(tiny_models, calib_jsonl, tmp_path, case):
    """Every generation and layout the fused graph covers (rope scaling of both kinds, one or two kv heads, QKV bias,
    sandwich norms): the int8-cache INT4 bundle's logits through a left-padded batch of two, prefill and four cached
    steps, stay within the tolerance table's int8_kv_vs_float_kv of the float-cache INT4 bundle's."""
    from calibration.pipeline import QuantizeOptions, quantize_bundle
    from runtime.tolerances import allowed_diff

    _, src = tiny_models.case(case)
    out = {}
    for kv in ("float32", "int8"):
        path = str(tmp_path / kv)
        os.makedirs(path)
        quantize_bundle(src, path, QuantizeOptions(precision="int4", kv_cache=kv, calib_data=calib_jsonl,
                                                   calib_samples=16, evaluate=False))
        out[kv] = path
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    ref, _ = _fused_steps(out["float32"], prompts, 4)
    got, backend = _fused_steps(out["int8"], prompts, 4)
    assert backend.kv_dtype == np.int8
    for step, (a, b) in enumerate(zip(got, ref)):
        diff, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
        print(f"\n[{case}] step {step}: max diff {diff:.4f} of logits up to {scale:.3f}")
        assert diff <= allowed_diff("int8_kv_vs_float_kv", "int4", scale), (step, diff, scale)
