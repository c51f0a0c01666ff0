"""Our export-friendly PyTorch ChatGLM-6B (v1, generation "chatglm1"), with the same explicit KV-cache signature.

forward(input_ids, attention_mask, position_ids [B, 2, S], past_0_key, past_0_value, ...) -> (logits, present_0_key, ...)

THUDM's modeling_chatglm.py for chatglm-6b is the authority (read, not copied); each difference from the ChatGLM2+
block in exporter/model.py is a spec field, resolved in exporter/config.py:

* ``norm_kind`` layernorm: LayerNorm with weight and bias (reductions in fp32);
* ``activation`` gelu_tanh and ``linear_bias``: a GELU (tanh form) MLP, biases on every linear;
* ``residual`` normed_scaled: ``h = norm(x) * alpha + f(norm(x))`` for both branches, alpha = sqrt(2 * layers);
* ``qkv_layout`` per_head: query_key_value rows are [q_h | k_h | v_h] for each head h;
* ``rotary_kind`` 2d_rotate_half: a head's first half rotates by the position id, its second half by the block
  position id, each with rotate-half pairs (i, i + R/2) over R = head_dim / 2 dims;
* ``rotary_freq_dtype`` float16: inverse frequencies rounded through fp16, as THUDM's ``inv_freq.half()``;
* ``attention_kind`` prefix_lm: a key of this chunk with block position 0 (context) is seen by every query of the
  chunk, the rest causally (the runtime puts the whole context in the first chunk: runtime/positions.py);
* ``query_key_layer_scaling``: q is divided by sqrt(d) * (layer + 1) before QK^T and the fp32 scores multiplied
  back, which keeps fp16 QK^T of the deep layers in range (no effect in fp32 beyond rounding).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from runtime.spec import (
    ACT_GELU_TANH,
    ATTENTION_PREFIX_LM,
    NORM_LAYER,
    POSITIONS_2D_BLOCK,
    QKV_PER_HEAD,
    RESIDUAL_NORMED_SCALED,
    ROTARY_2D_HALF,
    ModelSpec,
)

from exporter.model import Linear, head_logits

# the variant values this module implements; a spec asking for another combination is refused at build time
_V1_FIELDS = {
    "norm_kind": NORM_LAYER,
    "activation": ACT_GELU_TANH,
    "residual": RESIDUAL_NORMED_SCALED,
    "qkv_layout": QKV_PER_HEAD,
    "rotary_kind": ROTARY_2D_HALF,
    "position_kind": POSITIONS_2D_BLOCK,
    "attention_kind": ATTENTION_PREFIX_LM,
}


def uses_v1_block(spec: ModelSpec) -> bool:
    """True when the spec describes THUDM's original (v1) block, which this module builds."""
    return spec.position_kind == POSITIONS_2D_BLOCK


class LayerNorm(nn.Module):
    """LayerNorm with bias; mean and variance in fp32, the affine part in the model dtype."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean = x32.mean(-1, keepdim=True)
        centred = x32 - mean
        normed = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight + self.bias


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh form, written out (opset 17 has no Gelu operator)."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotate_half_2d(x: torch.Tensor, cos_pos, sin_pos, cos_block, sin_block) -> torch.Tensor:
    """x: (B, heads, S, D); cos/sin: (B, 1, S, D/2) each. First half of D by the position, second by the block
    position; within a half of R dims, dim i pairs with i + R/2 (rotate-half)."""
    half = x.shape[-1] // 2
    return torch.cat((_rotate(x[..., :half], cos_pos, sin_pos), _rotate(x[..., half:], cos_block, sin_block)), -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = x.shape[-1] // 2
    rotated = torch.cat((-x[..., r:], x[..., :r]), dim=-1)
    return x * cos + rotated * sin


def v1_inv_frequencies(spec: ModelSpec) -> torch.Tensor:
    """(rotary_dim / 2,) fp32: 1 / theta^(2i / rotary_dim), rounded through ``spec.rotary_freq_dtype``."""
    exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.float32) / spec.rotary_dim
    inv = 1.0 / (spec.rope_theta**exponents)
    return inv.to(getattr(torch, spec.rotary_freq_dtype)).float()


class V1Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int):
        super().__init__()
        h, d, nh = spec.hidden_size, spec.head_dim, spec.num_heads
        self.spec = spec
        self.coeff = float(layer_id + 1) if spec.query_key_layer_scaling else 1.0
        self.input_norm = LayerNorm(h, spec.norm_eps)
        self.qkv = Linear(h, 3 * nh * d, bias=True)
        self.attn_out = Linear(nh * d, h, bias=spec.linear_bias)
        self.post_attn_norm = LayerNorm(h, spec.norm_eps)
        self.up = Linear(h, spec.ffn_hidden_size, bias=spec.linear_bias)
        self.down = Linear(spec.ffn_hidden_size, h, bias=spec.linear_bias)

    def attention(self, x, rotary, mask_bias, past_k, past_v):
        """x: (B, S, hidden); mask_bias: (B, 1, S, T) additive fp32; past: (B, heads, P, D)."""
        s = self.spec
        b, q_len = x.shape[0], x.shape[1]
        nh, d = s.num_heads, s.head_dim
        qkv = self.qkv(x).reshape(b, q_len, nh, 3 * d)  # per head: [q_h | k_h | v_h]
        q, k, v = (t.transpose(1, 2) for t in qkv.split(d, dim=-1))  # (B, nh, S, D) each
        q = rotate_half_2d(q, *rotary)
        k = rotate_half_2d(k, *rotary)
        k_all = torch.cat((past_k, k), dim=2)  # (B, nh, T, D)
        v_all = torch.cat((past_v, v), dim=2)
        q = q * (1.0 / (d**0.5 * self.coeff))  # query_key_layer_scaling: smaller fp16 QK^T in deep layers
        scores = torch.matmul(q, k_all.transpose(-1, -2)).float() * self.coeff + mask_bias  # (B, nh, S, T) fp32
        probs = torch.softmax(scores, dim=-1).to(v_all.dtype)
        out = torch.matmul(probs, v_all).transpose(1, 2).reshape(b, q_len, nh * d)  # (B, S, nh*D)
        return self.attn_out(out), k_all, v_all

    def forward(self, x, rotary, mask_bias, past_k, past_v):
        alpha = self.spec.residual_alpha
        normed = self.input_norm(x)
        attn, k_all, v_all = self.attention(normed, rotary, mask_bias, past_k, past_v)
        x = normed * alpha + attn  # residual from the normalised input, scaled
        normed = self.post_attn_norm(x)
        x = normed * alpha + self.down(gelu_tanh(self.up(normed)))
        return x, k_all, v_all


class GlmV1ForExport(nn.Module):
    """ChatGLM-6B with past/present KV tensors as plain inputs and outputs."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        wrong = {k: getattr(spec, k) for k, v in _V1_FIELDS.items() if getattr(spec, k) != v}
        if wrong:
            raise ValueError(f"GlmV1ForExport builds the v1 block only; spec asks for {wrong}")
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(V1Block(spec, i) for i in range(spec.num_layers))
        self.final_norm = LayerNorm(spec.hidden_size, spec.norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", v1_inv_frequencies(spec), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past: torch.Tensor):
        """input_ids: (B, S) int64; position_ids: (B, 2, S) int64 (position, block position); attention_mask:
        (B, T) int64, T = past + S; past: 2 * layers tensors (B, heads, P, D)."""
        x = self.embed(input_ids)  # (B, S, hidden)
        q_len, total = input_ids.shape[1], attention_mask.shape[1]
        rotary = []
        for row in (0, 1):  # position, block position
            freqs = position_ids[:, row, :].float().unsqueeze(-1) * self.inv_freq  # (B, S, R/2)
            freqs = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, S, R): rotate-half layout
            rotary += [freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)]
        rotary = (rotary[0], rotary[1], rotary[2], rotary[3])  # cos_pos, sin_pos, cos_block, sin_block
        # prefix-LM + padding mask (B, 1, S, T): causal, or a context key (block position 0) of this chunk
        key_pos = torch.arange(total, device=input_ids.device)  # (T,)
        query_pos = torch.arange(q_len, device=input_ids.device) + (total - q_len)  # (S,)
        causal = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)  # (S, T)
        past_cols = torch.zeros_like(attention_mask[:, : total - q_len], dtype=torch.bool)  # (B, P)
        context_key = torch.cat((past_cols, position_ids[:, 1, :] == 0), dim=1)  # (B, T)
        allowed = (causal.unsqueeze(0) | context_key.unsqueeze(1)) & (attention_mask.unsqueeze(1) > 0)  # (B, S, T)
        zero = torch.zeros((), dtype=torch.float32)
        floor = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
        mask_bias = torch.where(allowed, zero, floor).unsqueeze(1)
        presents: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k_all, v_all = layer(x, rotary, mask_bias, past[2 * i], past[2 * i + 1])
            presents += [k_all, v_all]
        return (head_logits(self, x), *presents)
