"""An independent reference for THUDM-layout checkpoints with a P-tuning v2 prefix: plain numpy, float64, full
recompute (no cache), written from THUDM's ChatGLM2/3 modeling_chatglm.py as read (not from exporter/):

- prefix: ``get_prompt`` runs the prefix encoder on tokens 0..pre_seq_len-1 (embedding, with prefix_projection
  then Linear -> tanh -> Linear), views each row as (num_layers * 2, kv_groups, kv_channels) and takes entry 2i as
  layer i's cached key, 2i + 1 as its value; those keys are not rotated.
- mask: ``forward`` puts pre_seq_len ones before the attention mask; ``get_masks`` lets each query see every cached
  (prefix) column, then causal columns that are not padding (without a prefix, a padding query row sees all).
- positions: the tokenizer's position ids, 0 on left padding, 0..n-1 on the real tokens (the prefix is not counted).
- block: RMSNorm, fused query_key_value [Q heads | K groups | V groups] + bias, rotary on the first half of each
  head with interleaved pairs (``RotaryEmbedding(kv_channels // 2)``, base 10000 * rope_ratio), grouped attention
  scaled by 1/sqrt(kv_channels), dense, SwiGLU (first half gate).
"""
from __future__ import annotations

import json
import os

import numpy as np


def _tensors(directory):
    import torch
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            out.update({k: v.double().numpy() for k, v in load_file(path).items()})
        elif name.endswith(".bin"):
            out.update({k: v.double().numpy() for k, v in torch.load(path, weights_only=True).items()})
    return out


def _rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _rope(x, pos, base):
    """x (B, S, H, D): rotate the first D/2 dims, pairs (0,1), (2,3), ...; pos (B, S)."""
    d = x.shape[-1]
    n_elem = d // 2
    theta = 1.0 / base ** (np.arange(0, n_elem, 2) / n_elem)  # (D/4,)
    ang = pos[..., None].astype(np.float64) * theta  # (B, S, D/4)
    cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]  # (B, S, 1, D/4)
    rot, rest = x[..., :n_elem], x[..., n_elem:]
    x0, x1 = rot[..., 0::2], rot[..., 1::2]
    out = np.empty_like(rot)
    out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x1 * cos + x0 * sin
    return np.concatenate([out, rest], -1)


def prefix_from_encoder(w, cfg):
    """(layers * 2, pre_seq_len, kv_groups, kv_channels): THUDM's get_prompt for one batch row."""
    rows = w["transformer.prefix_encoder.embedding.weight"]
    if cfg.get("prefix_projection"):
        p = "transformer.prefix_encoder.trans."
        rows = np.tanh(rows @ w[p + "0.weight"].T + w[p + "0.bias"]) @ w[p + "2.weight"].T + w[p + "2.bias"]
    L, kv, d = cfg["num_layers"], cfg["multi_query_group_num"], cfg["kv_channels"]
    return rows.reshape(cfg["pre_seq_len"], L * 2, kv, d).transpose(1, 0, 2, 3)


def thudm_logits(ckpt_dir, ids, mask, prefix_dir=None):
    """float64 logits (B, S, V) of a left-padded batch (ids, mask: (B, S))."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    w = _tensors(ckpt_dir)
    if prefix_dir is not None:
        with open(os.path.join(prefix_dir, "config.json")) as f:
            pcfg = json.load(f)
        cfg.update(pre_seq_len=pcfg["pre_seq_len"], prefix_projection=pcfg.get("prefix_projection", False))
        w.update(_tensors(prefix_dir))
    L, nh, kv, d = cfg["num_layers"], cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, base = cfg["layernorm_epsilon"], 10000.0 * (cfg.get("rope_ratio") or 1)
    P = cfg.get("pre_seq_len") or 0
    b, s = ids.shape
    prefix = prefix_from_encoder(w, cfg) if P else None
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    causal = np.tril(np.ones((s, s)))[None] * mask[:, None, :]  # (B, S, S)
    allowed = np.concatenate([np.ones((b, s, P)), causal], -1) > 0.5  # (B, S, P + S)
    if not P:  # get_masks without a cache: a padding query row sees every column (its output is never used)
        allowed |= (mask[:, :, None] == 0)
    x = w["transformer.embedding.word_embeddings.weight"][ids]  # (B, S, h)
    for i in range(L):
        pre = f"transformer.encoder.layers.{i}."
        xn = _rms(x, w[pre + "input_layernorm.weight"], eps)
        qkv = xn @ w[pre + "self_attention.query_key_value.weight"].T
        qkv = qkv + w.get(pre + "self_attention.query_key_value.bias", 0.0)
        q = qkv[..., : nh * d].reshape(b, s, nh, d)
        k = qkv[..., nh * d: (nh + kv) * d].reshape(b, s, kv, d)
        v = qkv[..., (nh + kv) * d:].reshape(b, s, kv, d)
        q, k = _rope(q, pos, base), _rope(k, pos, base)
        if P:
            k = np.concatenate([np.broadcast_to(prefix[2 * i][None], (b, P, kv, d)), k], 1)  # (B, P + S, kv, d)
            v = np.concatenate([np.broadcast_to(prefix[2 * i + 1][None], (b, P, kv, d)), v], 1)
        ctx = np.empty((b, s, nh, d))
        for hh in range(nh):
            g = hh // (nh // kv)
            scores = np.einsum("bsd,btd->bst", q[:, :, hh], k[:, :, g]) / np.sqrt(d)
            scores = np.where(allowed, scores, -np.inf)
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx[:, :, hh] = np.einsum("bst,btd->bsd", probs, v[:, :, g])
        x = x + ctx.reshape(b, s, nh * d) @ w[pre + "self_attention.dense.weight"].T
        y = _rms(x, w[pre + "post_attention_layernorm.weight"], eps) @ w[pre + "mlp.dense_h_to_4h.weight"].T
        gate, up = np.split(y, 2, -1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[pre + "mlp.dense_4h_to_h.weight"].T
    x = _rms(x, w["transformer.encoder.final_layernorm.weight"], eps)
    return x @ w["transformer.output_layer.weight"].T
