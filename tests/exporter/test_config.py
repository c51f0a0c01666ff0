"""config.json -> ModelSpec on the published configs (full size), rope_ratio meanings and overrides."""
from __future__ import annotations

import json

import pytest

from exporter.config import spec_from_checkpoint
from exporter.tiny.published import PUBLISHED_CONFIGS, PUBLISHED_HF_CONFIGS
from runtime.errors import ConfigError
from runtime.spec import ModelSpec


def _dir_with(tmp_path, cfg, modeling_text=None):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    if modeling_text is not None:
        (tmp_path / "modeling_chatglm.py").write_text(modeling_text)
    return str(tmp_path)


@pytest.mark.parametrize(
    "name,params_b,layers,kv,theta",
    [("chatglm3", 6.24, 28, 2, 10000.0), ("chatglm3-32k", 6.24, 28, 2, 500000.0), ("glm4", 9.40, 40, 2, 5e6)],
)
def test_published_thudm_configs_resolve(tmp_path, name, params_b, layers, kv, theta):
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED_CONFIGS[name]))
    assert info.layout == "thudm"
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.rotary_dim) == (layers, kv, 128, 64)
    assert spec.rope_theta == theta
    assert spec.qkv_bias and not spec.sandwich_norms
    assert abs(spec.num_params / 1e9 - params_b) < 0.01


@pytest.mark.parametrize("name,model_type,sandwich,eps", [("glm4", "glm", False, 1.5625e-07),
                                                           ("glm4-0414", "glm4", True, 1e-05)])
def test_published_hf_configs_resolve(tmp_path, name, model_type, sandwich, eps):
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED_HF_CONFIGS[name]))
    assert info.layout == model_type
    assert spec.sandwich_norms is sandwich and spec.norm_eps == eps
    assert spec.eos_token_ids == (151329, 151336, 151338)
    assert spec.rotary_dim == 64 and spec.vocab_size == 151552


def test_transformers5_rope_parameters_are_read(tmp_path):
    cfg = dict(PUBLISHED_HF_CONFIGS["glm4"])
    cfg.pop("rope_theta")
    cfg.pop("partial_rotary_factor")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0, "partial_rotary_factor": 0.25}
    spec, _ = spec_from_checkpoint(_dir_with(tmp_path, cfg))
    assert spec.rope_theta == 123.0 and spec.rotary_dim == 32


def test_rope_ratio_meaning_read_from_remote_code_text(tmp_path):
    cfg = dict(PUBLISHED_CONFIGS["chatglm3"], rope_ratio=16)
    interp = "seq_idx = torch.arange(seq_len, dtype=torch.float) / self.rope_ratio\n"
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg, interp))
    assert (spec.rope_scaling, spec.rope_position_scale, spec.rope_theta) == ("interpolation", 16.0, 10000.0)
    assert "modeling_chatglm.py" in info.rope_scaling_source


def test_rope_ratio_base_scaling_from_remote_code_text(tmp_path):
    cfg = dict(PUBLISHED_CONFIGS["chatglm2"], rope_ratio=50)  # name says chatglm2, code says base: code wins
    spec, _ = spec_from_checkpoint(_dir_with(tmp_path, cfg, "base = base * self.rope_ratio\n"))
    assert (spec.rope_scaling, spec.rope_theta, spec.rope_position_scale) == ("base", 500000.0, 1.0)


def test_user_override_wins(tmp_path):
    cfg = dict(PUBLISHED_CONFIGS["chatglm3-32k"])
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg), rope_scaling="interpolation")
    assert (spec.rope_scaling, spec.rope_position_scale, spec.rope_theta) == ("interpolation", 50.0, 10000.0)
    assert info.rope_scaling_source == "set by the user"


def test_override_refused_for_explicit_hf_rope(tmp_path):
    with pytest.raises(ConfigError, match="--rope-scaling"):
        spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED_HF_CONFIGS["glm4"]), rope_scaling="base")


def test_heads_not_multiple_of_kv_heads(tmp_path):
    cfg = dict(PUBLISHED_CONFIGS["chatglm3"], multi_query_group_num=3)
    with pytest.raises(ConfigError, match="not a multiple"):
        spec_from_checkpoint(_dir_with(tmp_path, cfg))


def test_spec_round_trips_through_dict(tmp_path):
    spec, _ = spec_from_checkpoint(_dir_with(tmp_path, PUBLISHED_CONFIGS["glm4"]))
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
