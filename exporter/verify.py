"""Numerical verification of an exported graph against our PyTorch model: prefill, then cached decode steps.

The reference run happens first and keeps only its outputs (small), so the PyTorch model can be freed before
onnxruntime loads the graph: a large export never holds the weights three times.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from runtime import graph_contract as gc
from runtime.positions import BatchPositions, PositionRule
from runtime.spec import ModelSpec
from runtime.steps import decode_feeds, empty_past, past_from_outputs, positions_from_mask, token_feeds


@dataclass
class VerifyPlan:
    """A left-padded batch: prompt ids (B, S) with mask, then ``decode_steps`` fixed single tokens per row."""

    input_ids: np.ndarray  # (B, S) int64
    attention_mask: np.ndarray  # (B, S) int64
    decode_tokens: np.ndarray  # (steps, B) int64
    positions: Optional[BatchPositions] = None  # the spec's numbering (None: sequential)


def make_plan(spec: ModelSpec, batch: int = 2, prompt_len: int = 7, pad: int = 3, steps: int = 3, seed: int = 0):
    """Random prompts; with 2D positions (ChatGLM-6B) each ends with [gMASK] <sop>, as real prompts do."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, spec.vocab_size, size=(batch, prompt_len), dtype=np.int64)
    mask = np.ones((batch, prompt_len), dtype=np.int64)
    rule = PositionRule.from_spec(spec)
    if rule.two_d:
        ids[:, -2:] = (rule.mask_ids[-1], rule.sop_id)
    for row in range(1, batch):  # rows after the first are left-padded
        mask[row, : min(pad, prompt_len - 1)] = 0
        ids[row, : min(pad, prompt_len - 1)] = spec.pad_token_id
    decode = rng.integers(0, spec.vocab_size, size=(steps, batch), dtype=np.int64)
    rows = rule.rows([list(r[m > 0]) for r, m in zip(ids, mask)])
    return VerifyPlan(ids, mask, decode, rows)


def step_feeds(plan: VerifyPlan) -> List[Dict[str, np.ndarray]]:
    """The non-cache inputs of each step: the prefill, then one token per row."""
    mask = plan.attention_mask
    rows = plan.positions
    prompt_pos = rows.prompt(mask.shape[1]) if rows is not None else positions_from_mask(mask)
    feeds = [token_feeds(plan.input_ids, mask, prompt_pos)]
    for k, tok in enumerate(plan.decode_tokens):
        step = decode_feeds(tok, feeds[-1][gc.ATTENTION_MASK])
        if rows is not None:
            step[gc.POSITION_IDS] = rows.step(rows.prompt_length + k)[..., None]
        feeds.append(step)
    return feeds


def real_positions(feed: Dict[str, np.ndarray]) -> np.ndarray:
    """(B, S) bool: which query positions of this step are real tokens (padding rows' outputs are not compared)."""
    s = feed[gc.INPUT_IDS].shape[1]
    return feed[gc.ATTENTION_MASK][:, -s:] > 0


def run_torch(model, spec: ModelSpec, plan: VerifyPlan) -> List[Dict[str, np.ndarray]]:
    """Logits of every step from our PyTorch model, feeding its own presents back as pasts."""
    import torch

    from exporter.model import torch_empty_past

    dtype = next(model.parameters()).dtype
    past = torch_empty_past(spec, plan.input_ids.shape[0], dtype)
    out = []
    with torch.no_grad():
        for feed in step_feeds(plan):
            args = [torch.from_numpy(feed[k]) for k in (gc.INPUT_IDS, gc.ATTENTION_MASK, gc.POSITION_IDS)]
            logits, *past = model(*args, *past)
            out.append({gc.LOGITS: logits.float().numpy()})
        out[-1]["present"] = [p.float().numpy() for p in past]
    return out


def run_onnx(session, spec: ModelSpec, plan: VerifyPlan, kv_dtype=np.float32) -> List[Dict[str, np.ndarray]]:
    """The same steps through an onnxruntime session, presents fed back as pasts."""
    past = empty_past(spec, plan.input_ids.shape[0], kv_dtype)
    names = [o.name for o in session.get_outputs()]
    out = []
    for feed in step_feeds(plan):
        results = dict(zip(names, session.run(None, {**feed, **past})))
        past = past_from_outputs(spec, results)
        out.append({gc.LOGITS: results[gc.LOGITS].astype(np.float32)})
    out[-1]["present"] = [past[name].astype(np.float32) for name in gc.past_names(spec.num_layers)]  # layer order
    return out


def max_diffs(plan: VerifyPlan, got: List[Dict], want: List[Dict]) -> Dict[str, float]:
    """Max |got - want| of the logits per step (real positions only) and of the final KV cache (real tokens)."""
    diffs = {}
    for step, (feed, g, w) in enumerate(zip(step_feeds(plan), got, want)):
        real = real_positions(feed)
        name = "logits.prefill" if step == 0 else f"logits.decode{step}"
        diffs[name] = float(np.abs(g[gc.LOGITS] - w[gc.LOGITS])[real].max())
    final_mask = step_feeds(plan)[-1][gc.ATTENTION_MASK] > 0  # (B, T)
    kv = 0.0
    for g, w in zip(got[-1]["present"], want[-1]["present"]):
        kv = max(kv, float(np.abs(g - w).transpose(0, 2, 1, 3)[final_mask].max()))
    diffs["present"] = kv
    return diffs
