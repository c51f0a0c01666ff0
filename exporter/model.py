"""Our export-friendly PyTorch ChatGLM (ChatGLM2/3 block, GLM-4-9B, GLM-4-0414) with an explicit KV-cache signature.

forward(input_ids, attention_mask, position_ids, past_0_key, past_0_value, ...) -> (logits, present_0_key, ...)
Every model difference comes from the ModelSpec. Written for tracing: no data-dependent Python control flow, no cache
objects, softmax and norm reductions in fp32, queries scaled before QK^T.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

from runtime.spec import ModelSpec


class Linear(nn.Module):
    """y = x @ weight_t (+ bias), with the weight stored transposed as (in, out).

    The checkpoint's (out, in) weight is transposed once at load; the ONNX graph then holds a plain MatMul on a
    (K, N) initializer, which is what onnxruntime's quantizers and TensorRT expect, and the exporter never has to
    fold a Transpose (which would copy every weight during export).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of each head, pairs interleaved (0&1, 2&3, ...); the rest pass through.

    x: (B, heads, S, D); cos, sin: (B, 1, S, rotary_dim / 2)
    """
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    x0 = rot[..., 0::2]  # (B, heads, S, R/2)
    x1 = rot[..., 1::2]
    out0 = x0 * cos - x1 * sin
    out1 = x1 * cos + x0 * sin
    rotated = torch.stack((out0, out1), dim=-1).flatten(-2)  # (B, heads, S, R)
    return torch.cat((rotated, rest), dim=-1)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.spec = spec
        self.input_norm = RMSNorm(h, spec.norm_eps)
        self.qkv = Linear(h, (spec.num_heads + 2 * spec.num_kv_heads) * d, bias=spec.qkv_bias)
        self.attn_out = Linear(spec.num_heads * d, h, bias=False)
        self.post_attn_norm = RMSNorm(h, spec.norm_eps)
        self.gate_up = Linear(h, 2 * spec.ffn_hidden_size, bias=False)
        self.down = Linear(spec.ffn_hidden_size, h, bias=False)
        if spec.sandwich_norms:
            self.post_self_attn_norm = RMSNorm(h, spec.norm_eps)
            self.post_mlp_norm = RMSNorm(h, spec.norm_eps)
        if spec.prefix_len:  # P-tuning v2 prefix, set by set_prefix_kv: (1, KV, prefix_len, D), never rotated
            prefix_shape = (1, spec.num_kv_heads, spec.prefix_len, d)
            self.register_buffer("prefix_key", torch.zeros(prefix_shape), persistent=False)
            self.register_buffer("prefix_value", torch.zeros(prefix_shape), persistent=False)

    def attention(self, x, cos, sin, mask_bias, past_k, past_v):
        """x: (B, S, hidden); mask_bias: (B, 1, 1, S, T) additive fp32; past: (B, KV, P, D)."""
        s = self.spec
        b, q_len = x.shape[0], x.shape[1]
        nh, nkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        rep = nh // nkv
        qkv = self.qkv(x)  # (B, S, (nh + 2 nkv) D): [Q heads | K groups | V groups]
        q = qkv[..., : nh * d].reshape(b, q_len, nh, d).transpose(1, 2)  # (B, nh, S, D)
        k = qkv[..., nh * d : (nh + nkv) * d].reshape(b, q_len, nkv, d).transpose(1, 2)  # (B, nkv, S, D)
        v = qkv[..., (nh + nkv) * d :].reshape(b, q_len, nkv, d).transpose(1, 2)
        q = apply_rotary(q, cos, sin, s.rotary_dim)
        k = apply_rotary(k, cos, sin, s.rotary_dim)
        k_all = torch.cat((past_k, k), dim=2)  # (B, nkv, T, D), T = P + S
        v_all = torch.cat((past_v, v), dim=2)
        if s.prefix_len:  # the fixed P-tuning prefix goes first; the presents returned below exclude it
            k_att = torch.cat((self.prefix_key.expand(b, -1, -1, -1).to(k_all.dtype), k_all), dim=2)
            v_att = torch.cat((self.prefix_value.expand(b, -1, -1, -1).to(v_all.dtype), v_all), dim=2)
        else:
            k_att, v_att = k_all, v_all
        # grouped-query attention without repeating K/V: head h uses group h // rep
        q = q * (1.0 / d**0.5)  # scale before QK^T: keeps fp16 scores in range
        qg = q.reshape(b, nkv, rep * q_len, d)  # (B, nkv, rep*S, D)
        scores = torch.matmul(qg, k_att.transpose(-1, -2)).float()  # (B, nkv, rep*S, prefix + T)
        scores = scores.reshape(b, nkv, rep, q_len, -1) + mask_bias  # (B, nkv, rep, S, prefix + T)
        probs = torch.softmax(scores, dim=-1).to(v_att.dtype)
        out = torch.matmul(probs.reshape(b, nkv, rep * q_len, -1), v_att)  # (B, nkv, rep*S, D)
        out = out.reshape(b, nh, q_len, d).transpose(1, 2).reshape(b, q_len, nh * d)  # (B, S, nh*D)
        return self.attn_out(out), k_all, v_all

    def forward(self, x, cos, sin, mask_bias, past_k, past_v):
        attn, k_all, v_all = self.attention(self.input_norm(x), cos, sin, mask_bias, past_k, past_v)
        if self.spec.sandwich_norms:
            attn = self.post_self_attn_norm(attn)
        x = x + attn
        gate, up = self.gate_up(self.post_attn_norm(x)).chunk(2, dim=-1)  # first half gate, second half up
        mlp = self.down(nn.functional.silu(gate) * up)
        if self.spec.sandwich_norms:
            mlp = self.post_mlp_norm(mlp)
        return x + mlp, k_all, v_all


class GlmForExport(nn.Module):
    """A ChatGLM decoder with past/present KV tensors as plain inputs and outputs."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.final_norm = RMSNorm(spec.hidden_size, spec.norm_eps)
        if not spec.tie_word_embeddings:
            self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", inv_frequencies(spec), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, *past: torch.Tensor):
        """input_ids, position_ids: (B, S) int64; attention_mask: (B, T) int64, T = past + S;
        past: 2 * layers tensors (B, kv_heads, P, D). Returns logits (B, S, vocab) fp32 and 2 * layers presents."""
        s = self.spec
        x = self.embed(input_ids)  # (B, S, hidden)
        if s.prefix_len:  # the P-tuning prefix is always attended: (B, T) -> (B, prefix + T)
            prefix_mask = torch.ones_like(attention_mask[:, :1]).repeat(1, s.prefix_len)
            attention_mask = torch.cat((prefix_mask, attention_mask), dim=1)
        q_len, total = input_ids.shape[1], attention_mask.shape[1]
        # rotary tables in fp32, cast to the model dtype like the reference implementation
        pos = position_ids.float() / s.rope_position_scale  # (B, S)
        freqs = pos.unsqueeze(-1) * self.inv_freq  # (B, S, R/2)
        cos = freqs.cos().unsqueeze(1).to(x.dtype)  # (B, 1, S, R/2)
        sin = freqs.sin().unsqueeze(1).to(x.dtype)
        # causal + padding mask as an additive fp32 bias (B, 1, 1, S, T)
        key_pos = torch.arange(total, device=input_ids.device)  # (T,)
        query_pos = torch.arange(q_len, device=input_ids.device) + (total - q_len)  # (S,)
        causal = key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)  # (S, T)
        allowed = causal.unsqueeze(0) & (attention_mask.unsqueeze(1) > 0)  # (B, S, T)
        zero = torch.zeros((), dtype=torch.float32)
        floor = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
        mask_bias = torch.where(allowed, zero, floor).unsqueeze(1).unsqueeze(1)
        presents: List[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, k_all, v_all = layer(x, cos, sin, mask_bias, past[2 * i], past[2 * i + 1])
            presents += [k_all, v_all]
        return (head_logits(self, x), *presents)


def head_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, S, hidden) last hidden states -> (B, S, vocab) fp32 logits: the model's final norm, then its LM head (or
    the tied embedding). Shared by both export models (this one and exporter/model_v1.py)."""
    x = model.final_norm(x)
    if model.spec.tie_word_embeddings:
        return torch.matmul(x, model.embed.weight.t()).float()
    return model.lm_head(x).float()


def inv_frequencies(spec: ModelSpec) -> torch.Tensor:
    """(rotary_dim / 2,) fp32: 1 / theta^(2i / rotary_dim)."""
    exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.float32) / spec.rotary_dim
    return 1.0 / (spec.rope_theta**exponents)


def model_from_weights(spec: ModelSpec, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> GlmForExport:
    """Build the model on the meta device and adopt each tensor as its parameter, so the weights are held once.

    Canonical names are the checkpoint's orientation ("qkv.weight": (out, in)); linear weights are transposed here,
    one tensor at a time, into ``weight_t``.
    """
    model_class, freqs = export_model_class(spec)
    with torch.device("meta"):
        model = model_class(spec)
    linear_weights = {n[: -len(".weight_t")] for n, _ in model.named_parameters() if n.endswith(".weight_t")}
    state = {}
    for name, tensor in named_tensors:
        stem = name[: -len(".weight")]
        if stem in linear_weights:
            state[stem + ".weight_t"] = tensor.t().contiguous()
            del tensor
        else:
            state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = freqs(spec)
    return model.eval().requires_grad_(False)


def export_model_class(spec: ModelSpec):
    """(model class, its inverse-frequency function) for the spec: ChatGLM-6B's v1 block lives in its own module."""
    from exporter.model_v1 import GlmV1ForExport, uses_v1_block, v1_inv_frequencies

    if uses_v1_block(spec):
        return GlmV1ForExport, v1_inv_frequencies
    return GlmForExport, inv_frequencies
def set_prefix_kv(model: GlmForExport, prefix_kv: torch.Tensor) -> None:
    """Adopt the P-tuning v2 prefix, (layers, 2, kv_heads, prefix_len, head_dim): [:, 0] keys, [:, 1] values."""
    s = model.spec
    want = (s.num_layers, 2, s.num_kv_heads, s.prefix_len, s.head_dim)
    if tuple(prefix_kv.shape) != want:
        raise ValueError(f"prefix KV has shape {tuple(prefix_kv.shape)}, expected {want}")
    dtype = next(model.parameters()).dtype
    for i, layer in enumerate(model.layers):
        layer.prefix_key = prefix_kv[i, 0].unsqueeze(0).to(dtype).contiguous()  # (1, KV, prefix_len, D)
        layer.prefix_value = prefix_kv[i, 1].unsqueeze(0).to(dtype).contiguous()


def canonical_state(model: GlmForExport) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`model_from_weights`: our parameter names in checkpoint orientation
    ("layers.0.qkv.weight": (out, in))."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight_t"):
            out[name[: -len("_t")]] = p.detach().t().contiguous()
        else:
            out[name] = p.detach().contiguous()
    return out


def torch_empty_past(spec: ModelSpec, batch: int, dtype=torch.float32) -> List[torch.Tensor]:
    """``runtime.steps.empty_past`` as torch tensors, in the model's argument order (the pasts' shape rule lives
    there): each (batch, kv_heads, 0, head_dim)."""
    from runtime.steps import empty_past

    np_dtype = torch.zeros((), dtype=dtype).numpy().dtype
    return [torch.from_numpy(a.copy()) for a in empty_past(spec, batch, np_dtype).values()]
