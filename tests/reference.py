"""The independent reference: transformers' GlmForCausalLM / Glm4ForCausalLM loaded with a tiny checkpoint's weights.

For transformers-layout checkpoints transformers reads the directory itself. For THUDM checkpoints this module
converts config and weights with the rename table of ../shared/chatglm-facts.md, written out here independently of
exporter/weights.py, so a mistake there cannot hide in both.
"""
from __future__ import annotations

import json
import os
import re

import torch


def _read_tensors(ckpt_dir):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.endswith(".safetensors"):
            out.update(load_file(path))
        elif name.endswith(".bin"):
            out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


def _thudm_to_hf(cfg, tensors):
    heads, kv, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    out = {}
    for key, t in tensors.items():
        if key == "transformer.rotary_pos_emb.inv_freq":
            continue
        key2 = key.replace("transformer.embedding.word_embeddings", "model.embed_tokens")
        key2 = key2.replace("transformer.encoder.final_layernorm", "model.norm")
        key2 = key2.replace("transformer.output_layer", "lm_head")
        key2 = key2.replace("transformer.encoder.layers.", "model.layers.")
        key2 = key2.replace("self_attention.dense", "self_attn.o_proj")
        key2 = key2.replace("mlp.dense_h_to_4h", "mlp.gate_up_proj").replace("mlp.dense_4h_to_h", "mlp.down_proj")
        m = re.match(r"(model\.layers\.\d+)\.self_attention\.query_key_value\.(weight|bias)", key2)
        if m:
            q, k, v = t.split([heads * d, kv * d, kv * d], dim=0)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{m.group(1)}.self_attn.{proj}.{m.group(2)}"] = part
            continue
        out[key2] = t
    return out


def hf_config_from_thudm(cfg):
    from transformers import GlmConfig

    ratio = cfg.get("rope_ratio", 1) or 1
    return GlmConfig(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["multi_query_group_num"],
        head_dim=cfg["kv_channels"],
        rms_norm_eps=cfg["layernorm_epsilon"],
        max_position_embeddings=cfg["seq_length"],
        attention_bias=cfg["add_qkv_bias"],
        tie_word_embeddings=False,
        pad_token_id=cfg.get("pad_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * ratio, "partial_rotary_factor": 0.5},
    )


def transformers_model(ckpt_dir, rope_interpolation: float = 1.0):
    """transformers' model for a tiny checkpoint, fp32, eager attention. ``rope_interpolation`` > 1 builds the
    ChatGLM2-32k reading of rope_ratio (positions divided) as transformers' linear rope scaling."""
    from transformers import Glm4ForCausalLM, GlmForCausalLM

    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg["model_type"] == "chatglm":
        config = hf_config_from_thudm(cfg)
        if rope_interpolation != 1.0:
            config.rope_parameters = {
                "rope_type": "linear", "factor": float(rope_interpolation), "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            }
        config._attn_implementation = "eager"
        model = GlmForCausalLM(config)
        missing, unexpected = model.load_state_dict(_thudm_to_hf(cfg, _read_tensors(ckpt_dir)), strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    else:
        cls = Glm4ForCausalLM if cfg["model_type"] == "glm4" else GlmForCausalLM
        model = cls.from_pretrained(ckpt_dir, torch_dtype=torch.float32, attn_implementation="eager")
    return model.float().eval()
