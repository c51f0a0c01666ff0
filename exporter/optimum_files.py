"""``config.json`` and ``generation_config.json`` that optimum (``ORTModelForCausalLM.from_pretrained(bundle)``)
understands, for every generation; the checkpoint's own config is kept beside them as ``checkpoint_config.json``.

Where it stands: the exporter calls :func:`write_optimum_configs` after copying the checkpoint's side files. optimum
runs the portable graph (``model.onnx``: the past/present contract it knows) and needs from the config only what
sizes the empty cache and stops generation. It knows ``model_type: glm`` but not ``glm4`` (it sizes the cache with
attention heads instead of kv heads there) nor THUDM's ``chatglm`` (unknown type), so every bundle says ``glm`` /
``GlmForCausalLM`` with the spec's kv heads and head dim, the full eos list and the pad id; the graph itself carries
everything else (rotary scaling, sandwich norms). ``generation_config.json`` carries the eos list too: ChatGLM3's own
says only ``eos_token_id: 2``, so chat would never stop on ``<|user|>``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List

from runtime.spec import ModelSpec

CHECKPOINT_CONFIG_FILE = "checkpoint_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def optimum_config(spec: ModelSpec) -> Dict[str, Any]:
    """transformers' GlmConfig fields for this model (the graph is the model; these size its cache)."""
    eos: Any = list(spec.eos_token_ids)
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "partial_rotary_factor": spec.rotary_dim / spec.head_dim,
        "rope_theta": spec.rope_theta,
        "attention_bias": spec.qkv_bias,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "eos_token_id": eos,
        "pad_token_id": spec.pad_token_id,
        "use_cache": True,
        "torch_dtype": "float32",
        "glm_export_note": "written by glm-export for ONNX consumers; the checkpoint's config is "
                           + CHECKPOINT_CONFIG_FILE,
    }


def write_optimum_configs(bundle_dir: str, spec: ModelSpec) -> List[str]:
    """Move the copied checkpoint config.json to checkpoint_config.json, write config.json and
    generation_config.json (keeping the checkpoint's generation fields, with the full eos list); returns the names."""
    cfg_path = os.path.join(bundle_dir, "config.json")
    written = []
    if os.path.isfile(cfg_path):
        os.replace(cfg_path, os.path.join(bundle_dir, CHECKPOINT_CONFIG_FILE))
        written.append(CHECKPOINT_CONFIG_FILE)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(optimum_config(spec), f, indent=2)
        f.write("\n")
    written.append("config.json")
    gen_path = os.path.join(bundle_dir, GENERATION_CONFIG_FILE)
    gen: Dict[str, Any] = {}
    if os.path.isfile(gen_path):
        try:
            with open(gen_path, encoding="utf-8") as f:
                loaded = json.load(f)
            gen = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            gen = {}
    gen.update(eos_token_id=list(spec.eos_token_ids), pad_token_id=spec.pad_token_id)
    with open(gen_path, "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    written.append(GENERATION_CONFIG_FILE)
    return written
