"""Test helpers: drive an exported bundle step by step through its KV cache with plain onnxruntime, and run the
transformers reference on the same inputs (full recompute, no cache)."""
from __future__ import annotations

import numpy as np
import torch

from runtime import graph_contract as gc
from runtime.manifest import read_manifest


class OnnxStepper:
    """Prefill then single-token steps, presents fed back as pasts."""

    def __init__(self, bundle_dir):
        import onnxruntime as ort

        self.manifest = read_manifest(bundle_dir)
        self.spec = self.manifest.spec
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(f"{bundle_dir}/{self.manifest.model_file}", opts,
                                            providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def start(self, ids: np.ndarray, mask: np.ndarray):
        """ids, mask: (B, S) left-padded. Returns prefill logits (B, S, V)."""
        b = ids.shape[0]
        s = self.spec
        self.past = {}
        for i in range(s.num_layers):
            empty = np.zeros((b, s.num_kv_heads, 0, s.head_dim), np.float32)
            self.past[gc.past_key_name(i)] = empty
            self.past[gc.past_value_name(i)] = empty
        self.mask = mask.astype(np.int64)
        pos = np.clip(np.cumsum(self.mask, 1) - 1, 0, None)
        return self._run(ids, pos)

    def step(self, tokens: np.ndarray):
        """tokens: (B,) -> logits (B, V) of the new position."""
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), np.int64)], 1)
        pos = (self.mask.sum(1, keepdims=True) - 1).astype(np.int64)
        return self._run(tokens[:, None].astype(np.int64), pos)[:, -1]

    def _run(self, ids, pos):
        feeds = {gc.INPUT_IDS: ids.astype(np.int64), gc.ATTENTION_MASK: self.mask, gc.POSITION_IDS: pos, **self.past}
        out = dict(zip(self.names, self.session.run(None, feeds)))
        for i in range(self.spec.num_layers):
            self.past[gc.past_key_name(i)] = out[gc.present_key_name(i)]
            self.past[gc.past_value_name(i)] = out[gc.present_value_name(i)]
        return out[gc.LOGITS]

    def greedy(self, ids, mask, new_tokens: int, eos=()):
        logits = self.start(ids, mask)[:, -1]
        out = []
        for _ in range(new_tokens):
            tok = logits.argmax(-1)
            out.append(tok)
            logits = self.step(tok)
        gen = np.stack(out, 1)
        return [_cut_at_eos(row.tolist(), eos) for row in gen]


def _cut_at_eos(ids, eos):
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def reference_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits (B, S, V) for a whole left-padded sequence, no cache."""
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            position_ids=torch.from_numpy(pos.astype(np.int64)),
            use_cache=False,
        )
    return out.logits.float().numpy()


def reference_greedy(model, ids, mask, new_tokens: int, eos=()):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=list(eos) or None,
            pad_token_id=0,
        )
    gen = out[:, ids.shape[1]:].numpy()
    return [_cut_at_eos(row.tolist(), eos) for row in gen]


def left_padded_batch(vocab: int, lengths, seed: int = 0, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded to the longest: ids and mask (B, S)."""
    rng = np.random.default_rng(seed)
    s = max(lengths)
    ids = np.full((len(lengths), s), pad_id, np.int64)
    mask = np.zeros((len(lengths), s), np.int64)
    for r, n in enumerate(lengths):
        ids[r, s - n:] = rng.integers(0, vocab, n)
        mask[r, s - n:] = 1
    return ids, mask
