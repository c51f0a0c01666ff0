"""Test helpers: drive an exported bundle step by step through its KV cache with plain onnxruntime, and run the
transformers reference on the same inputs (full recompute, no cache)."""
from __future__ import annotations

import numpy as np
import torch

from runtime import graph_contract as gc
from runtime.manifest import read_manifest
from runtime.positions import PositionRule
from runtime.steps import decode_feeds, empty_past, left_pad, past_from_outputs, positions_from_mask, token_feeds


class OnnxStepper:
    """Prefill then single-token steps, presents fed back as pasts (``past``: the cache, by input name)."""

    def __init__(self, bundle_dir):
        from runtime.backends.onnxruntime import new_session

        self.manifest = read_manifest(bundle_dir)
        self.spec = self.manifest.spec
        self.session = new_session(f"{bundle_dir}/{self.manifest.model_file}", threads=1)
        self.names = [o.name for o in self.session.get_outputs()]

    def start(self, ids: np.ndarray, mask: np.ndarray):
        """ids, mask: (B, S) left-padded. Returns prefill logits (B, S, V). Positions by the spec's rule
        (runtime.positions: sequential, or ChatGLM-6B's 2D)."""
        self.past = empty_past(self.spec, ids.shape[0], self.manifest.kv_dtype)
        self.rows = PositionRule.from_spec(self.spec).rows([r[m > 0].tolist() for r, m in zip(ids, mask)])
        self.next_index = self.rows.prompt_length.copy()
        return self._run(token_feeds(ids, mask, self.rows.prompt(ids.shape[1])))

    def step(self, tokens: np.ndarray):
        """tokens: (B,) -> logits (B, V) of the new position."""
        feeds = decode_feeds(tokens, self.mask)
        feeds[gc.POSITION_IDS] = self.rows.step(self.next_index)[..., None]
        self.next_index = self.next_index + 1
        return self._run(feeds)[:, -1]

    def _run(self, feeds):
        self.mask = feeds[gc.ATTENTION_MASK]
        out = dict(zip(self.names, self.session.run(None, {**feeds, **self.past})))
        self.past = past_from_outputs(self.spec, out)
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
    feeds = token_feeds(ids, mask, positions_from_mask(mask))
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, use_cache=False)
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
    ids, mask, _ = left_pad([rng.integers(0, vocab, n) for n in lengths], pad_id)
    return ids, mask
