"""Checkpoint config.json -> ModelSpec. The only module that knows checkpoint field names and generations.

Supported: THUDM's remote-code layout (``model_type: chatglm``: ChatGLM-6B (v1, told apart by its own config
fields: ``exporter.detect.CHATGLM1_CONFIG_FIELDS``), ChatGLM2-6B, ChatGLM3-6B, their 32k variants, GLM-4-9B-chat), transformers' ``glm``
(glm-4-9b-chat-hf) and ``glm4`` (GLM-4-0414). Unsupported settings are refused here, before any work, with a message
naming the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from exporter.config_fields import MAX_CONTEXT, bool_field, dict_field, float_field, int_field
from runtime.errors import ConfigError, UnsupportedModelError, read_json_object
from runtime.spec import (
    ACT_GELU_TANH,
    ATTENTION_PREFIX_LM,
    CHAT_CHATGLM1,
    CHAT_CHATGLM2,
    CHAT_CHATGLM3,
    CHAT_GLM4,
    NORM_LAYER,
    POSITIONS_2D_BLOCK,
    QKV_PER_HEAD,
    RESIDUAL_NORMED_SCALED,
    ROPE_SCALING_BASE,
    ROPE_SCALING_INTERPOLATION,
    ROPE_SCALING_KINDS,
    ROPE_SCALING_NONE,
    ROTARY_2D_HALF,
    ModelSpec,
)

from exporter.detect import (  # noqa: E402,F401  (layout names live with the detection; weights.py imports them here)
    FAMILY_CHATGLM1,
    FAMILY_CHATGLM2,
    FAMILY_CHATGLM3,
    FAMILY_GLM4,
    LAYOUT_GLM,  # noqa: F401 (re-exported: exporter.weights reads the layout names from here)
    LAYOUT_GLM4,
    LAYOUT_THUDM,
    Detection,
    detect_checkpoint,
)
from exporter.tokenizer_files import tokenizer_facts

# ChatGLM-6B: THUDM's layout with v1 names (transformer.layers.N.attention.*, transformer.word_embeddings); chosen
# when exporter.detect decides the family chatglm1
LAYOUT_THUDM_V1 = "thudm-v1"

# THUDM's quantized checkpoints (chatglm2-6b-int4, ...): weight bits their quantization.py packs
QUANTIZATION_BITS = (4, 8)
# the chat format each THUDM family speaks (the tokenizer files may refine it: a tokenizer.json uses its template)
CHAT_OF_FAMILY = {FAMILY_CHATGLM2: CHAT_CHATGLM2, FAMILY_CHATGLM3: CHAT_CHATGLM3, FAMILY_GLM4: CHAT_GLM4}

# The config.json field holding each size of the spec, per config family: THUDM's remote-code config (layout
# "thudm") and transformers' (glm and glm4 share the "hf" names). The reader below reads these names; the tiny
# checkpoint writer (exporter.tiny.checkpoint) writes them: checkpoint field names are known here only.
CONFIG_HF = "hf"
SIZE_FIELDS: Dict[str, Dict[str, str]] = {
    LAYOUT_THUDM: {
        "hidden_size": "hidden_size",
        "num_layers": "num_layers",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "multi_query_group_num",  # read only with multi_query_attention: true
        "head_dim": "kv_channels",
        "ffn_hidden_size": "ffn_hidden_size",
        "vocab_size": "padded_vocab_size",
        "max_position_embeddings": "seq_length",
    },
    # ChatGLM-6B (v1): no kv groups and no head size field (head_dim = hidden / heads)
    LAYOUT_THUDM_V1: {
        "hidden_size": "hidden_size",
        "num_layers": "num_layers",
        "num_heads": "num_attention_heads",
        "ffn_hidden_size": "inner_hidden_size",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_sequence_length",
    },
    CONFIG_HF: {
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "num_kv_heads": "num_key_value_heads",
        "head_dim": "head_dim",
        "ffn_hidden_size": "intermediate_size",
        "vocab_size": "vocab_size",
        "max_position_embeddings": "max_position_embeddings",
    },
}

# THUDM fields whose value must be exactly this for our block to be the right one. Anything else is refused.
THUDM_REQUIRED_VALUES = {
    "add_bias_linear": False,
    "rmsnorm": True,
    "post_layer_norm": True,
    "apply_residual_connection_post_layernorm": False,
    "original_rope": True,
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
    "prefix_projection",  # read with pre_seq_len (P-tuning v2) by exporter.prefix
)

# v1 special ids as config.json names them -> the token text (published: 130000, 130001, 130004, 130005)
CHATGLM1_SPECIAL_FIELDS = {"mask_token_id": "[MASK]", "gmask_token_id": "[gMASK]", "bos_token_id": "<sop>",
                           "eos_token_id": "<eop>"}
CHATGLM1_SPECIAL_DEFAULTS = {"mask_token_id": 130000, "gmask_token_id": 130001, "bos_token_id": 130004,
                             "eos_token_id": 130005}


@dataclass(frozen=True)
class CheckpointInfo:
    """What the config reader learned about a checkpoint directory besides the spec."""

    path: str
    layout: str  # LAYOUT_THUDM / LAYOUT_GLM / LAYOUT_GLM4
    model_type: str
    rope_scaling_source: str  # how the rope_ratio meaning was decided
    tokenizer_files: Tuple[str, ...]
    detection: Optional[Detection] = None  # every signal and which one decided layout and family
    quantization_bit: int = 0  # THUDM quantized checkpoint: 4 or 8 (weights packed by their quantization.py)
    prefix_projection: bool = False  # P-tuning v2: the prefix encoder has the two-layer MLP


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


def _rope_ratio_meaning(detection: Detection, cfg: Dict[str, Any], chat_family: str) -> Tuple[str, str]:
    """Decide what THUDM's ``rope_ratio`` means for this checkpoint: (kind, how it was decided).

    The shipped modeling_chatglm.py, as ``exporter.detect`` read it, decides when it is there; else the name or the
    tokenizer family (ChatGLM2 interpolates, ChatGLM3 and GLM-4 scale the base).
    """
    if detection.rope_meaning is not None:
        return detection.rope_meaning
    name = str(cfg.get("_name_or_path", "")).lower()
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
    f = SIZE_FIELDS[LAYOUT_THUDM]
    heads = _require(cfg, f["num_heads"], where)
    hidden = _require(cfg, f["hidden_size"], where)
    mqa = bool_field(cfg, "multi_query_attention", where, False)
    kv_heads = _require(cfg, f["num_kv_heads"], where) if mqa else heads
    head_dim = int_field(cfg, f["head_dim"], where) or hidden // heads
    vocab = int_field(cfg, f["vocab_size"], where) or int_field(cfg, "vocab_size", where)
    if vocab is None:
        raise ConfigError(f"{where}: field '{f['vocab_size']}' is missing")
    return dict(
        num_layers=_require(cfg, f["num_layers"], where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(cfg, f["ffn_hidden_size"], where),
        vocab_size=vocab,
        norm_eps=float_field(cfg, "layernorm_epsilon", where, 1e-5),
        rotary_dim=head_dim // 2,  # THUDM: RotaryEmbedding(rotary_dim // 2) over kv_channels
        rope_theta=10000.0,
        qkv_bias=bool_field(cfg, "add_qkv_bias", where, False),
        sandwich_norms=False,
        tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, False),
        max_position_embeddings=int_field(cfg, f["max_position_embeddings"], where, 2048, maximum=MAX_CONTEXT),
        rope_ratio=float_field(cfg, "rope_ratio", where, 1.0) if cfg.get("rope_ratio") != 0 else 1.0,
    )


def _chatglm1_fields(cfg: Dict[str, Any], where: str) -> Dict[str, Any]:
    """ChatGLM-6B (v1): THUDM's original block, every difference from ChatGLM2 resolved here into spec data."""
    bits = cfg.get("quantization_bit") or 0
    if bits:
        raise UnsupportedModelError(
            f"{where}: field 'quantization_bit' = {bits!r}: this is a pre-quantized ChatGLM-6B (int{bits}) checkpoint; "
            "pre-quantized checkpoints are not supported yet (export THUDM/chatglm-6b, then 'glm-export quantize')"
        )
    if cfg.get("pre_seq_len"):
        raise UnsupportedModelError(f"{where}: field 'pre_seq_len' = {cfg['pre_seq_len']!r} (P-tuning v2) is not "
                                    "supported (glm-export needs None)")
    if cfg.get("position_encoding_2d", True) is not True:
        raise UnsupportedModelError(f"{where}: field 'position_encoding_2d' = {cfg['position_encoding_2d']!r} is not "
                                    "supported (glm-export needs true, as ChatGLM-6B publishes it)")
    f = SIZE_FIELDS[LAYOUT_THUDM_V1]
    heads = _require(cfg, f["num_heads"], where)
    hidden = _require(cfg, f["hidden_size"], where)
    layers = _require(cfg, f["num_layers"], where)
    if hidden % (2 * heads):
        raise ConfigError(f"{where}: hidden_size {hidden} must split into {heads} heads of two rotary halves")
    head_dim = hidden // heads
    specials = {}
    for key, name in CHATGLM1_SPECIAL_FIELDS.items():
        value = cfg.get(key, CHATGLM1_SPECIAL_DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: field '{key}' must be an integer token id, got {value!r}")
        specials[name] = value
    return dict(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,  # no grouping in v1
        head_dim=head_dim,
        ffn_hidden_size=cfg.get(f["ffn_hidden_size"]) or 4 * hidden,  # THUDM's default: 4 x hidden
        vocab_size=_require(cfg, f["vocab_size"], where),
        norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
        rotary_dim=head_dim // 2,  # each half of a head rotates on its own (RotaryEmbedding(hidden // (heads * 2)))
        rope_theta=10000.0,
        rope_position_scale=1.0,
        rope_scaling=ROPE_SCALING_NONE,
        qkv_bias=True,
        sandwich_norms=False,
        # THUDM's code leaves tie_word_embeddings at transformers' default (true): lm_head is the embedding
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_position_embeddings=int(cfg.get(f["max_position_embeddings"], 2048)),
        special_tokens=specials,
        norm_kind=NORM_LAYER,
        activation=ACT_GELU_TANH,
        linear_bias=True,
        residual=RESIDUAL_NORMED_SCALED,
        residual_alpha=(2.0 * layers) ** 0.5,
        qkv_layout=QKV_PER_HEAD,
        rotary_kind=ROTARY_2D_HALF,
        rotary_freq_dtype="float16",  # THUDM: inv_freq.half(), kept fp16-rounded even when the model runs in fp32
        position_kind=POSITIONS_2D_BLOCK,
        attention_kind=ATTENTION_PREFIX_LM,
        query_key_layer_scaling=True,
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
    f = SIZE_FIELDS[CONFIG_HF]
    heads = _require(cfg, f["num_heads"], where)
    hidden = _require(cfg, f["hidden_size"], where)
    head_dim = int_field(cfg, f["head_dim"], where) or hidden // heads
    theta, factor, pos_scale, kind = _hf_rope(cfg, where)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: field 'hidden_act' = {act!r} is not supported (glm-export needs 'silu')")
    return dict(
        num_layers=_require(cfg, f["num_layers"], where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int_field(cfg, f["num_kv_heads"], where) or heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(cfg, f["ffn_hidden_size"], where),
        vocab_size=_require(cfg, f["vocab_size"], where),
        norm_eps=float_field(cfg, "rms_norm_eps", where, 1e-5),
        rotary_dim=int(head_dim * factor),
        rope_theta=theta,
        rope_position_scale=pos_scale,
        rope_scaling=kind,
        qkv_bias=bool_field(cfg, "attention_bias", where, True),
        sandwich_norms=layout == LAYOUT_GLM4,
        tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, False),
        max_position_embeddings=int_field(cfg, f["max_position_embeddings"], where, 131072, maximum=MAX_CONTEXT),
    )


def _quantization_bit(cfg: Dict[str, Any], where: str) -> int:
    bits = cfg.get("quantization_bit") or 0
    if bits not in (0,) + QUANTIZATION_BITS:
        raise UnsupportedModelError(f"{where}: field 'quantization_bit' = {bits!r} is not supported "
                                    "(0, or THUDM's 4 or 8)")
    return int(bits)


def _prefix_len(cfg: Dict[str, Any], where: str) -> int:
    """P-tuning v2: pre_seq_len (None or 0 for the released models)."""
    value = cfg.get("pre_seq_len")
    if value in (None, 0):
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: field 'pre_seq_len' must be a positive integer or null, got {value!r}")
    return value


def spec_from_checkpoint(ckpt_dir: str, rope_scaling: Optional[str] = None, generation: Optional[str] = None,
                         prefix_config: Optional[Dict[str, Any]] = None) -> Tuple[ModelSpec, CheckpointInfo]:
    """Read ``ckpt_dir/config.json`` (and, as text only, its tokenizer files and remote code) into one ModelSpec.

    One pass: ``exporter.detect`` gathers every signal and decides layout and family once; this builds the spec.
    ``rope_scaling`` overrides how THUDM's ``rope_ratio`` is applied ("interpolation" or "base"); ``generation``
    overrides the detected family; ``prefix_config`` is a P-tuning output directory's config (its ``pre_seq_len``
    and ``prefix_projection`` replace the base checkpoint's).
    """
    cfg = read_config_json(ckpt_dir)
    where = os.path.join(ckpt_dir, "config.json")
    if rope_scaling is not None and rope_scaling not in (ROPE_SCALING_INTERPOLATION, ROPE_SCALING_BASE):
        raise ConfigError(f"--rope-scaling: expected 'interpolation' or 'base', got {rope_scaling!r}")
    detection = detect_checkpoint(ckpt_dir, cfg, where, generation)
    layout, family = detection.layout, detection.family
    if family == FAMILY_CHATGLM1:
        layout = LAYOUT_THUDM_V1
    if prefix_config is not None:
        cfg = dict(cfg, pre_seq_len=prefix_config.get("pre_seq_len"),
                   prefix_projection=prefix_config.get("prefix_projection", False))
    prefix_len, bits = 0, 0

    if layout == LAYOUT_THUDM_V1:
        fields = _chatglm1_fields(cfg, where)
        tok = tokenizer_facts(detection.tokenizer, CHAT_CHATGLM1)
        for name, wanted in fields["special_tokens"].items():
            if tok.special_tokens.get(name, wanted) != wanted:
                raise ConfigError(f"{where}: {name} is id {wanted} here but {tok.special_tokens[name]} in the "
                                  "tokenizer; the tokenizer files belong to another model")
        fields["special_tokens"] = {**tok.special_tokens, **fields["special_tokens"]}
        source, pad = "no rope_ratio (ChatGLM-6B)", int_field(cfg, "pad_token_id", where, 3, minimum=0)
        if rope_scaling is not None:
            raise ConfigError(f"--rope-scaling applies to ChatGLM2+ checkpoints with rope_ratio; {where} is ChatGLM-6B")
    elif layout == LAYOUT_THUDM:
        fields = _thudm_fields(cfg, where)
        prefix_len, bits = _prefix_len(cfg, where), _quantization_bit(cfg, where)
        tok = tokenizer_facts(detection.tokenizer, CHAT_OF_FAMILY[family])
        ratio = fields.pop("rope_ratio")
        if rope_scaling is not None:
            kind, source = rope_scaling, "set by the user"
        elif ratio == 1.0:
            kind, source = ROPE_SCALING_NONE, "no rope_ratio"
        else:
            kind, source = _rope_ratio_meaning(detection, cfg, tok.chat_format)
        fields["rope_theta"] = 10000.0 * ratio if kind == ROPE_SCALING_BASE else 10000.0
        fields["rope_position_scale"] = ratio if kind == ROPE_SCALING_INTERPOLATION else 1.0
        fields["rope_scaling"] = kind
        pad = int_field(cfg, "pad_token_id", where, 0, minimum=0)
    else:
        fields = _hf_fields(cfg, where, layout)
        tok = tokenizer_facts(detection.tokenizer, CHAT_GLM4)
        source = "transformers config"
        if rope_scaling is not None:
            raise ConfigError(
                "--rope-scaling applies to THUDM checkpoints (rope_ratio); "
                f"{where} states its rope parameters explicitly"
            )
        pad = int_field(cfg, "pad_token_id", where, 151329, minimum=0)

    spec = ModelSpec(
        generation=family,
        eos_token_ids=_eos_ids(cfg.get("eos_token_id"), where),
        pad_token_id=int(pad if pad is not None else 0),
        tokenizer_kind=tok.kind,
        chat_format=tok.chat_format,
        **{"special_tokens": dict(tok.special_tokens), **fields},
        prefix_len=prefix_len,
    )
    _check_consistency(spec, where)
    info = CheckpointInfo(
        path=os.path.abspath(ckpt_dir),
        layout=layout,
        model_type=str(cfg.get("model_type") or "(none: " + detection.layout_decided_by + ")"),
        rope_scaling_source=source,
        tokenizer_files=tuple(tok.files),
        detection=detection,
        quantization_bit=bits,
        prefix_projection=bool(cfg.get("prefix_projection", False)) if prefix_len else False,
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
