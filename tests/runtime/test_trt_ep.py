"""onnxruntime's TensorRT execution provider options (runtime.tensorrt.ep_options): one envelope profile over prefill and decode,
the option names and value formats, precision switches, and the refusals. Pure: no onnxruntime-gpu, no TensorRT."""
from __future__ import annotations

import importlib.util
import itertools
import os

import pytest

from runtime import graph_contract as gc
from runtime.errors import GenerationError, GlmExportError
from runtime.manifest import Manifest
from runtime.spec import ModelSpec
from runtime.tensorrt.ep_options import tensorrt_ep_options
from runtime.tensorrt.profiles import (
    EngineOptionError,
    ProfileRequest,
    envelope_profile,
    profiles_for_generation,
    request_with_defaults,
    select_profile,
    shape_spec,
)

KV_HEADS, HEAD_DIM = 2, 4
SHAPE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def _manifest(precision: str = "fp32", num_layers: int = 2, max_positions: int = 64) -> Manifest:
    spec = ModelSpec(
        generation="chatglm3", num_layers=num_layers, hidden_size=8, num_heads=2, num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM, ffn_hidden_size=16, vocab_size=11, norm_eps=1e-5, rotary_dim=2, rope_theta=10000.0,
        rope_position_scale=1.0, rope_scaling="none", qkv_bias=True, sandwich_norms=False, tie_word_embeddings=False,
        max_position_embeddings=max_positions, eos_token_ids=(2,), pad_token_id=0,
    )
    kv = "float16" if precision == "fp16" else "float32"
    return Manifest(spec=spec, precision=precision, inputs=gc.graph_inputs(spec, kv),
                    outputs=gc.graph_outputs(spec, kv))


REQUEST = ProfileRequest(max_batch=4, max_input_len=8, max_seq_len=32, opt_batch=2, opt_seq=5)


def _parse(spec: str):
    """The provider's parser (ParseProfileShapes): split on ',', then 'name:dims', dims on 'x'; a repeated name
    would be a second profile."""
    out = {}
    for item in spec.split(","):
        name, _, dims = item.partition(":")
        out.setdefault(name, []).append(tuple(int(d) for d in dims.split("x")))
    return out


def test_fp32_options_with_cache_and_fp16_are_exact():
    options = tensorrt_ep_options(_manifest(num_layers=1), REQUEST, fp16=True, cache_dir="/var/cache/glm")
    assert options == {
        "device_id": "0",
        "trt_fp16_enable": "True",
        "trt_int8_enable": "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": "/var/cache/glm",
        # envelope: batch 1..4 (opt 2), seq 1..8 (decode opt 1), past 0..31 (decode opt 5), past_plus_seq 1..32 (opt 6)
        "trt_profile_min_shapes": "input_ids:1x1,attention_mask:1x1,position_ids:1x1,"
                                  "past_key_values.0.key:1x2x0x4,past_key_values.0.value:1x2x0x4",
        "trt_profile_opt_shapes": "input_ids:2x1,attention_mask:2x6,position_ids:2x1,"
                                  "past_key_values.0.key:2x2x5x4,past_key_values.0.value:2x2x5x4",
        "trt_profile_max_shapes": "input_ids:4x8,attention_mask:4x32,position_ids:4x8,"
                                  "past_key_values.0.key:4x2x31x4,past_key_values.0.value:4x2x31x4",
    }
    assert all(isinstance(v, str) for v in options.values())  # onnxruntime takes string values


def test_one_profile_naming_every_graph_input_once_in_graph_order():
    manifest = _manifest(num_layers=3)
    options = tensorrt_ep_options(manifest, REQUEST)
    names = [t.name for t in manifest.inputs]
    for key in SHAPE_KEYS:
        parsed = _parse(options[key])
        assert list(parsed) == names
        assert all(len(shapes) == 1 for shapes in parsed.values()), "a repeated name would open a second profile"
    assert _parse(options["trt_profile_max_shapes"])["past_key_values.2.value"] == [(4, KV_HEADS, 31, HEAD_DIM)]


def test_envelope_admits_every_step_either_generation_profile_admits():
    inputs = _manifest().inputs
    pair = profiles_for_generation(inputs, REQUEST)
    envelope = envelope_profile(inputs, REQUEST)
    admitted = 0
    for batch, seq, past in itertools.product(range(1, 6), range(1, 10), range(0, 34)):
        try:
            select_profile(pair, batch, seq, past)
        except GenerationError:
            continue
        admitted += 1
        assert envelope.admits(batch, seq, past), (batch, seq, past)
    assert admitted > 500
    for dim in envelope.dims:  # and it is no wider than the two together
        assert envelope.dims[dim][0] == min(p.dims[dim][0] for p in pair)
        assert envelope.dims[dim][2] == max(p.dims[dim][2] for p in pair)


def test_opt_sizes_follow_the_profile_tuned_for():
    inputs = _manifest().inputs
    decode = envelope_profile(inputs, REQUEST)
    prefill = envelope_profile(inputs, REQUEST, tune_for="prefill")
    assert decode.dims == {"batch": (1, 2, 4), "seq": (1, 1, 8), "past": (0, 5, 31), "past_plus_seq": (1, 6, 32)}
    assert prefill.dims == {"batch": (1, 2, 4), "seq": (1, 5, 8), "past": (0, 0, 31), "past_plus_seq": (1, 5, 32)}
    assert prefill.shapes["input_ids"][1] == (2, 5)
    with pytest.raises(ValueError, match="tune_for"):
        envelope_profile(inputs, REQUEST, tune_for="both")


@pytest.mark.parametrize("precision, fp16, want_fp16, want_int8", [
    ("fp32", False, "False", "False"),
    ("fp32", True, "True", "False"),
    ("fp16", False, "True", "False"),  # fp16 tensors need the FP16 flag in the provider's weakly typed builds
    ("int8", False, "False", "True"),
    ("int8", True, "True", "True"),
])
def test_precision_switches(precision, fp16, want_fp16, want_int8):
    options = tensorrt_ep_options(_manifest(precision), REQUEST, fp16=fp16)
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (want_fp16, want_int8)


def test_fp16_bundle_profiles_are_the_same_shapes():
    a = tensorrt_ep_options(_manifest("fp32"), REQUEST)
    b = tensorrt_ep_options(_manifest("fp16"), REQUEST)
    assert all(a[k] == b[k] for k in SHAPE_KEYS)


def test_optional_settings_appear_only_when_given():
    plain = tensorrt_ep_options(_manifest(), REQUEST)
    assert not any(k.startswith(("trt_engine_cache", "trt_max_workspace", "trt_builder")) for k in plain)
    tuned = tensorrt_ep_options(_manifest(), REQUEST, device_id=1, workspace_mib=1536, builder_opt_level=5)
    assert tuned["device_id"] == "1"
    assert tuned["trt_max_workspace_size"] == str(1536 * 2**20)
    assert tuned["trt_builder_optimization_level"] == "5"


@pytest.mark.parametrize("precision", ["int8-dynamic", "int4"])
def test_bundles_with_non_tensorrt_quantized_ops_are_refused(precision):
    with pytest.raises(EngineOptionError) as e:
        tensorrt_ep_options(_manifest(precision), REQUEST)
    assert f"a {precision} bundle cannot run on onnxruntime's TensorRT execution provider" in str(e.value)
    assert isinstance(e.value, GlmExportError)


@pytest.mark.parametrize("kwargs, message", [
    (dict(workspace_mib=0), "--workspace must be at least 1 MiB"),
    (dict(builder_opt_level=6), "--builder-opt-level must be 0..5, got 6"),
    (dict(device_id=-1), "device id must be a whole number >= 0"),
    (dict(device_id=True), "device id must be a whole number >= 0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(EngineOptionError, match=message):
        tensorrt_ep_options(_manifest(), REQUEST, **kwargs)


def test_sequence_longer_than_the_model_context_is_refused():
    with pytest.raises(EngineOptionError, match="--max-seq-len 128 is longer than the model's context of 64"):
        tensorrt_ep_options(_manifest(max_positions=64), ProfileRequest(1, 8, 128))


def test_shape_spec_format_and_names_it_cannot_express():
    assert shape_spec([("input_ids", (1, 8)), ("past_key_values.0.key", (1, 2, 0, 4))]) == \
        "input_ids:1x8,past_key_values.0.key:1x2x0x4"
    for bad in ("a:b", "a,b"):
        with pytest.raises(GlmExportError, match="cannot express"):
            shape_spec([(bad, (1,))])


def test_request_defaults():
    r = request_with_defaults(8192)
    assert (r.max_batch, r.max_input_len, r.max_seq_len, r.opt_batch, r.prompt_opt) == (1, 1024, 2048, 1, 512)
    short = request_with_defaults(512)
    assert (short.max_input_len, short.max_seq_len) == (256, 512)
    given = request_with_defaults(8192, max_batch=2, max_seq_len=100, opt_seq=7)
    assert (given.max_batch, given.max_input_len, given.max_seq_len, given.prompt_opt) == (2, 50, 100, 7)
    with pytest.raises(EngineOptionError, match="--max-batch must be at least 1, got 0"):
        request_with_defaults(8192, max_batch=0)  # 0 is a value, not "not given"


# ------------------------------------------------------------ --provider tensorrt in the onnxruntime backend (pure)


def test_provider_config_cpu_and_cuda():
    from runtime.backends.onnxruntime import provider_config

    assert provider_config("cpu") == (["CPUExecutionProvider"], [{}])
    assert provider_config("cuda:1") == (["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": "1"}, {}])


def test_provider_config_tensorrt_passes_the_ep_options():
    from runtime.backends.onnxruntime import provider_config
    from runtime.tensorrt.ep_options import TrtProviderOptions

    manifest = _manifest(num_layers=2)
    trt = TrtProviderOptions(max_batch=4, max_input_len=8, max_seq_len=32, opt_batch=2, opt_seq=5, fp16=True,
                             cache_dir="/var/cache/glm", builder_opt_level=2)
    providers, options = provider_config("tensorrt:1", manifest, trt)
    assert providers == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options[0] == tensorrt_ep_options(manifest, REQUEST, fp16=True, cache_dir="/var/cache/glm", device_id=1,
                                             builder_opt_level=2)
    assert options[0]["trt_engine_cache_path"] == "/var/cache/glm" and options[0]["trt_fp16_enable"] == "True"
    assert _parse(options[0]["trt_profile_max_shapes"])["attention_mask"] == [(4, 32)]
    assert options[1:] == [{"device_id": "1"}, {}]
    assert all(isinstance(v, str) for o in options for v in o.values())


def test_provider_config_tensorrt_defaults_cover_the_model_context():
    from runtime.backends.onnxruntime import provider_config

    _, options = provider_config("tensorrt", _manifest(max_positions=64))
    # defaults: batch 1, sequence min(2048, 64) = 64, prompt 32; no cache dir, no FP16 on an fp32 bundle
    assert _parse(options[0]["trt_profile_max_shapes"])["input_ids"] == [(1, 32)]
    assert _parse(options[0]["trt_profile_max_shapes"])["attention_mask"] == [(1, 64)]
    assert options[0]["trt_fp16_enable"] == "False" and "trt_engine_cache_path" not in options[0]
    assert options[0]["device_id"] == "0"


def test_provider_config_refusals():
    from runtime.backends.onnxruntime import provider_config
    from runtime.errors import BackendError
    from runtime.tensorrt.ep_options import TrtProviderOptions

    with pytest.raises(BackendError, match="needs the bundle's manifest"):
        provider_config("tensorrt")
    with pytest.raises(BackendError, match="trt_options: options of onnxruntime's TensorRT execution provider; add "
                                           "provider='tensorrt'"):
        provider_config("cuda", _manifest(), TrtProviderOptions(fp16=True))
    with pytest.raises(BackendError, match="unknown provider"):
        provider_config("tensorrtx", _manifest())
    with pytest.raises(EngineOptionError, match="a int4 bundle cannot run"):
        provider_config("tensorrt", _manifest("int4"))
    with pytest.raises(EngineOptionError, match="--max-seq-len 128 is longer than the model's context of 64"):
        provider_config("tensorrt", _manifest(max_positions=64), TrtProviderOptions(max_seq_len=128))


def test_provider_options_object_request_and_profile():
    from runtime.tensorrt.ep_options import TrtProviderOptions

    manifest = _manifest(max_positions=64)
    trt = TrtProviderOptions(max_batch=2, max_seq_len=40)
    assert trt.request(manifest) == ProfileRequest(max_batch=2, max_input_len=20, max_seq_len=40)
    profile = trt.profile(manifest)
    assert profile.dims == envelope_profile(manifest.inputs, trt.request(manifest)).dims
    assert (profile.max_of("batch"), profile.max_of("seq"), profile.max_of("past_plus_seq")) == (2, 20, 40)


def test_plan_limits_per_backend():
    from runtime.api import AUTO, plan_limits
    from runtime.generate import DEFAULT_PREFILL_CHUNK
    from runtime.tensorrt.ep_options import TrtProviderOptions

    manifest = _manifest(max_positions=1024)
    # onnxruntime on cpu/cuda: no profile, the model's context; 0 means the whole prompt (None)
    assert plan_limits(1024, AUTO) == (DEFAULT_PREFILL_CHUNK, 1024)
    assert plan_limits(1024, 0) == (None, 1024) and plan_limits(1024, 7) == (7, 1024)
    # the TensorRT provider: auto chunk at most the profile's input length; context = its max sequence
    envelope = [TrtProviderOptions(max_input_len=100, max_seq_len=300).profile(manifest)]
    assert plan_limits(1024, AUTO, envelope) == (100, 300)
    big = [TrtProviderOptions(max_input_len=512, max_seq_len=1024).profile(manifest)]
    assert plan_limits(1024, AUTO, big) == (DEFAULT_PREFILL_CHUNK, 1024)
    # a native engine: auto is the whole prompt; a chunk must fit its prefill profile's past range
    pair = profiles_for_generation(manifest.inputs, ProfileRequest(max_batch=1, max_input_len=24, max_seq_len=32))
    assert plan_limits(1024, AUTO, pair, native=True) == (None, 32)
    assert plan_limits(1024, 0, pair, native=True) == (None, 32)
    assert plan_limits(1024, 1, pair, native=True) == (1, 32)  # one token at a time: the decode profile
    # the prefill profile takes at most 32 - 24 = 8 cached tokens, so a 24-token prompt in chunks of 8 cannot run
    with pytest.raises(GenerationError, match="prefill chunk 8 does not fit the engine: .*8-token step after 16"):
        plan_limits(1024, 8, pair, native=True)
    roomy = profiles_for_generation(manifest.inputs, ProfileRequest(max_batch=1, max_input_len=8, max_seq_len=32))
    assert plan_limits(1024, 3, roomy, native=True) == (3, 32)  # past 3, 6 <= 24


def _chunked_steps_run(profiles, n, chunk):
    """Whether every forward of a chunked prefill of an n-token prompt lies in some profile (select_profile)."""
    past = 0
    while past < n:
        seq = min(chunk, n - past)
        try:
            select_profile(profiles, 1, seq, past)
        except GenerationError:
            return False
        past += seq
    return True


@pytest.mark.parametrize("max_input_len, max_seq_len", [(8, 32), (24, 32), (16, 48), (31, 32)])
def test_prefill_chunk_refusal_agrees_with_select_profile(max_input_len, max_seq_len):
    from runtime.tensorrt.profiles import prefill_chunk_refusal

    pair = profiles_for_generation(_manifest().inputs, ProfileRequest(1, max_input_len, max_seq_len))
    assert prefill_chunk_refusal(pair, None) is None and prefill_chunk_refusal(pair, 0) is None
    verdicts = []
    for chunk in range(1, max_input_len + 2):
        fits = prefill_chunk_refusal(pair, chunk) is None
        every_prompt_runs = all(_chunked_steps_run(pair, n, chunk) for n in range(1, max_input_len + 1))
        assert fits == every_prompt_runs, (chunk, prefill_chunk_refusal(pair, chunk))
        verdicts.append(fits)
    assert verdicts[0] and verdicts[-1]  # one token at a time (decode profile) and whole prompts always run
    if max_seq_len - max_input_len < max_input_len - 1:
        assert not all(verdicts)  # the prefill profile's past range is too short for some chunks


def test_provider_profile_refusal_names_the_run_option():
    from runtime.backends.onnxruntime import _reload_with
    from runtime.tensorrt.ep_options import TrtProviderOptions

    profile = TrtProviderOptions(max_batch=2, max_input_len=8, max_seq_len=32).profile(_manifest())
    kwargs = dict(owner="the TensorRT provider profile's", remedy=_reload_with)
    with pytest.raises(GenerationError) as e:
        select_profile([profile], 3, 1, 4, **kwargs)
    assert str(e.value) == ("batch of 3 rows is larger than the TensorRT provider profile's max batch 2; load the "
                            "model with --max-batch 3 (TrtProviderOptions in the Python API)")
    with pytest.raises(GenerationError, match="31 cached \\+ 2 new tokens = 33 exceeds the TensorRT provider"):
        select_profile([profile], 1, 2, 31, **kwargs)
    assert select_profile([profile], 2, 8, 24, **kwargs) == 0  # past 24 with 8 new tokens: inside the envelope


# ----------------------------------------------------------------------------------- docs/memory_table.py (Jetson)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def memory_table():
    spec = importlib.util.spec_from_file_location("memory_table", os.path.join(ROOT, "docs", "memory_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count_from_config(cfg):
    """The parameter count written out from the THUDM config fields, independently of ModelSpec."""
    h, layers, heads, kv, d = (cfg["hidden_size"], cfg["num_layers"], cfg["num_attention_heads"],
                               cfg["multi_query_group_num"], cfg["kv_channels"])
    ffn, vocab = cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv = (heads + 2 * kv) * d
    per_layer = h * qkv + qkv + heads * d * h + h * 2 * ffn + ffn * h + 2 * h  # qkv (+bias), dense, mlp, 2 norms
    return vocab * h + layers * per_layer + h + vocab * h  # embedding, layers, final norm, output layer


@pytest.mark.parametrize("generation, params, kv_per_token", [
    ("chatglm3", 6_243_584_000, 2 * 28 * 2 * 128 * 2),
    ("glm4", 9_399_951_360, 2 * 40 * 2 * 128 * 2),
])
def test_memory_table_numbers_are_modelspec_arithmetic(memory_table, generation, params, kv_per_token):
    from exporter.tiny.published import PUBLISHED_CONFIGS

    spec = memory_table.published_spec(generation)
    assert spec.num_params == params == _count_from_config(PUBLISHED_CONFIGS[generation])
    assert spec.kv_bytes_per_token(2) == kv_per_token
    linear = memory_table.linear_params(spec)
    rest = spec.num_params - linear
    h = spec.hidden_size
    assert rest == spec.vocab_size * h + spec.num_layers * (2 * h + (spec.num_heads + 2 * spec.num_kv_heads)
                                                            * spec.head_dim) + h  # embedding, norms, qkv biases
    assert memory_table.weight_bytes(spec, "fp16") == 2 * params
    assert memory_table.weight_bytes(spec, "int8") == linear + 2 * rest
    assert memory_table.weight_bytes(spec, "int4") == linear / 2 + 2 * rest
    assert memory_table.kv_bytes(spec, 2048) == 2 * 2048 * kv_per_token
    parts = memory_table.budget(spec, "int4")
    assert parts["total"] == linear / 2 + 2 * rest + 2 * 2048 * kv_per_token + 1024 * spec.vocab_size * 4


def test_memory_table_cells_and_the_jetson_page_agree(memory_table):
    text = memory_table.markdown()
    gib = 2**30
    six_b = 6_243_584_000
    assert f"| ChatGLM3-6B | {six_b:,} (6.24 B) |" in text
    assert f"| {2 * six_b / gib:.2f} |" in text  # fp16 weights, 11.63
    row = next(line for line in text.splitlines() if line.startswith("| GLM-4-9B-chat | fp16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    total = float(cells[5])
    assert [float(c) for c in cells[6:]] == [pytest.approx(m - total, abs=0.011) for m in (8, 16, 32, 64)]
    with open(os.path.join(ROOT, "docs", "jetson.md"), encoding="utf-8") as f:
        page = f.read()
    block = page.split("<!-- memory-table:begin -->\n", 1)[1].split("<!-- memory-table:end -->", 1)[0]
    assert block.strip() == text.strip(), "docs/jetson.md is stale: paste the output of python docs/memory_table.py"
