"""Feeds for the graph's KV-cache steps, in numpy: left padding, positions, empty pasts, presents fed back as pasts.

Where it stands: every caller that drives the graph step by step builds its feeds here, so padding and position
rules exist once: the decode loop (``runtime.generate``), the exporter's verification (``exporter.verify``), the
calibration feeds and accuracy figures (``calibration.feeds``, ``calibration.accuracy``) and the tests. Names come
from ``runtime.graph_contract`` (which stays numpy-free); the layout is::

    input_ids       [batch, seq]         pads first, then the sequence (left padding)
    attention_mask  [batch, past + seq]  0 on pads, 1 on every real token
    position_ids    [batch, seq]         cumsum(mask) - 1, clipped at 0: each row counts from its first real token
                                         (ChatGLM-6B's [batch, 2, seq]: runtime.positions, which all callers use)
    past_key_values.{i}.key|value        [batch, kv_heads, past, head_dim]; empty (past 0) for a prefill
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from runtime.graph_contract import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, past_names, present_names
from runtime.spec import ModelSpec


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids [batch, n_max] int64, each row right-aligned (left padding)."""
    n_max = max(len(s) for s in seqs)
    ids = np.full((len(seqs), n_max), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), n_max), dtype=np.int64)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, n_max - len(s):] = s
            mask[r, n_max - len(s):] = 1
    return ids, mask, positions_from_mask(mask)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position of each token counted from its row's first real token; pads get 0. (B, T) -> (B, T) int64"""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def extend_mask(mask: np.ndarray, columns: int = 1) -> np.ndarray:
    """The attention mask after ``columns`` more real tokens per row. (B, T) -> (B, T + columns) int64"""
    mask = np.asarray(mask, dtype=np.int64)
    return np.concatenate([mask, np.ones((mask.shape[0], columns), dtype=np.int64)], axis=1)


def token_feeds(input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The graph's feeds by name: the three token inputs (as int64), then the pasts when given."""
    feeds = {
        INPUT_IDS: np.asarray(input_ids, dtype=np.int64),
        ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64),
        POSITION_IDS: np.asarray(position_ids, dtype=np.int64),
    }
    if past is not None:
        feeds.update(past)
    return feeds


def decode_feeds(tokens: np.ndarray, attention_mask: np.ndarray,
                 past: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Feeds of one decode step: one token per row (tokens [batch]) after ``attention_mask`` [batch, past]; the
    step's mask (``feeds[ATTENTION_MASK]``) has one more real column, its position follows the row's last one."""
    mask = extend_mask(attention_mask)
    return token_feeds(np.asarray(tokens)[:, None], mask, positions_from_mask(mask)[:, -1:], past)


def empty_past(spec: ModelSpec, batch: int, kv_dtype: Any) -> Dict[str, np.ndarray]:
    """Every past_key_values.* input at length 0 (a prefill from an empty cache): (batch, kv_heads, 0, head_dim)."""
    z = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=kv_dtype)
    return {name: z for name in past_names(spec.num_layers)}


def past_from_outputs(spec: ModelSpec, outputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The next step's past_key_values.* from this step's present.* outputs (by name, graph order)."""
    return {past: outputs[present]
            for past, present in zip(past_names(spec.num_layers), present_names(spec.num_layers))}
