"""An independent numpy reference of ChatGLM-6B's (v1) forward pass, for the tests.

transformers has no ChatGLM-6B class, so this is the reference the v1 export is checked against. It is written from
THUDM's published modeling_chatglm.py for chatglm-6b (read, not copied) and shares no code with exporter/model_v1.py
or runtime/positions.py: it reads the checkpoint's tensors under THUDM's names, works sequence-first like THUDM,
builds its own position ids and boolean masks from the token ids (THUDM's get_position_ids / get_masks rules), fills
masked scores with -10000 before the layer-scaling multiply as THUDM does, and recomputes the whole sequence on every
call (no cache).

``variant`` switches single details to the ChatGLM2 way, so the trap tests can show that each detail matters:
  qkv_grouped      read query_key_value as [all Q | all K | all V] instead of per head
  no_block_pos     rotate the second half of each head by the position id instead of the block position id
  one_d_positions  positions 0..n-1 for every token, no block positions (ChatGLM2 numbering)
  plain_residual   x + f(norm(x)) instead of norm(x) * alpha + f(norm(x))
  no_norm_bias     LayerNorm without its bias
  fp32_inv_freq    exact fp32 rotary frequencies instead of THUDM's fp16-rounded ones
  erf_gelu         the erf form of GELU instead of the tanh form
  causal           plain causal attention instead of prefix-LM
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence

import numpy as np

VARIANTS = ("qkv_grouped", "no_block_pos", "one_d_positions", "plain_residual", "no_norm_bias", "fp32_inv_freq",
            "erf_gelu", "causal")


def load_checkpoint(ckpt_dir: str):
    """(config dict, {THUDM name: float64 array}) of a safetensors checkpoint (one dtype: numpy then uses BLAS)."""
    from safetensors.numpy import load_file

    with open(os.path.join(ckpt_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    tensors = {k: v.astype(np.float64) for k, v in load_file(os.path.join(ckpt_dir, "model.safetensors")).items()}
    return config, tensors


def thudm_positions(ids: Sequence[int], config: Dict, variant: str = "") -> np.ndarray:
    """(2, n) position and block position ids of one unpadded sequence, by THUDM's rule."""
    ids = list(ids)
    n = len(ids)
    if variant == "one_d_positions":
        return np.stack([np.arange(n), np.zeros(n, dtype=np.int64)])
    context = ids.index(config["bos_token_id"])
    mask_token = config["mask_token_id"] if config["mask_token_id"] in ids else config["gmask_token_id"]
    mask_pos = ids.index(mask_token)
    position = np.arange(n)
    position[context:] = mask_pos
    block = np.concatenate([np.zeros(context, dtype=np.int64), np.arange(1, n - context + 1)])
    return np.stack([position, block])


def thudm_mask(ids: Sequence[int], config: Dict, variant: str = "") -> np.ndarray:
    """(n, n) bool, True where query i must NOT see key j: causal, except every token sees the context."""
    n = len(ids)
    allowed = np.tril(np.ones((n, n), dtype=bool))
    if variant != "causal":
        allowed[:, : list(ids).index(config["bos_token_id"])] = True
    return ~allowed


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x, variant: str = ""):
    if variant == "erf_gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotary_tables(dim: int, max_pos: int, variant: str = ""):
    """cos, sin (max_pos, dim) for rotate-half rotary over ``dim`` dims; inv_freq rounded through fp16 (THUDM)."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if variant != "fp32_inv_freq":
        inv_freq = inv_freq.astype(np.float16).astype(np.float32)
    t = np.arange(max_pos, dtype=np.float32)
    freqs = np.outer(t, inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin, pos):
    """x: (n, heads, dim); pos: (n,) -> rotated."""
    c, s = cos[pos][:, None, :], sin[pos][:, None, :]
    return x * c + rotate_half(x) * s


def rotated_qkv(x, sd, i, config, positions, variant: str = ""):
    """q, k, v (n, heads, d) of layer i from its normalised input x (n, hidden), rotary applied to q and k."""
    p = f"transformer.layers.{i}."
    n, hidden, heads = x.shape[0], config["hidden_size"], config["num_attention_heads"]
    d = hidden // heads
    mixed = x @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
    if variant == "qkv_grouped":
        q, k, v = (m.reshape(n, heads, d) for m in np.split(mixed, 3, axis=-1))
    else:
        per_head = mixed.reshape(n, heads, 3 * d)
        q, k, v = per_head[..., :d], per_head[..., d: 2 * d], per_head[..., 2 * d:]
    cos, sin = rotary_tables(d // 2, int(positions.max()) + 1, variant)
    pos, block = positions[0], positions[1]
    second = pos if variant == "no_block_pos" else block
    q = np.concatenate([apply_rotary(q[..., : d // 2], cos, sin, pos), apply_rotary(q[..., d // 2:], cos, sin, second)], -1)
    k = np.concatenate([apply_rotary(k[..., : d // 2], cos, sin, pos), apply_rotary(k[..., d // 2:], cos, sin, second)], -1)
    return q, k, v


def layer(h, sd, i, config, positions, mask, variant: str = ""):
    """One GLMBlock on one sequence. h: (n, hidden) -> (n, hidden)."""
    p = f"transformer.layers.{i}."
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    d = hidden // heads
    eps = config.get("layernorm_epsilon", 1e-5)
    alpha = math.sqrt(2 * config["num_layers"])
    nb = variant == "no_norm_bias"

    def ln(x, name):
        return layer_norm(x, sd[p + name + ".weight"], 0.0 if nb else sd[p + name + ".bias"], eps)

    n = h.shape[0]
    x = ln(h, "input_layernorm")
    q, k, v = rotated_qkv(x, sd, i, config, positions, variant)
    coeff = float(i + 1)
    q = q / (math.sqrt(d) * coeff)
    scores = np.einsum("qhd,khd->hqk", q, k)  # (heads, n, n)
    scores = np.where(mask[None], -10000.0, scores) * coeff
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("hqk,khd->qhd", probs, v).reshape(n, hidden)
    attn = ctx @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
    h = (x if variant != "plain_residual" else h) * (alpha if variant != "plain_residual" else 1.0) + attn
    x2 = ln(h, "post_attention_layernorm")
    mlp = gelu(x2 @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"], variant)
    mlp = mlp @ sd[p + "mlp.dense_4h_to_h.weight"].T + sd[p + "mlp.dense_4h_to_h.bias"]
    return (x2 if variant != "plain_residual" else h) * (alpha if variant != "plain_residual" else 1.0) + mlp


def logits(ids: Sequence[int], config: Dict, sd: Dict[str, np.ndarray], variant: str = "",
           last_only: bool = False) -> np.ndarray:
    """(n, vocab) float64 logits of one unpadded sequence (prompt with [gMASK] <sop>, then any generated ids);
    (1, vocab) for the last position only with ``last_only``."""
    ids = list(ids)
    positions = thudm_positions(ids, config, variant)
    mask = thudm_mask(ids, config, variant)
    h = sd["transformer.word_embeddings.weight"][ids].astype(np.float64)
    for i in range(config["num_layers"]):
        h = layer(h, sd, i, config, positions, mask, variant)
    eps = config.get("layernorm_epsilon", 1e-5)
    bias = 0.0 if variant == "no_norm_bias" else sd["transformer.final_layernorm.bias"]
    h = layer_norm(h[-1:] if last_only else h, sd["transformer.final_layernorm.weight"], bias, eps)
    tied = config.get("tie_word_embeddings", True)  # THUDM leaves transformers' default: lm_head is the embedding
    head = sd["transformer.word_embeddings.weight"] if tied else sd["lm_head.weight"]
    return h @ head.T


def scaled_scores(ids: Sequence[int], config: Dict, sd: Dict[str, np.ndarray], layer_index: int) -> np.ndarray:
    """q.k / sqrt(d) (heads, n, n) of one layer, before any masking: what an fp16 QK^T without THUDM's
    query_key_layer_scaling would have to hold."""
    ids = list(ids)
    positions, mask = thudm_positions(ids, config), thudm_mask(ids, config)
    h = sd["transformer.word_embeddings.weight"][ids].astype(np.float64)
    for i in range(layer_index):
        h = layer(h, sd, i, config, positions, mask)
    p = f"transformer.layers.{layer_index}."
    x = layer_norm(h, sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"],
                   config.get("layernorm_epsilon", 1e-5))
    q, k, _ = rotated_qkv(x, sd, layer_index, config, positions)
    return np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])


def greedy(prompt: Sequence[int], config: Dict, sd: Dict[str, np.ndarray], new_tokens: int) -> List[int]:
    """Greedy ids, recomputing the whole sequence per token."""
    seq = list(prompt)
    out = []
    for _ in range(new_tokens):
        tok = int(np.argmax(logits(seq, config, sd, last_only=True)[-1]))
        out.append(tok)
        seq.append(tok)
    return out
