"""Helpers for the tokenizer tests: tiny tokenizer directories and specs that match them."""
from __future__ import annotations

import os
from typing import Tuple

from exporter.tiny.tokenizers import TinyTokenizer, write_tiny_tokenizer
from runtime.spec import ModelSpec
from runtime.tokenizer import Tokenizer, load_tokenizer

# (kind, chat format) of each tiny tokenizer the tests build; the id is the pytest parameter name.
CASES = {
    "sp-chatglm2": ("sentencepiece", "chatglm2"),
    "sp-chatglm3": ("sentencepiece", "chatglm3"),
    "tiktoken-glm4": ("tiktoken", "glm4"),
    "json-template": ("tokenizer.json", "template"),
    "json-glm4": ("tokenizer.json", "glm4"),
}


def spec_for(tiny: TinyTokenizer, vocab_padding: int = 7, **overrides) -> ModelSpec:
    """A minimal spec whose tokenizer fields match ``tiny``; the embedding is padded past the tokenizer as real
    checkpoints are (65024 rows for 64798 ids)."""
    fields = dict(
        generation="tiny",
        num_layers=1,
        hidden_size=8,
        num_heads=1,
        num_kv_heads=1,
        head_dim=8,
        ffn_hidden_size=16,
        vocab_size=tiny.total_vocab + vocab_padding,
        norm_eps=1e-5,
        rotary_dim=4,
        rope_theta=10000.0,
        rope_position_scale=1.0,
        rope_scaling="none",
        qkv_bias=True,
        sandwich_norms=False,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        eos_token_ids=tuple(tiny.eos_token_ids),
        pad_token_id=0,
        tokenizer_kind=tiny.kind,
        chat_format=tiny.chat_format,
        special_tokens=dict(tiny.special_tokens),
    )
    fields.update(overrides)
    return ModelSpec(**fields)


def build(root: str, case: str) -> Tuple[str, TinyTokenizer, ModelSpec, Tokenizer]:
    """Write the tiny tokenizer of ``case`` under root/case and load it through the runtime."""
    kind, chat_format = CASES[case]
    out = os.path.join(root, case)
    tiny = write_tiny_tokenizer(out, kind, chat_format)
    spec = spec_for(tiny)
    return out, tiny, spec, load_tokenizer(out, spec)
