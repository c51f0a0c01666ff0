"""A layer-streaming PyTorch reference: our model run one decoder layer at a time, each layer's weights read from
the memory-mapped checkpoint (or float bundle) when the forward reaches it and dropped after.

Where it stands: the reference of the streaming export's verification (``exporter.stream_export``) and the float
model of streamed static-INT8 calibration. It computes what ``exporter.verify.run_torch`` computes on the whole
``GlmForExport`` (tests/exporter/test_stream_export.py checks that), for several independent batches of steps at
once: every step's tokens are known in advance (verification's fixed decode tokens, calibration's teacher-forced
text), so layer i can run the prefill and every cached decode step of every batch before layer i + 1 is read.
Held in memory: one layer's weights, the hidden states of all steps (B x S x hidden each) and one layer's KV cache
per batch; the embedding and the LM head are read in row blocks.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from runtime import graph_contract as gc

ROW_BLOCK = 8192  # embedding / LM-head rows read at a time
Observer = Callable[[str, "object", np.ndarray], None]  # (linear name, input (B, S, K) torch, real (B, S) bool)


def _step_tables(spec, inv_freq, ids, mask, pos, dtype):
    """cos, sin (B, 1, S, R/2) and the additive mask bias (B, 1, 1, S, T): exporter.model.GlmForExport.forward's
    prologue, repeated here for one step at a time (kept in step by the equality test)."""
    import torch

    q_len, total = ids.shape[1], mask.shape[1]
    freqs = (pos.float() / spec.rope_position_scale).unsqueeze(-1) * inv_freq  # (B, S, R/2)
    cos = freqs.cos().unsqueeze(1).to(dtype)
    sin = freqs.sin().unsqueeze(1).to(dtype)
    key_pos = torch.arange(total)
    query_pos = torch.arange(q_len) + (total - q_len)
    allowed = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)).unsqueeze(0) & (mask.unsqueeze(1) > 0)
    zero = torch.zeros((), dtype=torch.float32)
    floor = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return cos, sin, torch.where(allowed, zero, floor).unsqueeze(1).unsqueeze(1)


class StreamingReference:
    """``reader``: an ``exporter.stream_source`` reader (``canonical(name, dtype, rows=None)``)."""

    def __init__(self, spec, reader, dtype=None, progress=None):
        import torch

        self.spec, self.reader = spec, reader
        self.dtype = dtype or torch.float32
        self.progress = progress

    def _layer(self, i: int):
        import torch

        from exporter.model import Block

        with torch.device("meta"):
            block = Block(self.spec)
        state = {}
        for name, p in block.named_parameters():
            if name.endswith(".weight_t"):
                state[name] = self.reader.canonical(f"layers.{i}.{name[:-2]}", self.dtype).t().contiguous()
            else:
                state[name] = self.reader.canonical(f"layers.{i}.{name}", self.dtype)
        block.load_state_dict(state, strict=True, assign=True)
        return block.eval().requires_grad_(False)

    def _embed(self, ids_list: List["object"]) -> List["object"]:
        import torch

        vocab, out = self.spec.vocab_size, [None] * len(ids_list)
        for k, ids in enumerate(ids_list):
            out[k] = torch.zeros(tuple(ids.shape) + (self.spec.hidden_size,), dtype=self.dtype)
        for start in range(0, vocab, ROW_BLOCK):
            stop = min(vocab, start + ROW_BLOCK)
            rows = None
            for k, ids in enumerate(ids_list):
                hit = (ids >= start) & (ids < stop)
                if bool(hit.any()):
                    if rows is None:
                        rows = self.reader.canonical("embed.weight", self.dtype, rows=(start, stop))
                    out[k][hit] = rows[ids[hit] - start]
        return out

    def _head(self, xs: List["object"]) -> List[np.ndarray]:
        import torch

        name = "embed.weight" if self.spec.tie_word_embeddings else "lm_head.weight"
        vocab = self.spec.vocab_size
        outs = [np.zeros(tuple(x.shape[:2]) + (vocab,), dtype=np.float32) for x in xs]
        for start in range(0, vocab, ROW_BLOCK):
            stop = min(vocab, start + ROW_BLOCK)
            w = self.reader.canonical(name, self.dtype, rows=(start, stop))  # (rows, hidden)
            for out, x in zip(outs, xs):
                out[..., start:stop] = torch.matmul(x, w.t()).float().numpy()
        return outs

    def run(self, batches: Sequence[Sequence[Dict[str, np.ndarray]]], observe: Optional[Observer] = None,
            logits: bool = True, keep_present: bool = False):
        """Run ``batches`` (each a list of step feeds: input_ids, attention_mask, position_ids; the steps of one
        batch continue each other's KV cache). Returns per batch a list of per-step {"logits": (B, S, vocab)} (and
        "present" on the last step when ``keep_present``), like ``exporter.verify.run_torch``."""
        import torch

        from exporter.model import RMSNorm, inv_frequencies

        spec = self.spec
        inv_freq = inv_frequencies(spec)
        steps = [(b, s, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()})
                 for b, batch in enumerate(batches) for s, feed in enumerate(batch)]
        real = [(feed[gc.ATTENTION_MASK][:, -feed[gc.INPUT_IDS].shape[1]:] > 0).numpy() for _, _, feed in steps]
        tables = [_step_tables(spec, inv_freq, f[gc.INPUT_IDS], f[gc.ATTENTION_MASK], f[gc.POSITION_IDS],
                               self.dtype) for _, _, f in steps]
        xs = self._embed([f[gc.INPUT_IDS] for _, _, f in steps])
        presents: Dict[int, list] = {b: [] for b in range(len(batches))}
        layers = range(spec.num_layers)
        if self.progress is not None:
            layers = self.progress.iterate(layers, total=spec.num_layers, desc="reference layers")
        with torch.no_grad():
            for i in layers:
                block = self._layer(i)
                hooks = []
                current = {"real": None}
                if observe is not None:
                    for lin in ("qkv", "attn_out", "gate_up", "down"):
                        def hook(module, args, _name=f"layers.{i}.{lin}"):
                            observe(_name, args[0], current["real"])
                        hooks.append(getattr(block, lin).register_forward_pre_hook(hook))
                past: Dict[int, tuple] = {}
                for k, (b, s, feed) in enumerate(steps):
                    if s == 0:
                        empty = torch.zeros((feed[gc.INPUT_IDS].shape[0], spec.num_kv_heads, 0, spec.head_dim),
                                            dtype=self.dtype)
                        past[b] = (empty, empty)
                    current["real"] = real[k]
                    cos, sin, bias = tables[k]
                    xs[k], k_all, v_all = block(xs[k], cos, sin, bias, past[b][0], past[b][1])
                    past[b] = (k_all, v_all)
                for h in hooks:
                    h.remove()
                if keep_present:
                    for b in presents:
                        presents[b] += [past[b][0].float().numpy(), past[b][1].float().numpy()]
                del block, past
            norm = RMSNorm(spec.hidden_size, spec.norm_eps)
            norm.weight = torch.nn.Parameter(self.reader.canonical("final_norm.weight", self.dtype),
                                             requires_grad=False)
            xs = [norm(x) for x in xs]
            if observe is not None and not spec.tie_word_embeddings:
                for k, x in enumerate(xs):
                    observe("lm_head", x, real[k])
            out: List[List[Dict]] = [[] for _ in batches]
            heads = self._head(xs) if logits else [None] * len(xs)
        for (b, s, _), lg in zip(steps, heads):
            out[b].append({gc.LOGITS: lg})
        if keep_present:
            for b in presents:
                out[b][-1]["present"] = presents[b]
        return out
