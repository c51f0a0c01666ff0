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
TOKENIZER_TIKTOKEN = "tiktoken"  # tokenizer.model in tiktoken's base64-rank format + GLM-4 specials after it
TOKENIZER_JSON = "tokenizer.json"  # the `tokenizers` library's file (-hf repos, GLM-4-0414)
TOKENIZER_NONE = "none"
TOKENIZER_KINDS = (TOKENIZER_SENTENCEPIECE, TOKENIZER_TIKTOKEN, TOKENIZER_JSON, TOKENIZER_NONE)

CHAT_CHATGLM2 = "chatglm2"  # "[Round n]\n\n问：...\n\n答：" plain text
CHAT_CHATGLM3 = "chatglm3"  # role tokens inserted by id
CHAT_GLM4 = "glm4"  # [gMASK]<sop><|role|>\n...
CHAT_TEMPLATE = "template"  # the checkpoint's own jinja chat_template
CHAT_NONE = "none"
CHAT_FORMATS = (CHAT_CHATGLM2, CHAT_CHATGLM3, CHAT_GLM4, CHAT_TEMPLATE, CHAT_NONE)


@dataclass(frozen=True)
class ModelSpec:
    """A ChatGLM2/3, GLM-4-9B or GLM-4-0414 decoder, fully resolved."""

    generation: str  # display name of the family: "chatglm2", "chatglm3", "glm4", "glm4-0414"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int  # rows of the embedding and the LM head (THUDM's padded_vocab_size)
    norm_eps: float
    rotary_dim: int  # leading dims of each head that rotate (pairs interleaved); the rest pass through
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
    # P-tuning v2: a fixed KV prefix of this many positions inside the graph, attended by every token of every
    # sequence (pasts and presents exclude it; position ids do not count it, as in THUDM's ChatGLM2/3 code)
    prefix_len: int = 0

    @property
    def num_params(self) -> int:
        """Parameter count of the checkpoint this spec describes."""
        h, d = self.hidden_size, self.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * d
        per_layer = (
            h * qkv_out
            + (qkv_out if self.qkv_bias else 0)
            + self.num_heads * d * h
            + h * 2 * self.ffn_hidden_size
            + self.ffn_hidden_size * h
            + h * (4 if self.sandwich_norms else 2)
        )
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head

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
