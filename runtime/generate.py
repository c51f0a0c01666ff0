"""The decode loop: prefill, decode steps, stop rules; iterating a ``Generation`` yields tokens as they are chosen.

Where it stands: ``runtime.api`` turns prompts into ids and hands them here with a backend
(``runtime.backends``) and a ``GenerationConfig`` (``runtime.sampling``). Detokenising is outside the loop except
for stop strings, which are checked on decoded text through an optional per-sequence decoder.

Several prompts run as one batch, left-padded::

    input_ids       [batch, n_max]       pads first, then the prompt
    attention_mask  [batch, n_max + t]   0 on pads, 1 on every real token (grows by one column per step)
    position_ids    [batch, seq]         cumsum(mask) - 1, clipped at 0: each row counts from its first real token

(``runtime.steps.left_pad`` builds them.)

Each sequence stops on its own, with a finish reason:

    "eos"      it produced one of the end-of-sequence ids (kept as its last generated id)
    "stop"     its decoded text contains a stop string (the text ends before it)
    "length"   it produced max_new_tokens
    "context"  prompt + generated reached the context length (the model's, or the user's smaller max_length)

When a sequence finishes, its row leaves the running batch (``DecoderBackend.select_rows``, one copy of the cache),
so the others stop paying for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from runtime.backends.base import DecoderBackend, KVCache
from runtime.errors import GenerationError
from runtime.positions import PositionRule, chunk_bounds
from runtime.sampling import GenerationConfig, next_tokens
from runtime.steps import left_pad

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CONTEXT = "context"
FINISH_REASONS = (FINISH_EOS, FINISH_STOP, FINISH_LENGTH, FINISH_CONTEXT)

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill forward; bounds the [batch, chunk, vocab] logits buffer


class TextDecoder:
    """What the loop needs from a streaming detokeniser (``runtime.tokenizer.StreamDecoder`` fits)."""

    def push(self, token_id: int) -> str:  # pragma: no cover - protocol
        raise NotImplementedError

    def flush(self) -> str:  # pragma: no cover - protocol
        raise NotImplementedError


class TokenEvent(NamedTuple):
    """One chosen token of one sequence."""

    index: int  # which prompt of the batch
    token_id: int
    text: str  # text this token releases ("" without a decoder; may be "" while bytes or a stop prefix wait)
    finish_reason: Optional[str]  # set on the sequence's last token


@dataclass
class SequenceState:
    prompt_ids: List[int]
    generated_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text: Optional[str] = None  # decoded generated text (ending before a stop string); None without a decoder


class StopTextTracker:
    """Decoded text of one sequence: finds stop strings and holds back text that may be the start of one.

    Released text never contains any part of a stop string: a tail of the text that is a proper prefix of some stop
    string is kept back until the next token decides it.
    """

    def __init__(self, decoder: TextDecoder, stops: Sequence[str] = ()):
        self.decoder = decoder
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.released = 0
        self.stop_at: Optional[int] = None

    def push(self, token_id: int) -> str:
        return self._add(self.decoder.push(int(token_id)), final=False)

    def finish(self) -> str:
        """Flush the decoder and release everything that is left (up to a stop string, if one was found)."""
        if self.stop_at is not None:
            return ""
        return self._add(self.decoder.flush(), final=True)

    @property
    def final_text(self) -> str:
        return self.text if self.stop_at is None else self.text[: self.stop_at]

    def _add(self, new: str, final: bool) -> str:
        search_from = max(0, len(self.text) - self._longest + 1)
        self.text += new
        end = len(self.text)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            self.stop_at = end = min(hits)
        elif not final:
            end -= self._held_back()
        piece = self.text[self.released : end]
        self.released = max(self.released, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


# ------------------------------------------------------------------------------------------------ model steps


def prefill(
    backend: DecoderBackend,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    position_ids: np.ndarray,
    chunk_size: Optional[int] = DEFAULT_PREFILL_CHUNK,
    first_chunk_end: int = 0,
    cache: Optional[KVCache] = None,
    capacity: Optional[int] = None,
) -> Tuple[np.ndarray, KVCache]:
    """Run the (left-padded) prompts [batch, n] through the model, ``chunk_size`` columns per forward (None or 0: all
    at once), the first forward reaching at least column ``first_chunk_end`` (ChatGLM-6B's bidirectional context,
    ``BatchPositions.context_end``), from an empty cache or after ``cache`` (a reused prefix: ``attention_mask``
    [batch, cache.length + n] then covers it too). position_ids: [batch, n] or [batch, 2, n]. ``capacity``:
    positions the whole generation needs (a shared-buffer cache is allocated once at that length).
    Returns the last position's logits [batch, vocab] and the cache."""
    batch, n = input_ids.shape
    cache = backend.empty_cache(batch, capacity) if cache is None else cache
    past = cache.length
    logits = None
    for start, end in chunk_bounds(n, chunk_size, first_chunk_end):
        logits, cache = backend.forward(
            input_ids[:, start:end], attention_mask[:, : past + end], position_ids[..., start:end], cache
        )
    return logits, cache


def decode_step(
    backend: DecoderBackend, tokens: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray, cache: KVCache
) -> Tuple[np.ndarray, KVCache]:
    """Feed one token per row: tokens [batch], positions [batch] (2D: [batch, 2]); attention_mask
    [batch, cache.length + 1]."""
    return backend.forward(tokens[:, None], attention_mask, positions[..., None], cache)


# ------------------------------------------------------------------------------------------------ the loop


def _check_config(config: GenerationConfig) -> None:
    """GenerationError for a config that is not a GenerationConfig or holds invalid values."""
    if not isinstance(config, GenerationConfig):
        raise GenerationError(f"config must be a GenerationConfig, got {type(config).__name__}")
    config.validate()


def _check_decoding(config: GenerationConfig, decoder_factory: Optional[Callable[[], TextDecoder]],
                    prefill_chunk: Optional[int]) -> None:
    """GenerationError for stop strings without a decoder or a negative prefill chunk."""
    if config.stop and decoder_factory is None:
        raise GenerationError("stop strings need a tokenizer to decode the text; this bundle has none")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or int(prefill_chunk) < 0):
        raise GenerationError(f"prefill_chunk must be >= 0, got {prefill_chunk}")


def checked_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context_length: int) -> List[List[int]]:
    """The prompts as lists of ints, each non-empty, inside the vocabulary and leaving room for one new token in
    ``context_length``; GenerationError naming the prompt otherwise."""
    if not prompts:
        raise GenerationError("no prompts given")
    checked = []
    for i, p in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "prompt"
        try:
            ids = [int(t) for t in p]
        except (TypeError, ValueError):
            raise GenerationError(f"{where} must be a list of token ids") from None
        if not ids:
            raise GenerationError(f"{where} is empty: give at least one token")
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise GenerationError(f"{where} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if len(ids) >= context_length:
            raise GenerationError(
                f"{where} is {len(ids)} tokens, but the context holds {context_length}: at most "
                f"{context_length - 1} prompt tokens leave room for one new token; shorten the prompt"
            )
        checked.append(ids)
    return checked


class Generation:
    """One run over a batch of prompts. Iterate it (once) for :class:`TokenEvent`s; afterwards ``sequences`` hold
    each prompt's ids, text and finish reason and ``timings`` the speed.

    Everything that can be refused is checked in the constructor, before any model work. ``eos_token_ids`` are the
    model's; ``config.eos_token_ids``, when set, replaces them; ``extra_eos_token_ids`` (the chat stop ids) end a
    sequence on top of whichever of the two applies. ``context_length`` is the model's; a smaller
    ``config.max_length`` lowers it. ``decoder_factory`` makes one streaming detokeniser per sequence (text and stop
    strings); without it the events carry no text.
    """

    def __init__(
        self,
        backend: DecoderBackend,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        context_length: int,
        vocab_size: int,
        eos_token_ids: Sequence[int] = (),
        extra_eos_token_ids: Iterable[int] = (),
        pad_token_id: int = 0,
        decoder_factory: Optional[Callable[[], TextDecoder]] = None,
        prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK,
        position_rule: Optional[PositionRule] = None,
    ):
        _check_config(config)
        if config.max_length is not None:
            context_length = min(context_length, config.max_length)
        checked = checked_prompts(prompts, vocab_size, context_length)
        _check_decoding(config, decoder_factory, prefill_chunk)
        self.position_rule = position_rule or PositionRule()
        self._positions = self.position_rule.rows(checked)  # refuses a ChatGLM-6B prompt without [gMASK] <sop>

        self.backend = backend
        self.config = config
        self.context_length = int(context_length)
        # the config's eos ids, when given, replace the model's; the extra ones always apply
        eos = config.eos_token_ids if config.eos_token_ids is not None else eos_token_ids
        self.eos_token_ids = frozenset(int(t) for t in eos) | frozenset(int(t) for t in extra_eos_token_ids)
        self.pad_token_id = int(pad_token_id) if 0 <= int(pad_token_id) < vocab_size else 0
        self.prefill_chunk = prefill_chunk
        self.sequences = [SequenceState(prompt_ids=p) for p in checked]
        self._trackers = (
            [StopTextTracker(decoder_factory(), config.stop) for _ in checked] if decoder_factory else None
        )
        self.step_ms: List[float] = []  # per decode step: forward + choosing the next tokens
        self.prefill_ms: Optional[float] = None  # prompt forwards + choosing the first tokens
        self._started = False

    @property
    def timings(self) -> Dict[str, float]:
        decode_s = sum(self.step_ms) / 1000.0
        return {
            "prefill_ms": self.prefill_ms if self.prefill_ms is not None else 0.0,
            "decode_ms": decode_s * 1000.0,
            "decode_steps": len(self.step_ms),
            "decode_tokens_per_s": (len(self.step_ms) / decode_s) if decode_s > 0 else 0.0,
        }

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:
            raise GenerationError("a Generation runs once; start a new one")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[TokenEvent]:
        cfg, seqs = self.config, self.sequences
        ids, mask, _ = left_pad([s.prompt_ids for s in seqs], self.pad_token_id)  # each [batch, n_max]
        n_max = ids.shape[1]
        rows = self._positions
        positions = rows.prompt(n_max)
        # the mask for the longest possible run, one column per step; every new column is a real token
        steps_max = min(cfg.max_new_tokens, self.context_length)
        full_mask = np.ones((len(seqs), n_max + steps_max), dtype=np.int64)  # [batch, n_max + steps_max]
        full_mask[:, :n_max] = mask
        # the rows below shrink together as sequences finish: [live_rows] each, row j is sequence live[j]
        next_pos = np.array([len(s.prompt_ids) for s in seqs], dtype=np.int64)  # position of each row's next token
        live = np.arange(len(seqs))  # which sequence each row of the running batch is
        rng = cfg.make_rng() if cfg.do_sample else None
        seen = [set(s.prompt_ids) for s in seqs] if cfg.repetition_penalty != 1.0 else None

        t0 = time.perf_counter()
        logits, cache = prefill(self.backend, ids, mask, positions, self.prefill_chunk,
                                rows.context_end(n_max), capacity=n_max + steps_max)  # [live_rows, vocab] f32
        tokens = self._choose(logits, live, rng, seen)  # [live_rows] int64: the token each row feeds next
        self.prefill_ms = (time.perf_counter() - t0) * 1000.0

        step = 0
        while True:
            done = np.zeros(live.size, dtype=bool)  # [live_rows]: row j's sequence finished on this token
            for j, r in enumerate(live.tolist()):
                event = self._accept(r, int(tokens[j]))
                if seen is not None:
                    seen[r].add(event.token_id)
                done[j] = event.finish_reason is not None
                yield event
            if done.all():
                return
            if done.any():  # drop finished rows from the batch, so the others stop paying for them
                keep = np.flatnonzero(~done)
                cache = self.backend.select_rows(cache, keep)
                live, tokens, next_pos, full_mask = live[keep], tokens[keep], next_pos[keep], full_mask[keep]
                rows = rows.select(keep)
            step += 1
            t0 = time.perf_counter()
            # the step's mask [live_rows, n_max + step] covers the cache (n_max + step - 1 columns) and this token
            logits, cache = decode_step(
                self.backend, tokens, np.ascontiguousarray(full_mask[:, : n_max + step]), rows.step(next_pos), cache
            )  # logits [live_rows, vocab]
            tokens = self._choose(logits, live, rng, seen)
            self.step_ms.append((time.perf_counter() - t0) * 1000.0)
            next_pos = next_pos + 1

    def _choose(self, logits: np.ndarray, live: np.ndarray, rng, seen) -> np.ndarray:
        """Next token for each row of the running batch (``live`` maps rows to sequences)."""
        row_seen = [seen[r] for r in live] if seen is not None else None
        return next_tokens(logits, self.config, rng, row_seen)

    def _accept(self, r: int, token: int) -> TokenEvent:
        """Append the token to sequence r and decide whether it finishes the sequence."""
        tracker = self._trackers[r] if self._trackers is not None else None
        piece, reason = accept_token(self.sequences[r], tracker, token, self.eos_token_ids,
                                     self.config.max_new_tokens, self.context_length)
        return TokenEvent(r, token, piece, reason)


def accept_token(seq: SequenceState, tracker: Optional[StopTextTracker], token: int, eos_token_ids: Collection[int],
                 max_new_tokens: int, context_length: int) -> Tuple[str, Optional[str]]:
    """Append ``token`` to ``seq`` and apply the stop rules: -> (text it releases, finish reason or None). Shared by
    :class:`Generation` and the server's scheduler (``runtime.serve.scheduler``), so both stop the same way."""
    seq.generated_ids.append(token)
    piece, reason = "", None
    if token in eos_token_ids:
        reason = FINISH_EOS  # the eos token is not decoded into the text
    elif tracker is not None:
        piece = tracker.push(token)
        if tracker.stop_at is not None:
            reason = FINISH_STOP
    if reason is None:
        if len(seq.generated_ids) >= max_new_tokens:
            reason = FINISH_LENGTH
        elif len(seq.prompt_ids) + len(seq.generated_ids) >= context_length:
            reason = FINISH_CONTEXT
    if reason is not None:
        seq.finish_reason = reason
        if tracker is not None:
            piece += tracker.finish()
            seq.text = tracker.final_text
    return piece, reason
