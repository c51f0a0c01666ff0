"""TensorRT on a GPU: build an engine from a tiny exported bundle, run prefill and cached decode steps through the
TensorRT backend, and compare with onnxruntime on the same bundle. Skipped, with the reason, where TensorRT or a CUDA
GPU is missing."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from exporter.trt_engine import EngineOptions, engine_from_bundle, tensorrt_available
from exporter.trt_profiles import ProfileRequest
from onnx_steps import OnnxStepper, left_padded_batch
from runtime import graph_contract as gc
from runtime.errors import BackendError, GenerationError
from runtime.tolerances import allowed_diff
from runtime.trt_compat import ENGINE_PLAN, ENGINE_RECORD, engine_compatibility

CASE = "chatglm3-thudm-hd32"
REQUEST = ProfileRequest(max_batch=2, max_input_len=16, max_seq_len=48, opt_batch=2, opt_seq=9)


def _require_tensorrt_and_gpu() -> None:
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT not installed: {why}")
    try:
        from runtime.backends.tensorrt import _cudart, _ok

        count = _ok(_cudart().cudaGetDeviceCount())
    except BackendError as e:
        pytest.skip(f"no usable CUDA runtime: {e}")
    if not count:
        pytest.skip("no CUDA GPU: cudaGetDeviceCount() is 0")


@pytest.fixture(scope="module")
def built(tiny_models, tmp_path_factory):
    _require_tensorrt_and_gpu()
    _, bundle = tiny_models.case(CASE)
    out = str(tmp_path_factory.mktemp("trt") / "engine")
    # TF32 off: the comparison with onnxruntime's fp32 uses the fp32 row of the tolerance table
    record = engine_from_bundle(bundle, out, EngineOptions(REQUEST, tf32=False))
    return bundle, out, record


def _close(got, want, what):
    tol = allowed_diff("onnx_vs_torch", "fp32", float(np.abs(want).max()))
    diff = float(np.abs(got - want).max())
    assert diff <= tol, f"{what}: max |TensorRT - onnxruntime| = {diff:.3g} > {tol:.3g}"


def test_engine_files_and_record(built):
    from runtime.backends.tensorrt import current_gpu

    import tensorrt as trt

    _, out, record = built
    assert os.path.getsize(os.path.join(out, ENGINE_PLAN)) == record["engine_bytes"] > 0
    with open(os.path.join(out, ENGINE_RECORD)) as f:
        assert json.load(f) == record
    assert [p["name"] for p in record["profiles"]] == ["prefill", "decode"]
    assert engine_compatibility(record, trt.__version__, *current_gpu()) is None


def test_prefill_and_cached_decode_match_onnxruntime(built):
    from runtime.backends.tensorrt import TensorRTBackend

    bundle, out, _ = built
    stepper = OnnxStepper(bundle)
    ids, mask = left_padded_batch(stepper.spec.vocab_size, (9, 5), seed=1)
    want = stepper.start(ids, mask)[:, -1]
    rng = np.random.default_rng(2)
    with TensorRTBackend(out, bundle) as backend:
        cache = backend.empty_cache(2)
        pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
        got, cache = backend.forward(ids, mask, pos, cache)
        _close(got, want, "prefill logits")
        full_mask = mask
        for step in range(4):
            tok = rng.integers(0, stepper.spec.vocab_size, 2)
            want = stepper.step(tok)
            full_mask = np.concatenate([full_mask, np.ones((2, 1), np.int64)], 1)
            pos = full_mask.sum(1, keepdims=True) - 1
            got, cache = backend.forward(tok[:, None], full_mask, pos, cache)
            _close(got, want, f"decode step {step}")
        assert cache.length == ids.shape[1] + 4
        presents = backend.cache_to_numpy(cache)
        for i in range(stepper.spec.num_layers):
            _close(presents[2 * i], stepper.past[gc.past_key_name(i)], f"layer {i} key cache")
            _close(presents[2 * i + 1], stepper.past[gc.past_value_name(i)], f"layer {i} value cache")


def test_plain_run_matches_onnxruntime(built):
    from runtime.backends.tensorrt import TensorRTBackend

    bundle, out, _ = built
    stepper = OnnxStepper(bundle)
    ids, mask = left_padded_batch(stepper.spec.vocab_size, (7,), seed=3)
    feeds = {gc.INPUT_IDS: ids, gc.ATTENTION_MASK: mask, gc.POSITION_IDS: np.clip(np.cumsum(mask, 1) - 1, 0, None)}
    s = stepper.spec
    for i in range(s.num_layers):
        empty = np.zeros((1, s.num_kv_heads, 0, s.head_dim), np.float32)
        feeds[gc.past_key_name(i)] = feeds[gc.past_value_name(i)] = empty
    want = dict(zip(stepper.names, stepper.session.run(None, feeds)))
    with TensorRTBackend(out) as backend:
        got = backend.run(feeds)
    assert set(got) == set(want)
    for name in want:
        _close(got[name], want[name], name)


def test_steps_outside_the_profiles_are_refused(built):
    from runtime.backends.tensorrt import TensorRTBackend

    _, out, _ = built
    with TensorRTBackend(out) as backend:
        ids = np.ones((1, REQUEST.max_input_len + 1), np.int64)
        with pytest.raises(GenerationError, match="longer than the engine's max input length 16"):
            backend.forward(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], backend.empty_cache(1))


def test_engine_for_another_gpu_is_refused(built, tmp_path):
    from runtime.backends.tensorrt import TensorRTBackend

    _, out, record = built
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(out, moved)
    with open(os.path.join(moved, ENGINE_RECORD), "w") as f:
        json.dump(dict(record, compute_capability="1.0", gpu_name="an old GPU"), f)
    with pytest.raises(BackendError, match="rebuild the engine"):
        TensorRTBackend(moved)
