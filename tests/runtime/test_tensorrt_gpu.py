"""TensorRT on a GPU: build an engine from a tiny exported bundle, run prefill and cached decode steps through the
TensorRT backend, and compare with onnxruntime on the same bundle: the backend directly, then greedy generation through
``GlmModel.load(..., backend="tensorrt")`` and ``glm-export run --backend tensorrt``. Logits must agree within the
``tensorrt_vs_onnx`` row of runtime/tolerances.py. Skipped, with the reason, where TensorRT or a CUDA GPU is missing."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from exporter.tensorrt.build import EngineOptions, engine_from_bundle, tensorrt_available
from onnx_steps import OnnxStepper, left_padded_batch
from runtime import graph_contract as gc
from runtime.errors import BackendError, GenerationError
from runtime.sampling import GenerationConfig
from runtime.tolerances import allowed_diff
from runtime.tensorrt.engine_record import ENGINE_PLAN, ENGINE_RECORD, engine_compatibility
from runtime.tensorrt.profiles import ProfileRequest

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
    result = engine_from_bundle(bundle, out, EngineOptions(REQUEST, tf32=False))
    assert result.engine_dir == out and result.to_dict()["profiles"] == ["prefill", "decode"]
    return bundle, out, result.record


def _close(got, want, what):
    tol = allowed_diff("tensorrt_vs_onnx", "fp32", float(np.abs(want).max()))
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


def _prompts(spec, lengths, seed):
    forbidden = set(spec.eos_token_ids) | set(spec.special_tokens.values())
    pool = np.array([i for i in range(spec.vocab_size) if i not in forbidden])
    rng = np.random.default_rng(seed)
    return [rng.choice(pool, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models(built):
    from runtime.api import GlmModel

    bundle, out, _ = built
    with GlmModel.load(bundle, backend="tensorrt", engine_dir=out) as trt_model:
        with GlmModel.load(bundle, threads=1) as ort_model:
            yield trt_model, ort_model


def test_glm_model_on_the_engine_generates_what_onnxruntime_generates(models):
    from runtime.generate import decode_step, left_pad, prefill

    trt_model, ort_model = models
    assert trt_model.backend_name == "tensorrt" and ort_model.backend_name == "onnxruntime"
    assert trt_model.context_length == REQUEST.max_seq_len  # the engine's, not the model's 2048
    assert trt_model.prefill_chunk is None  # the whole prompt in one forward: the prefill profile
    prompts = _prompts(trt_model.spec, (9, 5), seed=4)
    config = GenerationConfig(max_new_tokens=12, eos_token_ids=())
    got, want = trt_model.generate(prompts, config), ort_model.generate(prompts, config)
    assert [r.generated_ids for r in got] == [r.generated_ids for r in want]
    assert all(len(r.generated_ids) == 12 and r.finish_reason == "length" for r in got)

    # the logits along that path, step by step, on both backends
    ids, mask, pos = left_pad(prompts, trt_model.spec.pad_token_id)
    lt, ct = prefill(trt_model.backend, ids, mask, pos, None)
    lo, co = prefill(ort_model.backend, ids, mask, pos, None)
    _close(lt, lo, "prefill logits")
    tokens = np.array([r.generated_ids for r in want], dtype=np.int64)
    next_pos = np.array([len(p) for p in prompts], dtype=np.int64)
    for step in range(tokens.shape[1] - 1):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        lt, ct = decode_step(trt_model.backend, tokens[:, step], mask, next_pos, ct)
        lo, co = decode_step(ort_model.backend, tokens[:, step], mask, next_pos, co)
        _close(lt, lo, f"decode step {step}")
        next_pos = next_pos + 1

    # the row that stays after the other finishes: select_rows copies it on the device
    ct, co = trt_model.backend.select_rows(ct, np.array([1])), ort_model.backend.select_rows(co, np.array([1]))
    assert (ct.batch, ct.length) == (co.batch, co.length) == (1, ids.shape[1] + tokens.shape[1] - 1)
    for a, b in zip(trt_model.backend.cache_to_numpy(ct), ort_model.backend.cache_to_numpy(co)):
        _close(a, b, "selected cache row")
    mask = np.concatenate([mask[1:], np.ones((1, 1), np.int64)], 1)
    lt, _ = decode_step(trt_model.backend, tokens[1:, -1], mask, next_pos[1:], ct)
    lo, _ = decode_step(ort_model.backend, tokens[1:, -1], mask, next_pos[1:], co)
    _close(lt, lo, "decode step after select_rows")


def test_engine_generation_ends_at_the_engine_context_and_refuses_long_prompts(models):
    trt_model, _ = models
    prompt = _prompts(trt_model.spec, (10,), seed=5)[0]
    res = trt_model.generate(prompt, GenerationConfig(max_new_tokens=100, eos_token_ids=()))
    assert res.finish_reason == "context" and len(prompt) + len(res.generated_ids) == REQUEST.max_seq_len
    too_long = _prompts(trt_model.spec, (REQUEST.max_input_len + 1,), seed=6)[0]
    with pytest.raises(GenerationError, match="longer than the engine's max input length 16"):
        trt_model.generate(too_long, GenerationConfig(max_new_tokens=2))
    with pytest.raises(GenerationError, match="larger than the engine's max batch 2"):
        trt_model.generate(_prompts(trt_model.spec, (3, 3, 3), seed=7), GenerationConfig(max_new_tokens=2))


def test_engine_with_a_prefill_chunk_the_profiles_take(built, models):
    from runtime.api import GlmModel

    bundle, out, _ = built
    _, ort_model = models
    prompts = _prompts(ort_model.spec, (13, 6), seed=8)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    with GlmModel.load(bundle, backend="tensorrt", engine_dir=out, prefill_chunk=4) as chunked:
        assert chunked.prefill_chunk == 4  # steps after 4, 8, 12 cached tokens: the prefill profile takes <= 32
        got = chunked.generate(prompts, config)
    assert [r.generated_ids for r in got] == [r.generated_ids for r in ort_model.generate(prompts, config)]


def test_engine_from_another_bundle_is_refused(built, tmp_path):
    from runtime.api import GlmModel

    bundle, out, _ = built
    other = str(tmp_path / "other")
    shutil.copytree(bundle, other)
    with open(os.path.join(other, "manifest.json"), "a") as f:
        f.write("\n")  # same contents as JSON, another sha256
    with pytest.raises(BackendError, match="built from another bundle"):
        GlmModel.load(other, backend="tensorrt", engine_dir=out)


def test_cli_run_on_the_engine(built, models):
    from click.testing import CliRunner

    from exporter.cli import main

    bundle, out, _ = built
    _, ort_model = models
    prompt = _prompts(ort_model.spec, (7,), seed=9)[0]
    args = ["run", "--model", bundle, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8", "--json"]
    r = CliRunner().invoke(main, args + ["--backend", "tensorrt", "--engine", out], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    want = ort_model.generate(prompt, GenerationConfig(max_new_tokens=8))
    assert json.loads(r.stdout)["generated_ids"] == want.generated_ids
