"""Input validation at the boundary, for checkpoints: every config, index and weight file value is type-checked
where it is read; sizes are checked against the weights and the memory before any allocation. Each case goes
through ``glm-export onnx``: exit 2, one line naming the file, field and value, no bundle, no temporary left."""
from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner

from exporter.cli import main
from trust_helpers import assert_one_line_error, edit_json, leftovers, snapshot


@pytest.fixture
def ckpt(tmp_path, tiny_models):
    src, _ = tiny_models.case("glm4-thudm")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def hf_ckpt(tmp_path, tiny_models):
    src, _ = tiny_models.case("glm4_0414-hf")
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def _export(tmp_path, ckpt):
    out = tmp_path / "out"
    before = snapshot(ckpt)
    r = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", "--no-verify"])
    if r.exit_code != 0:
        assert not out.exists() and leftovers(tmp_path) == []
    assert snapshot(ckpt) == before
    return r.exit_code, r.output


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value, needle", [
    ("kv_channels", "32", "whole number"),
    ("seq_length", NAN, "whole number"),
    ("seq_length", -1, "whole number"),
    ("layernorm_epsilon", "abc", "finite number"),
    ("layernorm_epsilon", NAN, "finite number"),
    ("layernorm_epsilon", 0, "> 0"),
    ("rope_ratio", INF, "finite number"),
    ("rope_ratio", NAN, "finite number"),
    ("num_layers", "2", "whole number"),
    ("num_layers", 2.5, "whole number"),
    ("num_layers", True, "whole number"),
    ("hidden_size", [128], "whole number"),
    ("multi_query_group_num", {}, "whole number"),
    ("padded_vocab_size", -5, "whole number"),
    ("add_qkv_bias", "yes", "true or false"),
    ("multi_query_attention", 1, "true or false"),
    ("pad_token_id", "0", "whole number"),
])
def test_thudm_config_fields_of_the_wrong_type(tmp_path, ckpt, field, value, needle):
    edit_json(ckpt / "config.json", lambda d: d.__setitem__(field, value))
    code, output = _export(tmp_path, ckpt)
    assert_one_line_error(code, output, "config.json", f"'{field}'", needle)


@pytest.mark.parametrize("field, value, needle", [
    ("rope_theta", NAN, "finite number"),
    ("rope_theta", "1e4", "finite number"),
    ("rms_norm_eps", INF, "finite number"),
    ("partial_rotary_factor", NAN, "finite number"),
    ("partial_rotary_factor", 3.0, "(0, 1]"),
    ("head_dim", "64", "whole number"),
    ("num_key_value_heads", 0.5, "whole number"),
    ("max_position_embeddings", NAN, "whole number"),
    ("rope_parameters", "default", "an object"),
    ("rope_scaling", ["linear"], "an object"),
    ("attention_bias", "false", "true or false"),
    ("tie_word_embeddings", None, None),  # null is the default, accepted
])
def test_hf_config_fields_of_the_wrong_type(tmp_path, hf_ckpt, field, value, needle):
    edit_json(hf_ckpt / "config.json", lambda d: d.__setitem__(field, value))
    code, output = _export(tmp_path, hf_ckpt)
    if needle is None:
        assert code == 0, output
        return
    assert_one_line_error(code, output, "config.json", f"'{field}'", needle)


def test_nan_in_rope_parameters_is_named(tmp_path, hf_ckpt):
    edit_json(hf_ckpt / "config.json", lambda d: d.__setitem__("rope_parameters", {"rope_theta": NAN}))
    code, output = _export(tmp_path, hf_ckpt)
    assert_one_line_error(code, output, "rope_parameters", "'rope_theta'", "finite number")


def test_a_deeply_nested_config_is_one_line(tmp_path, ckpt):
    (ckpt / "config.json").write_text('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    code, output = _export(tmp_path, ckpt)
    assert_one_line_error(code, output, "config.json", "nested too deeply")


def test_num_layers_beyond_the_weights_is_refused_up_front(tmp_path, ckpt):
    edit_json(ckpt / "config.json", lambda d: d.__setitem__("num_layers", 1000000))
    start = time.monotonic()
    code, output = _export(tmp_path, ckpt)
    assert_one_line_error(code, output, "num_layers is 1000000", "hold 2 layers")
    assert time.monotonic() - start < 30  # refused before any module is built (it used to take 78 s, then die)


def test_a_model_larger_than_memory_is_refused_up_front(tmp_path, ckpt, monkeypatch):
    import exporter.resources as res

    monkeypatch.setattr(res, "available_memory_bytes", lambda: 1 << 20)  # 1 MiB free
    code, output = _export(tmp_path, ckpt)
    # the streamed export refuses with its memory plan, the in-memory one with its estimate: both up front
    assert_one_line_error(code, output, "needs about", "memory")


def test_an_index_whose_weight_map_is_a_list(tmp_path, ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    code, output = _export(tmp_path, ckpt)
    assert_one_line_error(code, output, "model.safetensors.index.json", "'weight_map'", "object")


@pytest.mark.parametrize("shard", ["../elsewhere.safetensors", "/etc/passwd"])
def test_an_index_may_not_point_outside_the_checkpoint(tmp_path, ckpt, shard):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    code, output = _export(tmp_path, ckpt)
    assert_one_line_error(code, output, "not a file inside the checkpoint")


@pytest.mark.parametrize("payload", ["list", "tensor", "dict_of_ints"])
def test_a_bin_file_holding_something_else(tmp_path, ckpt, payload):
    import torch

    (ckpt / "model.safetensors").unlink()
    value = {"list": [torch.zeros(2)], "tensor": torch.zeros(3), "dict_of_ints": {"a": 1}}[payload]
    torch.save(value, str(ckpt / "pytorch_model.bin"))
    code, output = _export(tmp_path, ckpt)
    assert_one_line_error(code, output, "pytorch_model.bin", "expected a state dict")
