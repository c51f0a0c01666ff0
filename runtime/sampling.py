"""Choosing the next token: logits processors, samplers and the generation settings, in plain numpy.

Where it stands: ``runtime.generate`` runs the model and hands each step's last-position logits ``[batch, vocab]``
here; :func:`next_tokens` turns them into one token id per row. Every function is pure except for the explicit
``np.random.Generator`` that sampling draws from, so a seed reproduces a run exactly.

The processing order is the one transformers uses: repetition penalty, then temperature, top-k, top-p.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from runtime.errors import SamplingConfigError

NEG_INF = -np.inf


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop. Invalid values raise :class:`SamplingConfigError` naming the field."""

    max_new_tokens: int = 128
    do_sample: bool = False  # False: greedy (argmax); the sampling fields below are then ignored
    temperature: float = 1.0  # > 0; logits are divided by it
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # in (0, 1]: keep the smallest most-likely set whose probability mass is >= top_p
    repetition_penalty: float = 1.0  # > 0; 1 disables (applies in greedy mode too, as in transformers)
    seed: Optional[int] = None  # seeds the np.random.Generator used for sampling; None: fresh entropy
    stop: Tuple[str, ...] = ()  # stop when the decoded text contains one of these; the text ends before it
    eos_token_ids: Optional[Tuple[int, ...]] = None  # None: the model's; () never stops on a token
    max_length: Optional[int] = None  # cap on prompt + generated tokens, at most the model's context

    def __post_init__(self) -> None:
        # Normalise list arguments into tuples so the frozen config stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.eos_token_ids, (list, tuple)):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        elif isinstance(self.eos_token_ids, (int, np.integer)) and not isinstance(self.eos_token_ids, bool):
            object.__setattr__(self, "eos_token_ids", (int(self.eos_token_ids),))
        self.validate()

    def validate(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise SamplingConfigError(f"do_sample must be true or false, got {self.do_sample!r}")
        _check_float("temperature", self.temperature, "must be > 0 (use greedy decoding instead of 0)",
                     lambda v: v > 0)
        _check_int("top_k", self.top_k, minimum=0)
        _check_float("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _check_float("repetition_penalty", self.repetition_penalty, "must be > 0 (1 disables it)",
                     lambda v: v > 0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.eos_token_ids is not None:
            if not isinstance(self.eos_token_ids, tuple):
                raise SamplingConfigError(f"eos_token_ids must be a list of token ids, got {self.eos_token_ids!r}")
            for i in self.eos_token_ids:
                _check_int("eos_token_ids", i, minimum=0)
        if self.max_length is not None:
            _check_int("max_length", self.max_length, minimum=2)

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    def make_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SamplingConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SamplingConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value, rule: str, ok) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or not ok(float(value)):
        raise SamplingConfigError(f"{name} {rule}, got {value}")


# ---------------------------------------------------------------------------------------------------------------
# Logits processors. Each takes logits [..., vocab] (float) and returns a new array of the same shape; removed
# tokens get -inf. None of them modify their input.


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return logits
    return logits / np.asarray(temperature, dtype=logits.dtype)


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits per row (and any tied with the k-th, as transformers does); k=0 keeps all."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = np.partition(logits, vocab - k, axis=-1)[..., vocab - k : vocab - k + 1]  # [..., 1]
    return np.where(logits < kth, NEG_INF, logits)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: per row keep the smallest most-likely set whose probability mass is >= p (at least one).

    A token is kept when the mass of the tokens strictly more likely than it (in a stable descending order) is
    still below p.
    """
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")  # descending; ties keep vocabulary order
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = softmax(sorted_logits)
    mass_before = np.cumsum(probs, axis=-1) - probs  # exclusive cumulative mass
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False  # the most likely token always stays
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, NEG_INF, logits)


def apply_repetition_penalty(logits: np.ndarray, seen_ids: Sequence, penalty: float) -> np.ndarray:
    """CTRL's penalty: for every token already seen, logit / penalty if positive, logit * penalty otherwise.

    ``logits`` is [vocab] with ``seen_ids`` an iterable of ids (list, set, array), or [batch, vocab] with one per
    row. Each seen token is penalised once however often it occurred.
    """
    if penalty == 1.0:
        return logits
    out = np.array(logits, copy=True)
    rows = [out] if out.ndim == 1 else list(out)
    per_row = [seen_ids] if out.ndim == 1 else list(seen_ids)
    if len(per_row) != len(rows):
        raise ValueError(f"repetition penalty: {len(per_row)} id lists for {len(rows)} rows")
    for row, ids in zip(rows, per_row):
        ids = np.unique(np.fromiter(ids, dtype=np.int64))
        if ids.size == 0:
            continue
        vals = row[ids]
        row[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def process_logits(logits: np.ndarray, config: GenerationConfig, seen_ids: Optional[Sequence] = None) -> np.ndarray:
    """All processors in transformers' order. In greedy mode only the repetition penalty applies."""
    out = logits.astype(np.float32, copy=False)
    if config.repetition_penalty != 1.0 and seen_ids is not None:
        out = apply_repetition_penalty(out, seen_ids, config.repetition_penalty)
    if config.do_sample:
        out = apply_temperature(out, config.temperature)
        out = apply_top_k(out, config.top_k)
        out = apply_top_p(out, config.top_p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Choosing.


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64; -inf logits get exactly 0."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def greedy(logits: np.ndarray) -> np.ndarray:
    """argmax over the last axis (the lowest id wins a tie, like torch.argmax on CPU)."""
    return np.argmax(logits, axis=-1)


def sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(logits), by inverse CDF on one uniform per row. Never picks a -inf token."""
    probs = softmax(np.atleast_2d(logits))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    # The first index whose cdf exceeds u (= how many cdf entries are <= u): a zero-probability token has a flat
    # cdf step, so it is never the first to exceed u.
    idx = np.sum(cdf <= u[:, None], axis=-1).astype(np.int64)
    idx = np.minimum(idx, probs.shape[-1] - 1)
    return idx if np.ndim(logits) > 1 else idx[0]


def next_tokens(
    logits: np.ndarray,
    config: GenerationConfig,
    rng: Optional[np.random.Generator] = None,
    seen_ids: Optional[Sequence] = None,
) -> np.ndarray:
    """Token ids [batch] from last-position logits [batch, vocab]."""
    processed = process_logits(logits, config, seen_ids)
    if not config.do_sample:
        return greedy(processed).astype(np.int64)
    if rng is None:
        raise ValueError("sampling needs an np.random.Generator (GenerationConfig.make_rng())")
    return sample(processed, rng)
