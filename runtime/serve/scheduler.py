"""Continuous batching: one thread owns the model; requests join the running batch at step boundaries and leave it
when they finish.

Where it stands: ``runtime.serve.app`` (HTTP) and ``runtime.serve.triton.model`` (Triton's Python backend) turn
requests into prompt ids and a ``GenerationConfig`` and :meth:`Scheduler.submit` a :class:`ServeRequest`; the
scheduler thread calls the request's ``sink`` with a :class:`StreamEvent` per token, from its own thread.

One scheduler step::

    1. admit   waiting requests, up to --max-batch rows: each is prefilled alone ([1, n], after the longest cached
               prefix of its prompt when the prefix cache has one), picks its first token, and its KV joins the
               batch (``runtime.serve.kv_rows.join_row``: left-padded to the batch's past, mask 0 there)
    2. drop    rows whose client went away (``ServeRequest.cancel``)
    3. decode  one token for every row: input_ids [batch, 1], attention_mask [batch, past + 1],
               position_ids [batch, 1] = each row's real length so far (its mask's cumsum - 1, as runtime.steps)
    4. leave   finished rows (stop rules: ``runtime.generate.accept_token``, the same as ``Generation``) are cut out
               (``kv_rows.keep_rows``) and their caches offered to the prefix cache

Each request has its own ``np.random.Generator`` (seeded from its ``seed``) and its own seen-ids set, so a seeded
request draws the same numbers whatever else is in the batch. Greedy output equals the request's solo run: a row's
prefill is exactly the solo prefill, and its decode steps see the same real positions (padding is masked out).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Deque, List, NamedTuple, Optional, Set

import numpy as np

from runtime.backends.base import KVCache
from runtime.errors import BackendError, GlmExportError
from runtime.generate import SequenceState, StopTextTracker, accept_token, prefill
from runtime.sampling import GenerationConfig, next_tokens
from runtime.serve.kv_rows import join_row, keep_rows, row_arrays, supports_rows
from runtime.serve.metrics import Metrics
from runtime.serve.prefix_cache import PrefixCache
from runtime.spec import POSITIONS_SEQUENTIAL

log = logging.getLogger("glm_export")

FINISH_CANCELLED = "cancelled"  # the client went away; its row was freed
FINISH_ERROR = "error"


class QueueFullError(GlmExportError):
    """More requests are waiting than --max-queue allows; the client should retry later."""


class ShuttingDownError(GlmExportError):
    """The scheduler is stopping and takes no new requests."""


class StreamEvent(NamedTuple):
    token_id: Optional[int]  # None on a cancelled/error event
    text: str  # the text this token releases
    finish_reason: Optional[str]  # runtime.generate's reasons, or "cancelled" / "error"
    error: Optional[str] = None


@dataclass
class ServeRequest:
    prompt_ids: List[int]
    config: GenerationConfig
    sink: Callable[[StreamEvent], None]  # called from the scheduler thread
    extra_eos: Collection[int] = ()
    request_id: str = ""
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    reused_prefix: int = 0  # prompt ids whose KV came from the prefix cache
    seq: Optional[SequenceState] = None  # set when admitted; its generated_ids and finish_reason at the end
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Free the request's row at the next step boundary (any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Row:
    """An admitted request: its stop state, sampling state, and the token chosen but not yet fed."""

    def __init__(self, req: ServeRequest, eos: Set[int], context_length: int, tracker: Optional[StopTextTracker]):
        cfg = req.config
        self.req = req
        self.seq = SequenceState(prompt_ids=list(req.prompt_ids))
        req.seq = self.seq
        self.eos = eos
        self.context_length = min(context_length, cfg.max_length) if cfg.max_length else context_length
        self.tracker = tracker
        self.rng = cfg.make_rng() if cfg.do_sample else None
        self.seen = set(req.prompt_ids) if cfg.repetition_penalty != 1.0 else None
        self.next_token = -1
        self.next_pos = len(req.prompt_ids)  # position of next_token: the row's real length so far

    def choose(self, logits: np.ndarray) -> int:
        """logits [1, vocab] -> this row's next token, from its own generator."""
        seen = [self.seen] if self.seen is not None else None
        return int(next_tokens(logits, self.req.config, self.rng, seen)[0])

    def accept(self, token: int) -> bool:
        """Record the token, send its event; True when it finished the request."""
        piece, reason = accept_token(self.seq, self.tracker, token, self.eos, self.req.config.max_new_tokens,
                                     self.context_length)
        if self.seen is not None:
            self.seen.add(token)
        self.next_token = token
        if self.req.first_token_at is None:
            self.req.first_token_at = time.perf_counter()
        self.req.sink(StreamEvent(token, piece, reason))
        return reason is not None


class Scheduler:
    """Continuous batching over one model (a ``runtime.api.GlmModel`` whose backend can join rows)."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefix_cache_bytes: int = 0,
                 metrics: Optional[Metrics] = None, idle_wait_s: float = 0.5):
        if getattr(model.backend, "graph_flavour", None) == "fused":
            # the scheduler joins rows of different lengths into a Concat-KV batch (kv_rows.py); the fused graph's
            # shared buffer holds every row at the same columns, so serving runs the portable graph
            raise BackendError("the serve scheduler joins rows into a Concat KV cache: load the bundle with "
                               "graph='portable' (the fused graph's shared buffer cannot take joining rows)")
        if not supports_rows(model.backend):
            raise BackendError(f"the {model.backend_name} backend cannot join rows into a running batch; "
                               "serve with the onnxruntime backend")
        if model.spec.position_kind != POSITIONS_SEQUENTIAL:
            # the scheduler builds [batch, seq] positions for joined rows; ChatGLM-6B's 2D positions and prefix-LM
            # mask are not wired into it yet
            raise BackendError(f"serve: {model.spec.generation} bundles ({model.spec.position_kind} positions) are "
                               "not served yet; use 'glm-export run' or 'glm-export chat'")
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.backend = model.backend
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.metrics = metrics if metrics is not None else Metrics()
        self.idle_wait_s = idle_wait_s
        self._model_eos = frozenset(int(t) for t in model.spec.eos_token_ids)
        self._waiting: Deque[ServeRequest] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._rows: List[_Row] = []
        self._cache: Optional[KVCache] = None
        self._mask: Optional[np.ndarray] = None  # [batch, past]
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------------------ any thread

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="glm-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, cancel the waiting ones, finish the step under way and end the thread."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for req in waiting:
            req.sink(StreamEvent(None, "", FINISH_ERROR, "the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: ServeRequest) -> None:
        """Queue a request; QueueFullError when --max-queue requests are already waiting."""
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            free_rows = self.max_batch - len(self._rows)  # the next step admits that many at once
            if len(self._waiting) >= self.max_queue + max(free_rows, 0):
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(req)
            self.metrics.queue_depth = len(self._waiting)
            self._cond.notify_all()

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait(self.idle_wait_s)
                if self._stopping:
                    break
                room = self.max_batch - len(self._rows)
                admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self.metrics.queue_depth = len(self._waiting)
            for req in admitted:
                try:
                    self._admit(req)
                except Exception as e:  # this request fails; the batch it did not join goes on
                    log.exception("admitting a request failed")
                    req.sink(StreamEvent(None, "", FINISH_ERROR, f"{type(e).__name__}: {e}"))
                    self.metrics.finished(FINISH_ERROR)
            try:
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as e:  # a backend failure: fail the requests in flight, keep serving the next ones
                log.exception("scheduler step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
            self.metrics.active_rows = len(self._rows)
        self._fail_all("the server is shutting down")
        self.metrics.active_rows = 0

    def _new_row(self, req: ServeRequest) -> _Row:
        cfg = req.config
        eos = set(cfg.eos_token_ids if cfg.eos_token_ids is not None else self._model_eos)
        eos |= {int(t) for t in req.extra_eos}
        tracker = None
        tok = self.model.tokenizer
        if tok is not None:
            from runtime.tokenizer import StreamDecoder

            tracker = StopTextTracker(StreamDecoder(tok), cfg.stop)
        return _Row(req, eos, self.model.context_length, tracker)

    def _admit(self, req: ServeRequest) -> None:
        """Prefill the request alone (after a reused prefix), pick its first token, join the batch."""
        if req.cancelled:
            req.sink(StreamEvent(None, "", FINISH_CANCELLED))
            self.metrics.finished(FINISH_CANCELLED)
            return
        row = self._new_row(req)
        ids = row.seq.prompt_ids
        n = len(ids)
        cache, start = None, 0
        hit = self.prefix_cache.lookup(ids)
        if hit is not None:
            cache, start = self.backend.cache_from_numpy(hit.arrays, hit.length), hit.length
            req.reused_prefix = hit.length
        input_ids = np.asarray([ids[start:]], dtype=np.int64)  # [1, n - start]
        mask = np.ones((1, n), dtype=np.int64)  # [1, n]: the reused prefix and the new ids
        positions = np.arange(start, n, dtype=np.int64)[None, :]  # [1, n - start]
        logits, cache = prefill(self.backend, input_ids, mask, positions, self.model.prefill_chunk, cache=cache)
        self.metrics.prompt_tokens(n, n - start)
        finished = row.accept(row.choose(logits))
        self.metrics.first_token(req.first_token_at - req.submitted)
        self.metrics.tokens(1)
        if finished:
            self._store(row, [a for a in self.backend.cache_to_numpy(cache)])
            self.metrics.finished(row.seq.finish_reason)
            return
        self._cache, self._mask = join_row(self.backend, self._cache, self._mask, cache, mask)
        self._rows.append(row)

    def _drop_cancelled(self) -> None:
        # one reading of the flags: a client may cancel (on the event loop's thread) while this runs, and a row read
        # twice could leave the batch without its cancelled event or count; it is dropped at the next step instead
        gone = {j for j, r in enumerate(self._rows) if r.req.cancelled}
        if not gone:
            return
        for j in sorted(gone):
            self._rows[j].req.sink(StreamEvent(None, "", FINISH_CANCELLED))
            self.metrics.finished(FINISH_CANCELLED)
        self._keep([j for j in range(len(self._rows)) if j not in gone])

    def _step(self) -> None:
        """One token for every row of the batch."""
        rows = self._rows
        tokens = np.asarray([[r.next_token] for r in rows], dtype=np.int64)  # [batch, 1]
        positions = np.asarray([[r.next_pos] for r in rows], dtype=np.int64)  # [batch, 1]
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), np.int64)], axis=1)  # [batch, past + 1]
        logits, self._cache = self.backend.forward(tokens, mask, positions, self._cache)  # [batch, vocab]
        self._mask = mask
        done = []
        for j, row in enumerate(rows):
            row.next_pos += 1
            if row.accept(row.choose(logits[j:j + 1])):
                done.append(j)
        self.metrics.tokens(len(rows))
        self.metrics.batch_step(len(rows))
        if done:
            for j in done:
                self._store(rows[j], row_arrays(self.backend, self._cache, self._mask, j))
                self.metrics.finished(rows[j].seq.finish_reason)
            self._keep([j for j in range(len(rows)) if j not in set(done)])

    def _keep(self, keep: List[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        self._cache, self._mask = keep_rows(self.backend, self._cache, self._mask, keep)
        self._rows = [self._rows[j] for j in keep]

    def _store(self, row: _Row, arrays: List[np.ndarray]) -> None:
        """Offer a finished row's cache (prompt + generated ids but the last, never fed) to the prefix cache."""
        if self.prefix_cache.enabled:
            fed = row.seq.prompt_ids + row.seq.generated_ids[:-1]
            self.prefix_cache.store(fed, [np.ascontiguousarray(a) for a in arrays])
            self.metrics.prefix_cache_bytes = self.prefix_cache.bytes

    def _fail_all(self, message: str) -> None:
        rows, self._rows, self._cache, self._mask = self._rows, [], None, None
        with self._cond:
            waiting = list(self._waiting) if self._stopping else []
            if self._stopping:
                self._waiting.clear()
        for r in rows:
            r.req.sink(StreamEvent(None, "", FINISH_ERROR, message))
            self.metrics.finished(FINISH_ERROR)
        for req in waiting:
            req.sink(StreamEvent(None, "", FINISH_ERROR, message))
