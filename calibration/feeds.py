"""Token sequences -> realistic graph feeds: left-padded prefill batches, then decode steps on the real KV cache.

Where it stands: between ``calibration.data`` (sequences of ids) and ``calibration.ranges`` (statistics). Calibrating
on random tensors, or on prefill alone, misses what a deployed model sees: single-token decode steps whose attention
reads a KV cache the float model itself wrote. So each batch of sequences is run the way the runtime runs it: the
sequences are left-padded to one length, all but the last ``decode_steps`` tokens go in as one prefill, and each
remaining token goes in alone with the ``present.*`` outputs of the previous step fed back as ``past_key_values.*``.
Batches and steps therefore differ in shape; every consumer must cope with that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Sequence

import numpy as np

from runtime.positions import PositionRule
from runtime.spec import ModelSpec
from runtime.steps import empty_past, left_pad, past_from_outputs, token_feeds

RunFn = Callable[[Mapping[str, np.ndarray]], Dict[str, np.ndarray]]


@dataclass
class Step:
    """One graph call: its feeds, and which of its query positions are real tokens (padding is not calibrated)."""

    feeds: Dict[str, np.ndarray]
    real: np.ndarray  # (B, S) bool
    kind: str  # "prefill" | "decode"


def batches_by_length(seqs: Sequence[Sequence[int]], batch_size: int) -> List[List[Sequence[int]]]:
    """Sequences grouped into batches of similar length (less padding), in a deterministic order."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [[seqs[i] for i in order[k: k + batch_size]] for k in range(0, len(order), batch_size)]


def decode_step_count(batch: Sequence[Sequence[int]], decode_steps: int) -> int:
    """Decode steps a batch gets: ``decode_steps``, fewer when its shortest row could not keep one prefill token."""
    return max(0, min(decode_steps, min(len(s) for s in batch) - 1))


def count_steps(sequences: Sequence[Sequence[int]], batch_size: int, decode_steps: int) -> int:
    """Graph calls ``calibration_steps`` makes for these sequences."""
    return sum(1 + decode_step_count(b, decode_steps) for b in batches_by_length(sequences, batch_size))


def run_batch(
    spec: ModelSpec, batch: Sequence[Sequence[int]], run: RunFn, decode_steps: int, kv_dtype=np.float32
) -> Iterator[tuple]:
    """Run one batch through ``run`` (a float model): a prefill, then up to ``decode_steps`` single-token steps fed
    the cache it returned. Yields (Step, outputs) for each call."""
    ids, mask, _ = left_pad(batch, spec.pad_token_id)  # (B, T)
    rows = PositionRule.from_spec(spec).rows(batch)
    positions = rows.prompt(ids.shape[1])  # (B, T) or ChatGLM-6B's (B, 2, T)
    t = ids.shape[1]
    # ChatGLM-6B's context is bidirectional: it all goes in the prefill, only later columns become decode steps
    split = max(t - decode_step_count(batch, decode_steps), rows.context_end(t))
    feeds = token_feeds(ids[:, :split], mask[:, :split], positions[..., :split],
                        empty_past(spec, len(batch), kv_dtype))
    outputs = run(feeds)
    yield Step(feeds, mask[:, :split] > 0, "prefill"), outputs
    for col in range(split, t):  # every row is real from here on (rows are right-aligned)
        feeds = token_feeds(ids[:, col: col + 1], mask[:, : col + 1], positions[..., col: col + 1],
                            past_from_outputs(spec, outputs))
        outputs = run(feeds)
        yield Step(feeds, mask[:, col: col + 1] > 0, "decode"), outputs


def calibration_steps(
    spec: ModelSpec,
    sequences: Sequence[Sequence[int]],
    run: RunFn,
    batch_size: int = 4,
    decode_steps: int = 8,
    kv_dtype=np.float32,
) -> Iterator[tuple]:
    """(Step, outputs) for every call over all ``sequences``: batches of ``batch_size``, each a prefill and
    ``decode_steps`` cached decode steps."""
    for batch in batches_by_length(sequences, batch_size):
        yield from run_batch(spec, batch, run, decode_steps, kv_dtype)
