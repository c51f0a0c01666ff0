"""The model spec: every fact about a ChatGLM model that export, runtime and calibration need, resolved once.

Only ``exporter.config`` knows checkpoint field names and generations; it builds a ``ModelSpec``. Everything after it
(the PyTorch model, the ONNX graph, the manifest, the runtime) reads this spec and nothing else, so model differences
are data here rather than ``if version == ...`` branches elsewhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

# How ``rope_ratio`` (THUDM) is applied. ChatGLM2-6B-32k divides positions by it (position interpolation);
# ChatGLM3-6B-32k and GLM-4 multiply the rotary base by it.
ROPE_SCALING_NONE = "none"
ROPE_SCALING_INTERPOLATION = "interpolation"
ROPE_SCALING_BASE = "base"
ROPE_SCALING_KINDS = (ROPE_SCALING_NONE, ROPE_SCALING_INTERPOLATION, ROPE_SCALING_BASE)

TOKENIZER_SENTENCEPIECE = "sentencepiece"  # tokenizer.model (sentencepiece) + ChatGLM specials after its vocab
TOKENIZER_ICE_TEXT = "ice_text"  # ChatGLM-6B's ice_text.model: sentencepiece ids offset by 20000 image tokens, text rules
TOKENIZER_TIKTOKEN = "tiktoken"  # tokenizer.model in tiktoken's base64-rank format + GLM-4 specials after it
TOKENIZER_JSON = "tokenizer.json"  # the `tokenizers` library's file (-hf repos, GLM-4-0414)
TOKENIZER_NONE = "none"
TOKENIZER_KINDS = (TOKENIZER_SENTENCEPIECE, TOKENIZER_ICE_TEXT, TOKENIZER_TIKTOKEN, TOKENIZER_JSON, TOKENIZER_NONE)

CHAT_CHATGLM1 = "chatglm1"  # ChatGLM-6B: "[Round n]\n问：...\n答：" from round 0, [gMASK] <sop> at the end
CHAT_CHATGLM2 = "chatglm2"  # "[Round n]\n\n问：...\n\n答：" plain text
CHAT_CHATGLM3 = "chatglm3"  # role tokens inserted by id
CHAT_GLM4 = "glm4"  # [gMASK]<sop><|role|>\n...
CHAT_TEMPLATE = "template"  # the checkpoint's own jinja chat_template
CHAT_NONE = "none"
CHAT_FORMATS = (CHAT_CHATGLM1, CHAT_CHATGLM2, CHAT_CHATGLM3, CHAT_GLM4, CHAT_TEMPLATE, CHAT_NONE)

# The block's variants. Defaults are the ChatGLM2/3 / GLM-4 block; ChatGLM-6B (v1, generation "chatglm1") differs in
# every one of them (THUDM's modeling_chatglm.py for chatglm-6b; see exporter/model_v1.py).
NORM_RMS = "rmsnorm"
NORM_LAYER = "layernorm"  # LayerNorm with weight and bias
NORM_KINDS = (NORM_RMS, NORM_LAYER)
ACT_SWIGLU = "swiglu"  # dense_h_to_4h gives [gate | up]; silu(gate) * up
ACT_GELU_TANH = "gelu_tanh"  # dense_h_to_4h gives ffn values; GELU in its tanh form
ACTIVATIONS = (ACT_SWIGLU, ACT_GELU_TANH)
RESIDUAL_INPUT = "input"  # x + f(norm(x))
RESIDUAL_NORMED_SCALED = "normed_scaled"  # norm(x) * residual_alpha + f(norm(x)) (v1: alpha = sqrt(2 layers))
RESIDUAL_KINDS = (RESIDUAL_INPUT, RESIDUAL_NORMED_SCALED)
QKV_GROUPED = "grouped"  # query_key_value rows: [all Q heads | K groups | V groups]
QKV_PER_HEAD = "per_head"  # rows per head h: [q_h | k_h | v_h]
QKV_LAYOUTS = (QKV_GROUPED, QKV_PER_HEAD)
ROTARY_INTERLEAVED = "interleaved"  # first rotary_dim dims of a head rotate, pairs (0,1), (2,3), ...
ROTARY_2D_HALF = "2d_rotate_half"  # each head half (rotary_dim dims) rotates, rotate-half pairs (i, i + R/2):
#                                    the first half by the position id, the second by the block position id
ROTARY_KINDS = (ROTARY_INTERLEAVED, ROTARY_2D_HALF)
POSITIONS_SEQUENTIAL = "sequential"  # position_ids [batch, seq]: 0, 1, 2, ... from each row's first real token
POSITIONS_2D_BLOCK = "2d_block"  # position_ids [batch, 2, seq]: (position, block position); runtime/positions.py
POSITION_KINDS = (POSITIONS_SEQUENTIAL, POSITIONS_2D_BLOCK)
ATTENTION_CAUSAL = "causal"
ATTENTION_PREFIX_LM = "prefix_lm"  # context tokens (block position 0) attend to each other both ways
ATTENTION_KINDS = (ATTENTION_CAUSAL, ATTENTION_PREFIX_LM)


@dataclass(frozen=True)
class ModelSpec:
    """A ChatGLM-6B, ChatGLM2/3, GLM-4-9B or GLM-4-0414 decoder, fully resolved."""

    generation: str  # display name of the family: "chatglm1", "chatglm2", "chatglm3", "glm4", "glm4-0414"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # rows of the embedding and the LM head (THUDM's padded_vocab_size)
    norm_eps: float
    rotary_dim: int  # leading dims of each head that rotate (pairs interleaved); the rest pass through. v1
    #                  (ROTARY_2D_HALF): the dims of each head half, head_dim / 2, each half rotating on its own
    rope_theta: float  # the rotary base actually used (already multiplied for base scaling)
    rope_position_scale: float  # positions are divided by this (interpolation); 1.0 otherwise
    rope_scaling: str  # one of ROPE_SCALING_KINDS, recorded for the user
    qkv_bias: bool
    sandwich_norms: bool  # GLM-4-0414: post_self_attn and post_mlp norms
    tie_word_embeddings: bool
    max_position_embeddings: int  # the trained context (THUDM seq_length)
    eos_token_ids: Tuple[int, ...]
    pad_token_id: int
    tokenizer_kind: str = TOKENIZER_NONE
    chat_format: str = CHAT_NONE
    special_tokens: Dict[str, int] = field(default_factory=dict)  # "[gMASK]" -> id, "<|user|>" -> id, ...
    # the block's variants (see the constants above); the defaults are the ChatGLM2+ block
    norm_kind: str = NORM_RMS
    activation: str = ACT_SWIGLU
    linear_bias: bool = False  # biases on the attention output and both MLP linears
    residual: str = RESIDUAL_INPUT
    residual_alpha: float = 1.0
    qkv_layout: str = QKV_GROUPED
    rotary_kind: str = ROTARY_INTERLEAVED
    rotary_freq_dtype: str = "float32"  # inverse frequencies rounded through this dtype (v1: "float16", as THUDM)
    position_kind: str = POSITIONS_SEQUENTIAL
    attention_kind: str = ATTENTION_CAUSAL
    query_key_layer_scaling: bool = False  # v1: q / (sqrt(d) * (layer + 1)), scores * (layer + 1) in fp32
    # P-tuning v2: a fixed KV prefix of this many positions inside the graph, attended by every token of every
    # sequence (pasts and presents exclude it; position ids do not count it, as in THUDM's ChatGLM2/3 code)
    prefix_len: int = 0

    @property
    def num_params(self) -> int:
        """Parameter count of the checkpoint this spec describes."""
        h, d = self.hidden_size, self.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * d
        up_out = 2 * self.ffn_hidden_size if self.activation == ACT_SWIGLU else self.ffn_hidden_size
        norm = 2 * h if self.norm_kind == NORM_LAYER else h
        linear_bias = h + up_out + h if self.linear_bias else 0
        per_layer = (
            h * qkv_out
            + (qkv_out if self.qkv_bias else 0)
            + self.num_heads * d * h
            + h * up_out
            + self.ffn_hidden_size * h
            + linear_bias
            + norm * (4 if self.sandwich_norms else 2)
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + norm + head

    def kv_bytes_per_token(self, bytes_per_element: int = 4) -> int:
        """Bytes of KV cache one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise KeyError("unknown spec field(s): " + ", ".join(unknown))
        kwargs = dict(data)
        kwargs["eos_token_ids"] = tuple(int(i) for i in kwargs.get("eos_token_ids", ()))
        kwargs["special_tokens"] = {str(k): int(v) for k, v in kwargs.get("special_tokens", {}).items()}
        return cls(**kwargs)
