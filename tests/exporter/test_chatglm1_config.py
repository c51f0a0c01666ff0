"""ChatGLM-6B (v1) detection and refusals, its weight names, and the fp16 bundle kept finite by
query_key_layer_scaling on a model whose unscaled fp16 QK^T overflows."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

import reference_chatglm1 as ref
from exporter.config import spec_from_checkpoint
from exporter.tiny.published import PUBLISHED_V1_CONFIGS
from exporter.weights import name_table
from runtime.errors import ConfigError, UnsupportedModelError, WeightsError

PUBLISHED = PUBLISHED_V1_CONFIGS["chatglm1"]


def _dir_with(tmp_path, cfg, name="ckpt"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_published_chatglm_6b_config_resolves(tmp_path):
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED))
    assert (spec.generation, info.layout) == ("chatglm1", "thudm-v1")
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (28, 4096, 32, 32, 128)
    assert (spec.ffn_hidden_size, spec.vocab_size, spec.rotary_dim, spec.max_position_embeddings) == (16384, 130528, 64, 2048)
    # 6.2 B as THUDM states it: 28 layers of (QKV + dense + MLP, all with biases, two LayerNorms) + embedding
    # (tied lm_head) + final LayerNorm
    per_layer = 4096 * 12288 + 12288 + 4096 * 4096 + 4096 + 4096 * 16384 + 16384 + 16384 * 4096 + 4096 + 4 * 4096
    assert spec.num_params == 28 * per_layer + 130528 * 4096 + 2 * 4096 == 6_173_286_400
    assert spec.special_tokens == {"[MASK]": 130000, "[gMASK]": 130001, "<sop>": 130004, "<eop>": 130005}
    assert (spec.eos_token_ids, spec.pad_token_id, spec.tie_word_embeddings) == ((130005,), 3, True)
    assert spec.residual_alpha == pytest.approx(math.sqrt(56))
    assert (spec.norm_kind, spec.activation, spec.qkv_layout, spec.rotary_kind, spec.rotary_freq_dtype) == (
        "layernorm", "gelu_tanh", "per_head", "2d_rotate_half", "float16")
    assert spec.query_key_layer_scaling and spec.linear_bias and spec.qkv_bias


@pytest.mark.parametrize("bits", [4, 8])
def test_int4_and_int8_siblings_are_refused_by_name(tmp_path, bits):
    cfg = dict(PUBLISHED, _name_or_path=f"THUDM/chatglm-6b-int{bits}", quantization_bit=bits)
    with pytest.raises(UnsupportedModelError, match=f"int{bits}.*pre-quantized checkpoints are not supported yet"):
        spec_from_checkpoint(_dir_with(tmp_path, cfg))


@pytest.mark.parametrize("field, value, message", [
    ("position_encoding_2d", False, "position_encoding_2d"),
    ("pre_seq_len", 128, "P-tuning"),
    ("gmask_token_id", "x", "gmask_token_id"),
])
def test_other_v1_settings_are_refused(tmp_path, field, value, message):
    with pytest.raises((UnsupportedModelError, ConfigError), match=message):
        spec_from_checkpoint(_dir_with(tmp_path, dict(PUBLISHED, **{field: value})))


def test_rope_scaling_option_is_refused_for_v1(tmp_path):
    with pytest.raises(ConfigError, match="ChatGLM-6B"):
        spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED), rope_scaling="base")


def test_weight_table_uses_the_published_names(tmp_path):
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED))
    table = name_table(spec, info.layout)
    keys = {k for ks in table.values() for k in ks}
    layer0 = {k for k in keys if k.startswith("transformer.layers.0.")}
    assert layer0 == {f"transformer.layers.0.{m}.{p}" for p in ("weight", "bias") for m in (
        "input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
        "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")}
    assert {"transformer.word_embeddings.weight", "transformer.final_layernorm.weight",
            "transformer.final_layernorm.bias"} <= keys
    assert len(keys) == 28 * 12 + 3  # lm_head is the embedding (tied), read from it


def _edited_copy(ckpt, dest, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(ckpt, dest)
    path = os.path.join(dest, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return dest


def test_missing_bias_is_named(chatglm1_model, tmp_path):
    from exporter.weights import load_canonical_weights

    ckpt = _edited_copy(chatglm1_model[0], str(tmp_path / "ck"),
                        lambda t: t.pop("transformer.layers.1.attention.dense.bias"))
    spec, info = spec_from_checkpoint(ckpt)
    with pytest.raises(WeightsError, match="transformer.layers.1.attention.dense.bias' is missing"):
        list(load_canonical_weights(ckpt, spec, info.layout))


def test_config_ids_must_agree_with_the_tokenizer(chatglm1_model, tmp_path):
    ckpt = str(tmp_path / "ck")
    shutil.copytree(chatglm1_model[0], ckpt)
    path = os.path.join(ckpt, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["gmask_token_id"] += 1
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=r"\[gMASK\] is id .* tokenizer"):
        spec_from_checkpoint(ckpt)


def test_fp16_bundle_stays_finite_where_unscaled_fp16_scores_overflow(chatglm1_model, tmp_path):
    """Layer 2 (coefficient 3) gets q and k rows 150x larger: q.k/sqrt(d) then exceeds fp16's 65504, q.k/(3 sqrt(d))
    does not. THUDM's query_key_layer_scaling (in the spec, honoured by the export model) keeps the fp16 bundle
    finite; fp16 scores without it are inf."""
    from exporter.onnx_export import export_bundle
    from onnx_steps import OnnxStepper
    from runtime.steps import left_pad

    config, _ = ref.load_checkpoint(chatglm1_model[0])
    heads, d = config["num_attention_heads"], config["hidden_size"] // config["num_attention_heads"]

    def scale_qk(t):
        key = "transformer.layers.2.attention.query_key_value."
        w = t[key + "weight"].reshape(heads, 3 * d, -1).copy()
        b = t[key + "bias"].reshape(heads, 3 * d).copy()
        w[:, : 2 * d] *= 150.0
        b[:, : 2 * d] *= 150.0
        t[key + "weight"], t[key + "bias"] = w.reshape(3 * heads * d, -1), b.reshape(-1)

    ckpt = _edited_copy(chatglm1_model[0], str(tmp_path / "ck"), scale_qk)
    config, sd = ref.load_checkpoint(ckpt)
    prompt = list(range(20050, 20060)) + [config["gmask_token_id"], config["bos_token_id"]]
    scores = ref.scaled_scores(prompt, config, sd, 2)
    assert np.abs(scores).max() > 65504 > 2 * np.abs(scores).max() / 3
    with np.errstate(over="ignore"):
        assert np.isinf(scores.astype(np.float16)).any()  # what an fp16 QK^T without the coefficient holds

    bundle = str(tmp_path / "b16")
    result = export_bundle(ckpt, bundle, precision="fp16")  # verification against the fp16 PyTorch model passes
    assert result.max_diffs
    stepper = OnnxStepper(bundle)
    ids, mask, _ = left_pad([prompt], 3)
    logits = [stepper.start(ids, mask)[0, -1]] + [stepper.step(np.array([20070 + k]))[0] for k in range(2)]
    assert all(np.isfinite(x).all() for x in logits)
    want = ref.logits(prompt + [20070, 20071], config, sd)
    assert int(np.argmax(logits[0])) == int(np.argmax(want[len(prompt) - 1]))


def test_checkpoint_without_ice_text_exports_and_runs_on_ids(tmp_path):
    """The tokenizer is optional: the special ids come from config.json, prompts are ids."""
    from exporter.onnx_export import export_bundle
    from exporter.tiny.checkpoint import write_tiny_checkpoint
    from runtime import GenerationConfig, GlmModel

    ckpt = write_tiny_checkpoint(str(tmp_path / "ck"), generation="chatglm1", tokenizer=False, num_layers=1)
    assert not os.path.exists(os.path.join(ckpt, "ice_text.model"))
    spec, _ = spec_from_checkpoint(ckpt)
    # no tokenizer: prompts are ids; the decided family keeps its chat format (as a GLM-4 directory without
    # tokenizer files keeps GLM-4's), for a tokenizer added to the bundle later
    assert (spec.tokenizer_kind, spec.chat_format) == ("none", "chatglm1")
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    assert spec.special_tokens["<sop>"] == cfg["bos_token_id"]
    result = export_bundle(ckpt, str(tmp_path / "b"))
    assert max(result.max_diffs.values()) < 1e-3
    with GlmModel.load(result.bundle_dir, threads=1) as model:
        out = model.generate([10, 20, cfg["gmask_token_id"], cfg["bos_token_id"]], GenerationConfig(max_new_tokens=3))
    assert len(out.generated_ids) >= 1
