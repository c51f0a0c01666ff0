"""Checkpoint config.json -> ModelSpec. The only module that knows checkpoint field names and generations.

Supported: THUDM's remote-code layout (``model_type: chatglm``: ChatGLM2-6B, ChatGLM3-6B, their 32k variants,
GLM-4-9B-chat), transformers' ``glm`` (glm-4-9b-chat-hf) and ``glm4`` (GLM-4-0414). Unsupported settings are refused
here, before any work, with a message naming the field.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from exporter.config_fields import MAX_CONTEXT, bool_field, dict_field, float_field, int_field
from runtime.errors import ConfigError, UnsupportedModelError, read_json_object
from runtime.spec import (
    CHAT_CHATGLM2,
    CHAT_CHATGLM3,
    CHAT_GLM4,
    ROPE_SCALING_BASE,
    ROPE_SCALING_INTERPOLATION,
    ROPE_SCALING_KINDS,
    ROPE_SCALING_NONE,
    TOKENIZER_TIKTOKEN,
    ModelSpec,
)

LAYOUT_THUDM = "thudm"
LAYOUT_GLM = "glm"
LAYOUT_GLM4 = "glm4"

# model_type -> weight-name layout
LAYOUT_OF_MODEL_TYPE = {"chatglm": LAYOUT_THUDM, "glm": LAYOUT_GLM, "glm4": LAYOUT_GLM4}

# THUDM fields whose value must be exactly this for our block to be the right one. Anything else is refused.
THUDM_REQUIRED_VALUES = {
    "add_bias_linear": False,
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
    "quantization_bit": 0,
    "pre_seq_len": None,
}
# THUDM fields with no effect on fp32 inference (training-time or fusion switches), accepted as they come.
THUDM_IGNORED = (
    "apply_query_key_layer_scaling",  # scales scores by 1/layer and softmax by layer: cancels out in fp32
    "attention_softmax_in_fp32",  # we always do softmax in fp32
    "fp32_residual_connection",
    "bias_dropout_fusion",
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "prefix_projection",  # only meaningful with pre_seq_len, which is refused
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What the config reader learned about a checkpoint directory besides the spec."""

    path: str
    layout: str  # LAYOUT_THUDM / LAYOUT_GLM / LAYOUT_GLM4
    model_type: str
    rope_scaling_source: str  # how the rope_ratio meaning was decided
    tokenizer_files: Tuple[str, ...]


def read_config_json(ckpt_dir: str) -> Dict[str, Any]:
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"{ckpt_dir}: not a directory; expected a checkpoint directory with config.json")
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: missing; a checkpoint directory must hold config.json and its weights")
    return read_json_object(path, ConfigError)


def _require(cfg: Dict[str, Any], key: str, where: str) -> int:
    """A positive integer field that must be present (``exporter.config_fields`` names a wrong type or value)."""
    return int_field(cfg, key, where, required=True)


def _eos_ids(value: Any, where: str) -> Tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: field 'eos_token_id' must be an integer or a list of integers, got {value!r}")


def _rope_ratio_meaning(ckpt_dir: str, cfg: Dict[str, Any], chat_family: str) -> Tuple[str, str]:
    """Decide what THUDM's ``rope_ratio`` means for this checkpoint: (kind, how it was decided).

    THUDM's remote code is the ground truth: ChatGLM2-6B-32k's divides positions (``seq_idx / self.rope_ratio``),
    ChatGLM3-6B-32k's and GLM-4's multiply the base (``base * self.rope_ratio``). We read (never run) that file when
    present; else the tokenizer family decides (ChatGLM2 interpolates, ChatGLM3 and GLM-4 scale the base).
    """
    modeling = os.path.join(ckpt_dir, "modeling_chatglm.py")
    if os.path.isfile(modeling):
        with open(modeling, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if re.search(r"base\s*=\s*base\s*\*\s*self\.rope_ratio|base\s*\*\s*self\.rope_ratio", text):
            return ROPE_SCALING_BASE, "modeling_chatglm.py multiplies the base by rope_ratio"
        if re.search(r"/\s*self\.rope_ratio", text):
            return ROPE_SCALING_INTERPOLATION, "modeling_chatglm.py divides positions by rope_ratio"
    name = str(cfg.get("_name_or_path") or "").lower()
    if "chatglm2" in name:
        return ROPE_SCALING_INTERPOLATION, f"_name_or_path {cfg.get('_name_or_path')!r} is a ChatGLM2 model"
    if chat_family == CHAT_CHATGLM2:
        return ROPE_SCALING_INTERPOLATION, "tokenizer has no ChatGLM3 role tokens (ChatGLM2 family)"
    return ROPE_SCALING_BASE, f"{chat_family} family multiplies the base"


def _thudm_fields(cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
    for key, wanted in THUDM_REQUIRED_VALUES.items():
        if key in cfg and cfg[key] != wanted and not (wanted is None and cfg[key] in (None, 0)):
            raise UnsupportedModelError(
                f"{where}: field '{key}' = {cfg[key]!r} is not supported (glm-export needs {wanted!r})"
            )
    heads = _require(cfg, "num_attention_heads", where)
    hidden = _require(cfg, "hidden_size", where)
    mqa = bool_field(cfg, "multi_query_attention", where, False)
    kv_heads = _require(cfg, "multi_query_group_num", where) if mqa else heads
    head_dim = int_field(cfg, "kv_channels", where) or hidden // heads
    vocab = int_field(cfg, "padded_vocab_size", where) or int_field(cfg, "vocab_size", where)
    if vocab is None:
        raise ConfigError(f"{where}: field 'padded_vocab_size' is missing")
    return dict(
        num_layers=_require(cfg, "num_layers", where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(cfg, "ffn_hidden_size", where),
        vocab_size=vocab,
        norm_eps=float_field(cfg, "layernorm_epsilon", where, 1e-5),
        rotary_dim=head_dim // 2,  # THUDM: RotaryEmbedding(rotary_dim // 2) over kv_channels
        rope_theta=10000.0,
        qkv_bias=bool_field(cfg, "add_qkv_bias", where, False),
        sandwich_norms=False,
        tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, False),
        max_position_embeddings=int_field(cfg, "seq_length", where, 2048, maximum=MAX_CONTEXT),
        rope_ratio=float_field(cfg, "rope_ratio", where, 1.0) if cfg.get("rope_ratio") != 0 else 1.0,
    )


def _hf_rope(cfg: Dict[str, Any], where: str) -> Tuple[float, float, float, str]:
    """(theta, partial_rotary_factor, position_scale, kind) from transformers 4.x top-level fields or 5.x
    ``rope_parameters``."""
    params = dict_field(cfg, "rope_parameters", where)
    scaling = dict_field(cfg, "rope_scaling", where)
    src = "rope_parameters" if "rope_theta" in params else ""
    theta = float_field(params if src else cfg, "rope_theta", where + (" rope_parameters" if src else ""), 10000.0)
    in_params = "partial_rotary_factor" in params
    factor = float_field(params if in_params else cfg, "partial_rotary_factor",
                         where + (" rope_parameters" if in_params else ""), 0.5)
    if factor > 1:
        raise ConfigError(f"{where}: field 'partial_rotary_factor' = {factor!r} is invalid; expected a number in (0, 1]")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if not isinstance(rope_type, str):
        raise ConfigError(f"{where}: field 'rope_type' = {rope_type!r:.60} is invalid; expected a string")
    if rope_type == "default":
        return theta, factor, 1.0, ROPE_SCALING_NONE
    if rope_type == "linear":
        holder = params if "factor" in params else scaling
        lin = float_field(holder, "factor", where + (" rope_parameters" if holder is params else " rope_scaling"),
                          float("nan"))
        if lin != lin:
            raise ConfigError(f"{where}: linear rope scaling needs a 'factor'")
        return theta, factor, lin, ROPE_SCALING_INTERPOLATION
    raise UnsupportedModelError(f"{where}: rope type {rope_type!r} is not supported (default or linear only)")


def _hf_fields(cfg: Dict[str, Any], where: str, layout: str) -> Dict[str, Any]:
    heads = _require(cfg, "num_attention_heads", where)
    hidden = _require(cfg, "hidden_size", where)
    head_dim = int_field(cfg, "head_dim", where) or hidden // heads
    theta, factor, pos_scale, kind = _hf_rope(cfg, where)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: field 'hidden_act' = {act!r} is not supported (glm-export needs 'silu')")
    return dict(
        num_layers=_require(cfg, "num_hidden_layers", where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int_field(cfg, "num_key_value_heads", where) or heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(cfg, "intermediate_size", where),
        vocab_size=_require(cfg, "vocab_size", where),
        norm_eps=float_field(cfg, "rms_norm_eps", where, 1e-5),
        rotary_dim=int(head_dim * factor),
        rope_theta=theta,
        rope_position_scale=pos_scale,
        rope_scaling=kind,
        qkv_bias=bool_field(cfg, "attention_bias", where, True),
        sandwich_norms=layout == LAYOUT_GLM4,
        tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, False),
        max_position_embeddings=int_field(cfg, "max_position_embeddings", where, 131072, maximum=MAX_CONTEXT),
    )


def spec_from_checkpoint(ckpt_dir: str, rope_scaling: Optional[str] = None) -> Tuple[ModelSpec, CheckpointInfo]:
    """Read ``ckpt_dir/config.json`` (and, as text only, its tokenizer files) into one ModelSpec.

    ``rope_scaling`` overrides how THUDM's ``rope_ratio`` is applied: "interpolation" or "base".
    """
    from exporter.tokenizer_files import detect_tokenizer

    cfg = read_config_json(ckpt_dir)
    where = os.path.join(ckpt_dir, "config.json")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in LAYOUT_OF_MODEL_TYPE:
        known = ", ".join(sorted(LAYOUT_OF_MODEL_TYPE))
        raise UnsupportedModelError(f"{where}: field 'model_type' = {model_type!r} is not supported (known: {known})")
    if rope_scaling is not None and rope_scaling not in (ROPE_SCALING_INTERPOLATION, ROPE_SCALING_BASE):
        raise ConfigError(f"--rope-scaling: expected 'interpolation' or 'base', got {rope_scaling!r}")
    layout = LAYOUT_OF_MODEL_TYPE[model_type]

    if layout == LAYOUT_THUDM:
        fields = _thudm_fields(cfg, where)
        # the sentencepiece family is ChatGLM2/3 (detect_tokenizer says which: role tokens decide), tiktoken is GLM-4
        tok = detect_tokenizer(ckpt_dir, CHAT_CHATGLM3)
        chat_family = CHAT_GLM4 if tok.kind == TOKENIZER_TIKTOKEN else tok.chat_format
        generation = {CHAT_CHATGLM2: "chatglm2", CHAT_CHATGLM3: "chatglm3", CHAT_GLM4: "glm4"}.get(chat_family, "chatglm3")
        ratio = fields.pop("rope_ratio")
        if rope_scaling is not None:
            kind, source = rope_scaling, "set by the user"
        elif ratio == 1.0:
            kind, source = ROPE_SCALING_NONE, "no rope_ratio"
        else:
            kind, source = _rope_ratio_meaning(ckpt_dir, cfg, chat_family)
        fields["rope_theta"] = 10000.0 * ratio if kind == ROPE_SCALING_BASE else 10000.0
        fields["rope_position_scale"] = ratio if kind == ROPE_SCALING_INTERPOLATION else 1.0
        fields["rope_scaling"] = kind
        pad = int_field(cfg, "pad_token_id", where, 0, minimum=0)
    else:
        fields = _hf_fields(cfg, where, layout)
        tok = detect_tokenizer(ckpt_dir, CHAT_GLM4)
        generation = "glm4-0414" if layout == LAYOUT_GLM4 else "glm4"
        source = "transformers config"
        if rope_scaling is not None:
            raise ConfigError(
                "--rope-scaling applies to THUDM checkpoints (rope_ratio); "
                f"{where} states its rope parameters explicitly"
            )
        pad = int_field(cfg, "pad_token_id", where, 151329, minimum=0)

    spec = ModelSpec(
        generation=generation,
        eos_token_ids=_eos_ids(cfg.get("eos_token_id"), where),
        pad_token_id=int(pad if pad is not None else 0),
        tokenizer_kind=tok.kind,
        chat_format=tok.chat_format,
        special_tokens=dict(tok.special_tokens),
        **fields,
    )
    _check_consistency(spec, where)
    info = CheckpointInfo(
        path=os.path.abspath(ckpt_dir),
        layout=layout,
        model_type=model_type,
        rope_scaling_source=source,
        tokenizer_files=tuple(tok.files),
    )
    return spec, info


def _check_consistency(spec: ModelSpec, where: str) -> None:
    if spec.num_heads % spec.num_kv_heads:
        raise ConfigError(
            f"{where}: {spec.num_heads} attention heads are not a multiple of {spec.num_kv_heads} kv heads"
        )
    if spec.rotary_dim % 2 or not 0 < spec.rotary_dim <= spec.head_dim:
        raise ConfigError(f"{where}: rotary dims {spec.rotary_dim} must be even and within head_dim {spec.head_dim}")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size"):
        if getattr(spec, name) <= 0:
            raise ConfigError(f"{where}: {name} must be positive")
    if spec.rope_scaling not in ROPE_SCALING_KINDS:
        raise ConfigError(f"{where}: unknown rope scaling {spec.rope_scaling!r}")
