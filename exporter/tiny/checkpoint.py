"""Tiny ChatGLM checkpoints for trying the tool without a download, and for the tests.

``write_tiny_checkpoint`` writes a directory shaped exactly like a published one: the published config.json with
the sizes shrunk, seeded random weights under the published names (THUDM or transformers layout; safetensors,
sharded safetensors or pytorch_model.bin), and a real tokenizer trained on a small corpus.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from runtime.errors import ConfigError

GENERATIONS = ("chatglm1", "chatglm2", "chatglm3", "chatglm3-32k", "glm4", "glm4-0414")
LAYOUTS = ("thudm", "hf")
WEIGHT_FORMATS = ("safetensors", "sharded", "bin")

from exporter.tiny.published import PUBLISHED_CONFIGS, PUBLISHED_HF_CONFIGS, PUBLISHED_V1_CONFIGS


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    ffn_hidden_size: int = 344
    vocab_size: Optional[int] = None  # None: the tokenizer's size + 7 (deliberately not a multiple of 64)
    max_position_embeddings: int = 2048


SHAPES = {
    "tiny": TinyShape(),
    "small": TinyShape(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, ffn_hidden_size=688),
    # the 288 M-parameter mid-size model of the benchmarks (ChatGLM3-shaped, 1.15 GB fp32)
    "mid": TinyShape(
        hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=2, head_dim=64, ffn_hidden_size=3424,
        vocab_size=65024, max_position_embeddings=8192,
    ),
    # larger ChatGLM3-shaped models for the streaming export's memory fits (bench/stream_memory.py): 0.66 B, 1.08 B
    "0.6b": TinyShape(
        hidden_size=1536, num_layers=16, num_heads=24, num_kv_heads=2, head_dim=64, ffn_hidden_size=5120,
        vocab_size=65024, max_position_embeddings=8192,
    ),
    "1b": TinyShape(
        hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=2, head_dim=64, ffn_hidden_size=6848,
        vocab_size=65024, max_position_embeddings=8192,
    ),
}

# tokenizer kind and chat format per generation and layout
_TOKENIZER_OF = {
    ("chatglm1", "thudm"): ("ice_text", "chatglm1"),
    ("chatglm2", "thudm"): ("sentencepiece", "chatglm2"),
    ("chatglm3", "thudm"): ("sentencepiece", "chatglm3"),
    ("chatglm3-32k", "thudm"): ("sentencepiece", "chatglm3"),
    ("glm4", "thudm"): ("tiktoken", "glm4"),
    ("glm4", "hf"): ("tokenizer.json", "template"),
    ("glm4-0414", "hf"): ("tokenizer.json", "template"),
}


def tiny_config(generation: str, layout: str, shape: TinyShape, vocab_size: int, eos, pad: int) -> Dict[str, Any]:
    """The published config of ``generation`` in ``layout`` with the sizes of ``shape`` (written under the field
    names the config reader reads: ``exporter.config.SIZE_FIELDS``)."""
    from exporter.config import LAYOUT_THUDM_V1, SIZE_FIELDS

    if generation in PUBLISHED_V1_CONFIGS:  # ChatGLM-6B: its own field names; head_dim is hidden / heads
        cfg = dict(PUBLISHED_V1_CONFIGS[generation])
        sizes = dict(dataclasses.asdict(shape), vocab_size=vocab_size, hidden_size=shape.num_heads * shape.head_dim)
        cfg.update({field: sizes[name] for name, field in SIZE_FIELDS[LAYOUT_THUDM_V1].items()})
        cfg["eos_token_id"], cfg["pad_token_id"] = eos, pad
        return cfg
    published = PUBLISHED_CONFIGS if layout == "thudm" else PUBLISHED_HF_CONFIGS
    if generation not in published:
        other = "hf" if layout == "thudm" else "thudm"
        kind = "THUDM" if layout == "thudm" else "transformers"
        raise ConfigError(f"--generation {generation!r} has no {kind} layout (use --layout {other})")
    cfg = dict(published[generation])
    sizes = dict(dataclasses.asdict(shape), vocab_size=vocab_size)
    cfg.update({field: sizes[name] for name, field in SIZE_FIELDS[layout].items()})
    cfg["eos_token_id"] = eos
    cfg["pad_token_id"] = pad
    return cfg


def random_canonical_weights(spec, seed: int, dtype=None):
    """Seeded random tensors for every canonical parameter. Norm weights and biases are randomised too, so a
    dropped bias or a misplaced norm changes the logits. ``dtype`` converts each tensor as it is made (a 1 B model
    is then never held in fp32)."""
    import torch

    from exporter.weights import canonical_shapes

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in canonical_shapes(spec).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.2 * torch.randn(shape, generator=gen)
        elif name == "lm_head.weight":
            t = 4.0 * torch.randn(shape, generator=gen) / shape[-1] ** 0.5  # logits of std ~4: clear argmaxes
        elif name == "embed.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.contiguous() if dtype is None else t.to(dtype).contiguous()
    return out


def to_layout(spec, canonical: Dict[str, Any], layout: str) -> Dict[str, Any]:
    """Rename (and split q/k/v) canonical tensors into the checkpoint layout's names."""
    from exporter.weights import name_table, part_shapes

    table = name_table(spec, layout)
    out = {}
    for name, keys in table.items():
        tensor = canonical[name]
        rows = [s[0] for s in part_shapes(spec, tuple(tensor.shape), len(keys))]
        for key, part in zip(keys, tensor.split(rows, dim=0)):
            out[key] = part.contiguous().clone()
    return out


def save_weights(out_dir: str, tensors: Dict[str, Any], weight_format: str) -> None:
    import torch
    from safetensors.torch import save_file

    if weight_format == "safetensors":
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    elif weight_format == "sharded":
        keys = list(tensors)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        weight_map = {}
        for fname, names in shards.items():
            save_file({k: tensors[k] for k in names}, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in names})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    elif weight_format == "bin":
        torch.save(tensors, os.path.join(out_dir, "pytorch_model.bin"))
    else:
        raise ConfigError(f"--weights-format: expected one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")


def write_tiny_checkpoint(
    out_dir: str,
    generation: str = "chatglm3",
    layout: str = "thudm",
    size: str = "tiny",
    seed: int = 0,
    weight_format: str = "safetensors",
    dtype: str = "float32",
    tokenizer: bool = True,
    config_overrides: Optional[Dict[str, Any]] = None,
    **shape_overrides: Any,
) -> str:
    """Write a tiny ChatGLM checkpoint directory and return its path.

    ``config_overrides`` are applied to config.json last (e.g. ``{"rope_ratio": 16}`` for a ChatGLM2-32k shape).
    """
    import torch

    from exporter.config import spec_from_checkpoint
    from exporter.weights import skipped_keys

    if generation not in GENERATIONS:
        raise ConfigError(f"--generation: expected one of {', '.join(GENERATIONS)}, got {generation!r}")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if size not in SHAPES:
        raise ConfigError(f"--size: expected one of {', '.join(SHAPES)}, got {size!r}")
    if (generation, layout) not in _TOKENIZER_OF:
        raise ConfigError(f"--generation {generation} is not published in the {layout} layout")
    shape = dataclasses.replace(SHAPES[size], **shape_overrides)
    os.makedirs(out_dir, exist_ok=True)

    kind, chat_format = _TOKENIZER_OF[(generation, layout)]
    tokenizer_eos: List[int] = []
    total = 256
    if tokenizer:
        from exporter.tiny.tokenizers import write_tiny_tokenizer

        tok = write_tiny_tokenizer(out_dir, kind, chat_format, seed=seed)
        tokenizer_eos, total = list(tok.eos_token_ids), tok.total_vocab
    vocab = shape.vocab_size or total + 7
    if vocab < total:
        raise ConfigError(f"vocab_size {vocab} is smaller than the tokenizer's {total} tokens")
    v1_ids = {}
    if kind == "ice_text":  # ChatGLM-6B: the special ids live in config.json; pad 3 as published
        specials = tok.special_tokens if tokenizer else {"[MASK]": 250, "[gMASK]": 251, "<sop>": 252, "<eop>": 253}
        eos, pad = specials["<eop>"], 3
        v1_ids = {"mask_token_id": specials["[MASK]"], "gmask_token_id": specials["[gMASK]"],
                  "bos_token_id": specials["<sop>"]}
    elif kind == "sentencepiece":
        eos, pad = 2, 0  # an integer, as the published ChatGLM2/3 configs write it
    else:
        eos = tokenizer_eos or [vocab - 1]  # GLM-4: <|endoftext|>, <|user|>, <|observation|>
        pad = eos[0]
    cfg = tiny_config(generation, layout, shape, vocab, eos, pad)
    cfg.update(v1_ids)
    cfg.update(config_overrides or {})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    spec, info = spec_from_checkpoint(out_dir)
    torch_dtype = getattr(torch, dtype)
    canonical = random_canonical_weights(spec, seed, torch_dtype)
    tensors = to_layout(spec, canonical, info.layout)
    del canonical
    if spec.tie_word_embeddings and "lm_head.weight" in skipped_keys(info.layout, spec):
        tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"].clone()  # as a tied save holds it
    save_weights(out_dir, tensors, weight_format)
    return out_dir
