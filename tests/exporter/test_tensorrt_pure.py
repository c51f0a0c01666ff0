"""The TensorRT path without TensorRT: profiles, profile choice, the trtexec command, the graph check, the precision
plan, the engine record and the refusal of engines built elsewhere. Every function here is pure."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.tensorrt.check import check_for_tensorrt
from exporter.tensorrt.build import EngineOptions, PrecisionPlan, engine_record, precision_plan, tensorrt_available
from exporter.tensorrt.build import workspace_mib_from_gib
from exporter.tensorrt.trtexec import trtexec_command
from runtime import graph_contract as gc
from runtime.errors import BundleError, GenerationError, GlmExportError
from runtime.manifest import Manifest
from runtime.spec import ModelSpec
from runtime.tensorrt.engine_record import (
    ENGINE_FORMAT,
    compute_capability_text,
    engine_compatibility,
    engine_matches_bundle,
    gpu_name_text,
    major_minor,
)
from runtime.tensorrt.profiles import (
    EngineOptionError,
    Profile,
    ProfileRequest,
    profiles_for_generation,
    profiles_for_manifest,
    select_profile,
    shape_spec,
)

KV_HEADS, HEAD_DIM, VOCAB, HIDDEN = 2, 4, 11, 8


def _spec(num_layers: int = 2, max_positions: int = 64) -> ModelSpec:
    return ModelSpec(
        generation="chatglm3", num_layers=num_layers, hidden_size=HIDDEN, num_heads=2, num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM, ffn_hidden_size=16, vocab_size=VOCAB, norm_eps=1e-5, rotary_dim=2, rope_theta=10000.0,
        rope_position_scale=1.0, rope_scaling="none", qkv_bias=True, sandwich_norms=False, tie_word_embeddings=False,
        max_position_embeddings=max_positions, eos_token_ids=(2,), pad_token_id=0,
    )


def _manifest(precision: str = "fp32", num_layers: int = 2, max_positions: int = 64) -> Manifest:
    spec = _spec(num_layers, max_positions)
    kv = "float16" if precision == "fp16" else "float32"
    return Manifest(spec=spec, precision=precision, inputs=gc.graph_inputs(spec, kv), outputs=gc.graph_outputs(spec, kv))


# --------------------------------------------------------------------------------------------- profile request


@pytest.mark.parametrize(
    "kwargs, option",
    [
        (dict(max_batch=0, max_input_len=8, max_seq_len=16), "--max-batch must be at least 1"),
        (dict(max_batch=1, max_input_len=0, max_seq_len=16), "--max-input-len must be at least 1"),
        (dict(max_batch=1, max_input_len=8, max_seq_len=0), "--max-seq-len must be at least 1"),
        (dict(max_batch=1, max_input_len=8, max_seq_len=16, opt_batch=0), "--opt-batch must be at least 1"),
        (dict(max_batch=1, max_input_len=1, max_seq_len=1), "--max-seq-len must be at least 2"),
        (dict(max_batch=1, max_input_len=17, max_seq_len=16), "--max-input-len 17 is larger than --max-seq-len 16"),
        (dict(max_batch=2, max_input_len=8, max_seq_len=16, opt_batch=3), "--opt-batch 3 is larger than --max-batch 2"),
        (dict(max_batch=1, max_input_len=8, max_seq_len=16, opt_seq=9), "--opt-seq 9 is larger than --max-input-len 8"),
        (dict(max_batch=True, max_input_len=8, max_seq_len=16), "--max-batch must be a whole number"),
        (dict(max_batch=1, max_input_len=8.0, max_seq_len=16), "--max-input-len must be a whole number"),
    ],
)
def test_profile_request_refusals_name_the_option(kwargs, option):
    with pytest.raises(EngineOptionError) as e:
        ProfileRequest(**kwargs)
    assert option in str(e.value)
    assert isinstance(e.value, GlmExportError)


def test_opt_seq_defaults_to_half_the_input_length():
    assert ProfileRequest(1, 9, 16).prompt_opt == 4
    assert ProfileRequest(1, 1, 16).prompt_opt == 1
    assert ProfileRequest(1, 9, 16, opt_seq=7).prompt_opt == 7


# ---------------------------------------------------------------------------------------------------- profiles


def test_prefill_and_decode_profiles_cover_every_input_with_exact_shapes():
    manifest = _manifest(num_layers=2)
    profiles = profiles_for_manifest(manifest, ProfileRequest(max_batch=4, max_input_len=8, max_seq_len=32,
                                                              opt_batch=2, opt_seq=5))
    assert [p.name for p in profiles] == ["prefill", "decode"]
    prefill, decode = profiles
    names = [t.name for t in manifest.inputs]
    assert names[3:] == ["past_key_values.0.key", "past_key_values.0.value",
                         "past_key_values.1.key", "past_key_values.1.value"]
    for p in profiles:
        assert list(p.shapes) == names  # graph-input order, nothing missing, nothing extra
    assert prefill.dims == {"batch": (1, 2, 4), "seq": (1, 5, 8), "past": (0, 0, 24), "past_plus_seq": (1, 5, 32)}
    assert decode.dims == {"batch": (1, 2, 4), "seq": (1, 1, 1), "past": (1, 5, 31), "past_plus_seq": (2, 6, 32)}
    assert prefill.shapes["input_ids"] == ((1, 1), (2, 5), (4, 8))
    assert prefill.shapes["attention_mask"] == ((1, 1), (2, 5), (4, 32))
    assert prefill.shapes["past_key_values.1.value"] == ((1, 2, 0, 4), (2, 2, 0, 4), (4, 2, 24, 4))
    assert decode.shapes["position_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode.shapes["attention_mask"] == ((1, 2), (2, 6), (4, 32))
    assert decode.shapes["past_key_values.0.key"] == ((1, 2, 1, 4), (2, 2, 5, 4), (4, 2, 31, 4))


def test_max_input_equal_to_max_seq_keeps_a_valid_decode_profile():
    prefill, decode = profiles_for_generation(_manifest().inputs, ProfileRequest(1, 16, 16))
    assert prefill.dims["past"] == (0, 0, 0)  # a full-length prompt leaves no room for cached tokens
    assert prefill.dims["seq"] == (1, 8, 16)
    assert decode.dims["past"] == (1, 8, 15)
    assert decode.dims["past_plus_seq"] == (2, 9, 16)
    assert select_profile([prefill, decode], 1, 16, 0) == 0
    assert select_profile([prefill, decode], 1, 1, 15) == 1
    with pytest.raises(GenerationError, match="exceeds the engine's max sequence length 16"):
        select_profile([prefill, decode], 1, 1, 16)


def test_batch_one_profiles_refuse_a_second_row():
    profiles = profiles_for_generation(_manifest().inputs, ProfileRequest(1, 8, 16))
    assert all(p.dims["batch"] == (1, 1, 1) for p in profiles)
    assert profiles[0].shapes["input_ids"] == ((1, 1), (1, 4), (1, 8))
    with pytest.raises(GenerationError, match="batch of 2 rows is larger than the engine's max batch 1"):
        select_profile(profiles, 2, 1, 3)


def test_max_seq_len_beyond_the_model_context_is_refused():
    with pytest.raises(EngineOptionError, match="--max-seq-len 128 is longer than the model's context of 64"):
        profiles_for_manifest(_manifest(max_positions=64), ProfileRequest(1, 8, 128))


def test_an_unknown_symbolic_dim_is_refused():
    inputs = [gc.TensorSpec("input_ids", "int64", ("batch", "tokens"))]
    with pytest.raises(BundleError, match="'tokens'"):
        profiles_for_generation(inputs, ProfileRequest(1, 8, 16))


def test_profile_record_round_trip_and_bad_records():
    p = profiles_for_generation(_manifest().inputs, ProfileRequest(2, 8, 16))[1]
    again = Profile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p
    with pytest.raises(BundleError, match="malformed optimization profile"):
        Profile.from_dict({"name": "x", "dims": {"batch": [1, 2]}, "shapes": {}})
    with pytest.raises(ValueError, match="not 0 <= min <= opt <= max"):
        Profile(name="bad", dims={"seq": (4, 2, 8)}, shapes={})


# ------------------------------------------------------------------------------------------------ select_profile


@pytest.fixture
def prof():
    return profiles_for_generation(_manifest().inputs, ProfileRequest(4, 8, 32))  # prefill past <= 24


@pytest.mark.parametrize(
    "batch, seq, past, want",
    [
        (1, 8, 0, 0),  # a whole prompt from an empty cache
        (1, 1, 0, 0),  # a one-token prompt: decode needs at least one cached token
        (3, 3, 5, 0),  # a prompt chunk after an earlier chunk
        (1, 1, 5, 1),  # a decode step: both admit it, decode's narrower seq range wins
        (4, 1, 31, 1),  # the last position
        (2, 1, 25, 1),  # beyond prefill's past range
    ],
)
def test_select_profile_picks_the_profile_for_the_step(prof, batch, seq, past, want):
    assert select_profile(prof, batch, seq, past) == want


@pytest.mark.parametrize(
    "batch, seq, past, message",
    [
        (1, 9, 0, "a prompt of 9 tokens is longer than the engine's max input length 8"),
        (5, 1, 3, "batch of 5 rows is larger than the engine's max batch 4"),
        (1, 1, 32, "32 cached + 1 new tokens = 33 exceeds the engine's max sequence length 32"),
        (1, 4, 25, "a 4-token step after 25 cached tokens"),
        (0, 1, 1, "invalid step"),
    ],
)
def test_select_profile_refuses_steps_outside_every_profile(prof, batch, seq, past, message):
    with pytest.raises(GenerationError) as e:
        select_profile(prof, batch, seq, past)
    assert message in str(e.value)


def test_long_prompt_refusal_names_the_build_option(prof):
    with pytest.raises(GenerationError, match="--max-input-len 9"):
        select_profile(prof, 1, 9, 0)


# ------------------------------------------------------------------------------------------------------ trtexec


def _one_layer_profiles():
    inputs = [
        gc.TensorSpec("input_ids", "int64", ("batch", "seq")),
        gc.TensorSpec("attention_mask", "int64", ("batch", "past_plus_seq")),
        gc.TensorSpec("past_key_values.0.key", "float32", ("batch", 2, "past", 4)),
    ]
    return profiles_for_generation(inputs, ProfileRequest(max_batch=2, max_input_len=8, max_seq_len=16, opt_seq=4))


def test_trtexec_command_with_prefill_and_decode_profiles():
    cmd = trtexec_command("b/model.onnx", "out dir/engine.plan", _one_layer_profiles(), precision_plan("fp32", True),
                          workspace_mib=2048, timing_cache="t.cache", optimization_level=4)
    assert cmd.args == [
        "trtexec",
        "--onnx=b/model.onnx",
        "--saveEngine=out dir/engine.plan",
        "--fp16",
        "--profile=0",
        "--minShapes=input_ids:1x1,attention_mask:1x1,past_key_values.0.key:1x2x0x4",
        "--optShapes=input_ids:1x4,attention_mask:1x4,past_key_values.0.key:1x2x0x4",
        "--maxShapes=input_ids:2x8,attention_mask:2x16,past_key_values.0.key:2x2x8x4",
        "--profile=1",
        "--minShapes=input_ids:1x1,attention_mask:1x2,past_key_values.0.key:1x2x1x4",
        "--optShapes=input_ids:1x1,attention_mask:1x5,past_key_values.0.key:1x2x4x4",
        "--maxShapes=input_ids:2x1,attention_mask:2x16,past_key_values.0.key:2x2x15x4",
        "--memPoolSize=workspace:2048",
        "--timingCacheFile=t.cache",
        "--builderOptimizationLevel=4",
        "--skipInference",
    ]
    assert cmd.shell.startswith("trtexec --onnx=b/model.onnx '--saveEngine=out dir/engine.plan' --fp16 --profile=0 ")
    assert cmd.shell.endswith(" --memPoolSize=workspace:2048 --timingCacheFile=t.cache --builderOptimizationLevel=4"
                              " --skipInference")


def test_trtexec_precision_flags_follow_the_plan():
    profiles = _one_layer_profiles()
    strongly = trtexec_command("m.onnx", "e.plan", profiles, precision_plan("int8")).args
    assert "--stronglyTyped" in strongly and "--int8" not in strongly and "--fp16" not in strongly
    weak = trtexec_command("m.onnx", "e.plan", profiles, precision_plan("int8", fp16=True, strongly_typed=False)).args
    assert weak[3:5] == ["--int8", "--fp16"] and "--stronglyTyped" not in weak
    plain = trtexec_command("m.onnx", "e.plan", profiles, precision_plan("fp32")).args
    assert plain[3] == "--profile=0" and not any(a in plain for a in ("--fp16", "--int8", "--stronglyTyped"))
    exact = trtexec_command("m.onnx", "e.plan", profiles, precision_plan("fp32"), tf32=False).args
    assert exact[3:5] == ["--noTF32", "--profile=0"] and "--noTF32" not in plain


def test_trtexec_single_profile_needs_no_profile_index_and_quotes_odd_names():
    single = trtexec_command("m.onnx", "e.plan", _one_layer_profiles()[:1], PrecisionPlan(strongly_typed=True))
    assert single.args == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=e.plan", "--stronglyTyped",
        "--minShapes=input_ids:1x1,attention_mask:1x1,past_key_values.0.key:1x2x0x4",
        "--optShapes=input_ids:1x4,attention_mask:1x4,past_key_values.0.key:1x2x0x4",
        "--maxShapes=input_ids:2x8,attention_mask:2x16,past_key_values.0.key:2x2x8x4",
        "--skipInference",
    ]
    assert shape_spec([("in:0", (1, 3)), ("x", ())], quote_colons=True) == "'in:0':1x3,x:"
    for bad in ("a,b", "it's"):
        with pytest.raises(BundleError, match="trtexec cannot name the input"):
            shape_spec([(bad, (1,))], quote_colons=True)


# ---------------------------------------------------------------------------------------------- precision plan


@pytest.mark.parametrize(
    "precision, fp16, typed, strongly, flags",
    [
        ("fp32", False, None, False, ()),
        ("fp32", True, None, False, ("FP16",)),
        ("fp32", False, True, True, ()),
        ("fp16", False, None, True, ()),
        ("fp16", False, False, False, ("FP16",)),
        ("int8", False, None, True, ()),
        ("int8", False, False, False, ("INT8",)),
        ("int8", True, False, False, ("INT8", "FP16")),
        ("int4", False, None, True, ()),
    ],
)
def test_precision_plan(precision, fp16, typed, strongly, flags):
    plan = precision_plan(precision, fp16, typed)
    assert (plan.strongly_typed, plan.builder_flags) == (strongly, flags)


@pytest.mark.parametrize(
    "precision, fp16, typed, error, message",
    [
        ("int8-dynamic", False, None, EngineOptionError, "DynamicQuantizeLinear/MatMulInteger"),
        ("fp16", True, None, EngineOptionError, "this bundle is already fp16"),
        ("int8", True, None, EngineOptionError, "--fp16 cannot be combined with a strongly typed build"),
        ("fp32", True, True, EngineOptionError, "--fp16 cannot be combined with a strongly typed build"),
        ("bf16", False, None, BundleError, "precision 'bf16'"),
    ],
)
def test_precision_plan_refusals(precision, fp16, typed, error, message):
    with pytest.raises(error, match=message):
        precision_plan(precision, fp16, typed)


def test_engine_options_are_checked():
    request = ProfileRequest(1, 8, 16)
    with pytest.raises(EngineOptionError, match="--builder-opt-level must be 0..5, got 6"):
        EngineOptions(request, optimization_level=6)
    with pytest.raises(EngineOptionError, match="--workspace must be at least 1 MiB"):
        EngineOptions(request, workspace_mib=0)
    assert EngineOptions(request).optimization_level is None  # TensorRT's own default unless asked


def test_workspace_is_given_in_gib_and_kept_in_mib():
    assert workspace_mib_from_gib(None) is None
    assert workspace_mib_from_gib(2) == 2048
    assert workspace_mib_from_gib(0.5) == 512
    assert workspace_mib_from_gib(0.001) == 1
    with pytest.raises(EngineOptionError, match="--workspace is in GiB"):
        workspace_mib_from_gib(0.0001)


@pytest.mark.parametrize("precision, fix", [
    ("fp32", "build without --int8"),
    ("fp16", "build without --int8"),
    ("int4", "build without --int8"),
    ("int8-dynamic", "export a static Q/DQ INT8 bundle"),
])
def test_int8_flag_must_match_the_manifest(precision, fix):
    with pytest.raises(EngineOptionError) as e:
        precision_plan(precision, int8=True)
    assert f"manifest says {precision}" in str(e.value) and fix in str(e.value)


def test_int8_flag_on_an_int8_bundle_changes_nothing():
    assert precision_plan("int8", int8=True) == precision_plan("int8") == PrecisionPlan(strongly_typed=True)
    weak = precision_plan("int8", strongly_typed=False, int8=True)
    assert weak.builder_flags == ("INT8",)


# ------------------------------------------------------------------------------------------- engine record/compat


def _record(**overrides):
    manifest = _manifest()
    profiles = profiles_for_manifest(manifest, ProfileRequest(2, 8, 16))
    plan = precision_plan("fp32", fp16=True)
    record = engine_record(manifest, "ab" * 32, profiles, plan, EngineOptions(ProfileRequest(2, 8, 16)),
                           "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0", "cd" * 32, 1234, "/b")
    record.update(overrides)
    return json.loads(json.dumps(record)), profiles


def test_engine_record_holds_what_the_runtime_reads():
    record, profiles = _record()
    assert record["format"] == ENGINE_FORMAT and record["format_version"] == 1
    assert record["tensorrt_version"] == "10.13.0.35" and record["compute_capability"] == "9.0"
    assert record["builder_flags"] == ["FP16"] and record["strongly_typed"] is False
    assert record["builder_optimization_level"] == 3  # not given: TensorRT's default, recorded as its value
    assert record["source_manifest_sha256"] == "ab" * 32
    assert [Profile.from_dict(p) for p in record["profiles"]] == profiles
    assert [t["name"] for t in record["outputs"]][:2] == ["logits", "present.0.key"]
    assert engine_compatibility(record, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0") is None


def test_engine_compatibility_allows_a_patch_release_and_another_board_of_the_same_architecture():
    record, _ = _record()
    assert engine_compatibility(record, "10.13.2.6", "NVIDIA H200", "9.0") is None


@pytest.mark.parametrize(
    "here, overrides, message",
    [
        (("10.14.1.48", "NVIDIA H100 80GB HBM3", "9.0"), {}, "built with TensorRT 10.13.0.35 but TensorRT 10.14.1.48"),
        (("11.0.0", "NVIDIA H100 80GB HBM3", "9.0"), {}, "install TensorRT 10.13"),
        (("10.13.0.35", "NVIDIA GeForce RTX 4090", "8.9"), {}, "compute capability 9.0) but this GPU is NVIDIA GeForce"),
        (("10.13.0.35", "x", "9.0"), {"format": "something-else"}, "not a glm-export TensorRT engine record"),
        (("10.13.0.35", "x", "9.0"), {"format_version": 2}, "format_version 2"),
        (("10.13.0.35", "x", "9.0"), {"tensorrt_version": ""}, "no usable tensorrt_version"),
        (("10.13.0.35", "x", "9.0"), {"compute_capability": ""}, "no compute_capability recorded"),
        (("ten", "x", "9.0"), {}, "cannot tell the installed TensorRT version"),
    ],
)
def test_engine_compatibility_refusals_say_to_rebuild(here, overrides, message):
    record, _ = _record(**overrides)
    refusal = engine_compatibility(record, *here)
    assert refusal is not None and message in refusal
    if "installed TensorRT version" not in refusal:
        assert "rebuild" in refusal


def test_engine_must_come_from_this_bundle():
    record, _ = _record()
    assert engine_matches_bundle(record, "ab" * 32) is None
    refusal = engine_matches_bundle(record, "ef" * 32)
    assert refusal is not None and "another bundle" in refusal and "rebuild" in refusal


def test_version_and_gpu_text_helpers():
    assert major_minor("10.13.0.35") == (10, 13) and major_minor("10") is None and major_minor("a.b") is None
    assert compute_capability_text(8, 6) == "8.6"
    assert gpu_name_text(b"NVIDIA H200\x00\x00garbage") == "NVIDIA H200"
    assert gpu_name_text(" Orin ") == "Orin"


THE_COMMAND = "glm-export trt --model BUNDLE_DIR --out ENGINE_DIR"


def test_refusals_name_the_trt_command():
    """The build command is 'glm-export trt --model BUNDLE_DIR --out ENGINE_DIR' (there is no 'glm-export tensorrt')."""
    record, _ = _record(compute_capability="8.9")
    refusals = [
        engine_compatibility(record, "10.13.0.35", "NVIDIA H200", "9.0"),
        engine_matches_bundle(record, "ef" * 32),
    ]
    prof = profiles_for_generation(_manifest().inputs, ProfileRequest(4, 8, 32))
    for batch, seq, past in ((5, 1, 3), (1, 9, 0), (1, 1, 32)):
        with pytest.raises(GenerationError) as e:
            select_profile(prof, batch, seq, past)
        refusals.append(str(e.value))
    for refusal in refusals:
        assert refusal is not None and THE_COMMAND in refusal, refusal
        assert "glm-export tensorrt" not in refusal
    assert refusals[2].endswith(f"rebuild the engine with '{THE_COMMAND} --overwrite --max-batch 5'")


def test_chunk_after_too_many_cached_tokens_suggests_an_input_length_that_admits_it():
    prof = profiles_for_generation(_manifest().inputs, ProfileRequest(1, 24, 32))  # prefill past <= 8
    with pytest.raises(GenerationError) as e:
        select_profile(prof, 1, 4, 20)
    assert "a 4-token step after 20 cached tokens" in str(e.value) and "--max-input-len 12'" in str(e.value)
    rebuilt = profiles_for_generation(_manifest().inputs, ProfileRequest(1, 12, 32))
    assert select_profile(rebuilt, 1, 4, 20) == 0  # the suggested size admits the step


def test_engine_directory_errors_name_the_build_command(tmp_path):
    from runtime.backends.tensorrt import read_engine_record
    from runtime.errors import BackendError

    with pytest.raises(BackendError, match="no such engine directory") as e:
        read_engine_record(str(tmp_path / "missing"))
    assert THE_COMMAND in str(e.value)
    with pytest.raises(BackendError, match="engine.json: unreadable") as e:
        read_engine_record(str(tmp_path))  # e.g. a trtexec engine directory: engine.plan and no engine.json
    assert THE_COMMAND in str(e.value) and len(str(e.value).splitlines()) == 1
    (tmp_path / "engine.json").write_text("[1, 2]")
    with pytest.raises(BackendError, match="expected a JSON object"):
        read_engine_record(str(tmp_path))


def test_missing_tensorrt_and_cuda_python_name_what_to_install(tmp_path, monkeypatch):
    """The import checks, with the packages made unimportable (setting sys.modules[name] = None makes `import name`
    raise ImportError; no stand-in module is created)."""
    import sys

    from runtime.backends.tensorrt import TensorRTBackend, _cudart, import_tensorrt
    from runtime.errors import BackendError

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError) as e:
        import_tensorrt()
    assert str(e.value).startswith("the tensorrt package is not installed")
    assert "pip install tensorrt-cu12" in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(BackendError) as e:
        _cudart()
    assert str(e.value).startswith("cuda-python is not installed") and "pip install cuda-python" in str(e.value)
    # a backend checks engine.json first (no TensorRT needed for that), then tensorrt, then cuda-python
    record, _ = _record()
    (tmp_path / "engine.json").write_text(json.dumps(record))
    with pytest.raises(BackendError, match="the tensorrt package is not installed"):
        TensorRTBackend(str(tmp_path))


def test_tensorrt_available_reports_why_not():
    import importlib.util

    ok, why = tensorrt_available()
    if importlib.util.find_spec("tensorrt") is None:
        assert not ok and "tensorrt package is not installed" in why
    else:  # installed: either a usable TensorRT 10+ with its version, or a reason
        assert (ok and int(why.split(".")[0]) >= 10) or (not ok and "TensorRT" in why or "tensorrt" in why)


# ------------------------------------------------------------------------------------------- graph check (ONNX)

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _graph(nodes, extra_inits=(), opset=17, extra_inputs=(), extra_value_info=(), functions=(), domains=()):
    """A one-layer graph with our I/O names: embedding, K/V projection appended to the cache, LM head."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "wk"),
        numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], np.int64), "kv_shape"),
        *extra_inits,
    ]
    kv = ["batch", KV_HEADS, "past", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", I64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", I64, ["batch", "past_plus_seq"]),
        helper.make_tensor_value_info("position_ids", I64, ["batch", "seq"]),
        helper.make_tensor_value_info("past_key_values.0.key", F, kv),
        helper.make_tensor_value_info("past_key_values.0.value", F, kv),
        *extra_inputs,
    ]
    total = ["batch", KV_HEADS, "past_plus_seq", HEAD_DIM]
    outputs = [
        helper.make_tensor_value_info("logits", F, ["batch", "seq", VOCAB]),
        helper.make_tensor_value_info("present.0.key", F, total),
        helper.make_tensor_value_info("present.0.value", F, total),
    ]
    base = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "wk"], ["k_flat"], name="k_proj"),
        helper.make_node("Reshape", ["k_flat", "kv_shape"], ["k_4d"], name="k_reshape"),
        helper.make_node("Transpose", ["k_4d"], ["k_new"], perm=[0, 2, 1, 3], name="k_transpose"),
        helper.make_node("Concat", ["past_key_values.0.key", "k_new"], ["present.0.key"], axis=2, name="k_cat"),
        helper.make_node("Concat", ["past_key_values.0.value", "k_new"], ["present.0.value"], axis=2, name="v_cat"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=F, name="mask_cast"),
    ]
    graph = helper.make_graph(base + list(nodes), "g", inputs, outputs, inits, value_info=list(extra_value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _lm_head_fp32():
    w = numpy_helper.from_array(np.ones((HIDDEN, VOCAB), np.float32), "w_out")
    return [helper.make_node("MatMul", ["h", "w_out"], ["logits"], name="lm_head")], [w]


def _profiles_for(extra=()):
    inputs = gc.graph_inputs(_spec(num_layers=1)) + list(extra)
    return profiles_for_generation(inputs, ProfileRequest(2, 8, 16))


def test_clean_fp32_graph_with_our_names_passes():
    nodes, inits = _lm_head_fp32()
    model = _graph(nodes, inits)
    onnx.checker.check_model(model)
    report = check_for_tensorrt(model, _profiles_for())
    assert report.ok, report.text()
    assert report.opset == 17 and report.node_count == 8
    assert "no problems" in report.text()


def test_qdq_int8_graph_passes():
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zp")
    wq = numpy_helper.from_array(np.ones((HIDDEN, VOCAB), np.int8), "w_q")
    nodes = [
        helper.make_node("QuantizeLinear", ["h", "s", "zp"], ["h_q"], name="q_act"),
        helper.make_node("DequantizeLinear", ["h_q", "s", "zp"], ["h_dq"], name="dq_act"),
        helper.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["w_dq"], name="dq_w"),
        helper.make_node("MatMul", ["h_dq", "w_dq"], ["logits"], name="lm_head"),
    ]
    model = _graph(nodes, [scale, zero, wq])
    onnx.checker.check_model(model)
    report = check_for_tensorrt(model, _profiles_for())
    assert report.ok, report.text()


def test_float16_graph_passes():
    w16 = numpy_helper.from_array(np.ones((HIDDEN, VOCAB), np.float16), "w16")
    nodes = [
        helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16, name="to_fp16"),
        helper.make_node("MatMul", ["h16", "w16"], ["l16"], name="lm_head"),
        helper.make_node("Cast", ["l16"], ["logits"], to=F, name="to_fp32"),
    ]
    info = [helper.make_tensor_value_info("h16", TensorProto.FLOAT16, ["batch", "seq", HIDDEN])]
    model = _graph(nodes, [w16], extra_value_info=info)
    onnx.checker.check_model(model)
    assert check_for_tensorrt(model, _profiles_for()).ok


def test_com_microsoft_op_is_flagged_by_name():
    nodes, inits = _lm_head_fp32()
    nodes.append(helper.make_node("FusedMatMul", ["h", "w_out"], ["extra"], name="fused_1", domain="com.microsoft"))
    report = check_for_tensorrt(_graph(nodes, inits, domains=["com.microsoft"]))
    [problem] = report.problems
    assert problem.kind == "domain" and "fused_1" in problem.where and "com.microsoft::FusedMatMul" in problem.where
    assert "com.microsoft" in problem.why and not report.ok


def test_float64_tensor_and_cast_are_flagged():
    nodes, inits = _lm_head_fp32()
    nodes.append(helper.make_node("Cast", ["h"], ["h64"], to=TensorProto.DOUBLE, name="to_double"))
    inits.append(numpy_helper.from_array(np.ones(3, np.float64), "table64"))
    report = check_for_tensorrt(_graph(nodes, inits))
    dtype = report.of_kind("dtype")
    assert {p.where for p in dtype} == {"node 'to_double' (Cast)", "initializer 'table64'"}
    assert all("float64" in p.why for p in dtype)


def test_unknown_listed_unsupported_and_too_new_ops_are_flagged():
    nodes, inits = _lm_head_fp32()
    nodes += [
        helper.make_node("FancyRotary", ["h"], ["a"], name="mystery"),
        helper.make_node("MatMulInteger", ["input_ids", "input_ids"], ["b"], name="mmi"),
        helper.make_node("Attention", ["h", "h", "h"], ["c"], name="attn"),
    ]
    model = _graph(nodes, inits, opset=23)
    old = {p.where: p.why for p in check_for_tensorrt(model, trt_version="10.13.0.35").of_kind("op")}
    assert old == {
        "node 'mystery' (FancyRotary)": "FancyRotary is not in TensorRT's ONNX operator support list",
        "node 'mmi' (MatMulInteger)": "MatMulInteger is listed as unsupported by TensorRT's ONNX parser",
        "node 'attn' (Attention)": "Attention needs TensorRT 10.14 or newer",
    }
    new = check_for_tensorrt(model, trt_version="10.15.1").of_kind("op")
    assert {p.where for p in new} == {"node 'mystery' (FancyRotary)", "node 'mmi' (MatMulInteger)"}


def test_old_opset_is_flagged():
    nodes, inits = _lm_head_fp32()
    report = check_for_tensorrt(_graph(nodes, inits, opset=13))
    [problem] = report.problems
    assert problem.kind == "opset" and "opset 13 is older than 17" in problem.why


def test_dynamic_input_dims_not_covered_by_the_profiles_are_flagged():
    nodes, inits = _lm_head_fp32()
    extra = helper.make_tensor_value_info("token_type_ids", I64, ["batch", "seq"])
    model = _graph(nodes, inits, extra_inputs=[extra])
    report = check_for_tensorrt(model, _profiles_for())
    assert {(p.kind, p.where) for p in report.problems} == {("dynamic-dim", "input 'token_type_ids'")}
    assert len(report.problems) == 2  # once per profile
    assert "profile 'prefill' leaves unset" in report.problems[0].why
    assert "(batch, seq)" in report.problems[0].why
    covered = _profiles_for([gc.TensorSpec("token_type_ids", "int64", ("batch", "seq"))])
    assert check_for_tensorrt(model, covered).ok


def test_profile_that_contradicts_a_static_dim_or_names_a_missing_input_is_flagged():
    nodes, inits = _lm_head_fp32()
    wrong = gc.graph_inputs(_spec(num_layers=1))
    wrong[3] = gc.TensorSpec("past_key_values.0.key", "float32", ("batch", 3, "past", HEAD_DIM))
    wrong.append(gc.TensorSpec("ghost", "int64", ("batch",)))
    profiles = profiles_for_generation(wrong, ProfileRequest(2, 8, 16))
    report = check_for_tensorrt(_graph(nodes, inits), profiles)
    whys = [p.why for p in report.of_kind("profile")]
    assert "gives shapes for 'ghost', which the graph lacks" in whys
    assert "axis 1 is fixed at 2 but profile 'decode' ranges it 3..3" in whys


def test_asymmetric_or_nonzero_zero_points_are_flagged():
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zp_u8 = numpy_helper.from_array(np.array(128, np.uint8), "zp_u8")
    zp_i8 = numpy_helper.from_array(np.array(3, np.int8), "zp_i8")
    nodes, inits = _lm_head_fp32()
    nodes += [
        helper.make_node("QuantizeLinear", ["h", "s", "zp_u8"], ["hq"], name="q_uint8"),
        helper.make_node("QuantizeLinear", ["h", "s", "zp_i8"], ["hq2"], name="q_shifted"),
    ]
    report = check_for_tensorrt(_graph(nodes, inits + [scale, zp_u8, zp_i8]))
    q = {p.where: p.why for p in report.of_kind("quantization")}
    assert "uint8 (asymmetric quantization)" in q["node 'q_uint8' (QuantizeLinear)"]
    assert "not all zeros" in q["node 'q_shifted' (QuantizeLinear)"]


def test_local_functions_and_subgraphs_are_looked_into():
    body_ok = [helper.make_node("Relu", ["x"], ["y"], name="inner_relu")]
    body_bad = [helper.make_node("Unique", ["x"], ["y"], name="inner_unique")]
    f_ok = helper.make_function("local", "Act", ["x"], ["y"], body_ok, [helper.make_opsetid("", 17)])
    f_bad = helper.make_function("local", "Uniq", ["x"], ["y"], body_bad, [helper.make_opsetid("", 17)])
    then_graph = helper.make_graph([helper.make_node("NonExistentOp", [], ["t"], name="in_then")], "then", [],
                                   [helper.make_tensor_value_info("t", F, [1])])
    else_graph = helper.make_graph([helper.make_node("Constant", [], ["e"], name="in_else",
                                                     value=numpy_helper.from_array(np.ones(1, np.float32)))],
                                   "else", [], [helper.make_tensor_value_info("e", F, [1])])
    nodes, inits = _lm_head_fp32()
    nodes += [
        helper.make_node("Act", ["h"], ["a"], name="call_ok", domain="local"),
        helper.make_node("Uniq", ["h"], ["u"], name="call_bad", domain="local"),
        helper.make_node("Cast", ["attention_mask"], ["cond"], to=TensorProto.BOOL, name="to_bool"),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph, name="branch"),
    ]
    report = check_for_tensorrt(_graph(nodes, inits, functions=[f_ok, f_bad], domains=["local"]))
    wheres = sorted(p.where for p in report.problems)
    assert wheres == [
        "node 'branch' (If) > node 'in_then' (NonExistentOp)",
        "node 'call_bad' (local::Uniq) > node 'inner_unique' (Unique)",
    ]


def test_real_exported_bundle_passes_the_check(tiny_models):
    _, bundle = tiny_models.case("chatglm3-thudm-hd32")
    from runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    profiles = profiles_for_manifest(manifest, ProfileRequest(2, 16, 64))
    report = check_for_tensorrt(f"{bundle}/{manifest.model_file}", profiles, trt_version="10.0")
    assert report.ok, report.text()
    assert report.node_count > 50
