"""The scheduler without HTTP: joined rows compute what solo runs compute (logits within the tolerance table, through
prefill and several cached decode steps), seeded sampling does not depend on batch-mates, prefix reuse gives the
same greedy output, and the prefix cache keeps its byte bound."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from runtime.api import GlmModel
from runtime.chat import chat_stop_ids
from runtime.generate import prefill
from runtime.sampling import GenerationConfig
from runtime.serve.kv_rows import join_row, keep_rows
from runtime.serve.prefix_cache import PrefixCache, common_prefix
from runtime.serve.scheduler import Scheduler, ServeRequest
from runtime.tolerances import allowed_diff

STEPS = 4


@pytest.fixture(scope="module")
def model(tiny_models):
    with GlmModel.load(tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm")),
                       threads=1, graph="portable") as m:  # the scheduler joins Concat caches
        yield m


def _solo(model, ids, tokens):
    """Logits [STEPS + 1, vocab] of ids then the forced tokens, run alone."""
    be = model.backend
    n = len(ids)
    logits, cache = prefill(be, np.array([ids]), np.ones((1, n), np.int64), np.arange(n)[None], None)
    out = [logits[0]]
    for k, t in enumerate(tokens):
        logits, cache = be.forward(np.array([[t]]), np.ones((1, n + k + 1), np.int64), np.array([[n + k]]), cache)
        out.append(logits[0])
    return np.stack(out)


def test_joined_rows_equal_solo_runs(model):
    """Rows join at different steps with different lengths (the batch is padded on the left, then the row), one
    leaves; every row's logits match its solo run within batch_vs_solo."""
    be = model.backend
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 600, size=n).tolist() for n in (5, 11, 3)]
    forced = [rng.integers(10, 600, size=STEPS + 2).tolist() for _ in prompts]
    want = [_solo(model, p, f) for p, f in zip(prompts, forced)]
    got = [[] for _ in prompts]
    cache = mask = None
    rows, step = [], {}  # rows: prompt index per batch row; step: decode steps done per prompt
    pos = {}

    def admit(i):
        nonlocal cache, mask
        n = len(prompts[i])
        logits, c = prefill(be, np.array([prompts[i]]), np.ones((1, n), np.int64), np.arange(n)[None], None)
        got[i].append(logits[0])
        cache, mask = join_row(be, cache, mask, c, np.ones((1, n), np.int64))
        rows.append(i)
        step[i], pos[i] = 0, n

    def decode():
        nonlocal cache, mask
        tokens = np.array([[forced[i][step[i]]] for i in rows])
        positions = np.array([[pos[i]] for i in rows])
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        logits, cache = be.forward(tokens, mask, positions, cache)
        for j, i in enumerate(rows):
            got[i].append(logits[j])
            step[i] += 1
            pos[i] += 1

    admit(0)
    decode()
    admit(1)  # longer than the batch's past: the batch is padded
    decode()
    admit(2)  # shorter: the row is padded
    decode()
    cache, mask = keep_rows(be, cache, mask, [1, 2])  # row 0 leaves; its padding columns go
    rows.remove(0)
    while any(step[i] < STEPS for i in rows):
        decode()
    for i in range(3):
        g = np.stack(got[i])
        w = want[i][: len(g)]
        assert len(g) >= 2
        diff = float(np.abs(g - w).max())
        assert diff <= allowed_diff("batch_vs_solo", "fp32", float(np.abs(w).max())), (i, diff)


def _run(scheduler, ids, config, extra_eos=()):
    done, events = threading.Event(), []

    def sink(e):
        events.append(e)
        if e.finish_reason:
            done.set()
    req = ServeRequest(list(ids), config, sink, extra_eos=extra_eos)
    scheduler.submit(req)
    return req, done, events


def test_seeded_request_ignores_its_batch_mates(model):
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, seed=123,
                           eos_token_ids=())
    prompt = model.chat_ids([{"role": "user", "content": "green tea"}])
    sched = Scheduler(model, max_batch=8).start()
    try:
        req, done, _ = _run(sched, prompt, cfg)
        assert done.wait(30)
        alone = list(req.seq.generated_ids)
        others = [_run(sched, model.chat_ids([{"role": "user", "content": "cup " * k}]),
                       GenerationConfig(max_new_tokens=20, do_sample=True, seed=k, eos_token_ids=()))
                  for k in range(1, 5)]
        req2, done2, _ = _run(sched, prompt, cfg)
        assert done2.wait(30) and all(d.wait(30) for _, d, _ in others)
        assert req2.seq.generated_ids == alone
    finally:
        sched.stop()


def test_prefix_reuse_gives_the_same_greedy_chat(model):
    """Five turns of a chat, each resending the history: identical replies with and without the prefix cache, and
    from turn 2 on most of the prompt comes from the cache."""
    def chat(prefix_bytes):
        sched = Scheduler(model, max_batch=4, prefix_cache_bytes=prefix_bytes).start()
        history, replies, reused = [{"role": "system", "content": "Be brief."}], [], []
        try:
            for turn in range(5):
                history.append({"role": "user", "content": f"question {turn} about green tea"})
                req, done, events = _run(sched, model.chat_ids(history), GenerationConfig(max_new_tokens=16),
                                         chat_stop_ids(model.tokenizer, model.spec))
                assert done.wait(30)
                text = "".join(e.text for e in events)
                replies.append((req.seq.generated_ids, text))
                reused.append(req.reused_prefix)
                history.append({"role": "assistant", "content": text})
        finally:
            sched.stop()
        return replies, reused

    with_cache, reused = chat(64 * 2**20)
    without, none = chat(0)
    assert with_cache == without
    assert none == [0] * 5
    assert reused[0] == 0 and all(r > 10 for r in reused[1:])


def test_prefix_cache_lookup_and_byte_bound():
    def arrays(n):  # 2 tensors of [1, 1, n, 2] float32: 16 bytes per position
        return [np.arange(n * 2, dtype=np.float32).reshape(1, 1, n, 2) for _ in range(2)]

    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0
    pc = PrefixCache(max_bytes=16 * 20)
    pc.store([1, 2, 3, 4, 5, 6], arrays(6))
    hit = pc.lookup([1, 2, 3, 4, 9])
    assert hit.length == 4 and hit.arrays[0].shape == (1, 1, 4, 2)
    assert pc.lookup([1, 2, 3, 4, 5, 6]).length == 5  # one id is always left to prefill
    assert pc.lookup([7, 8, 9]) is None
    pc.store([1, 2, 3, 4, 5, 6, 7, 8], arrays(8))  # extends the first entry: it replaces it
    assert len(pc) == 1 and pc.bytes == 16 * 8
    pc.store([20, 21, 22, 23, 24, 25, 26, 27, 28, 29], arrays(10))
    assert pc.bytes == 16 * 18
    pc.store([30, 31, 32, 33, 34], arrays(5))  # over the bound: the least recently used entry goes
    assert pc.bytes <= pc.max_bytes and pc.lookup([1, 2, 3, 4, 5]) is None
    assert pc.lookup([30, 31, 32, 33, 34, 35]).length == 5
    pc.store(list(range(100, 130)), arrays(30))  # bigger than the whole bound: not kept
    assert pc.lookup(list(range(100, 130))) is None
    assert PrefixCache(0).lookup([1, 2, 3]) is None


def test_scheduler_refuses_the_fused_graph(tiny_models):
    """The fused graph's shared buffer cannot take joined rows: Scheduler says to load the portable graph, and the
    fused backend refuses kv_rows' cache_from_numpy (so no other caller joins rows into it either)."""
    from runtime.errors import BackendError

    bundle = tiny_models.bundle("serve", tiny_models.checkpoint("serve", "chatglm3", "thudm"))
    with GlmModel.load(bundle, threads=1) as fused:
        assert fused.backend.graph_flavour == "fused"  # auto picks it for an fp32 bundle on cpu
        with pytest.raises(BackendError, match="graph='portable'"):
            Scheduler(fused)
        with pytest.raises(BackendError, match="graph='portable'"):
            fused.backend.cache_from_numpy(fused.backend.cache_to_numpy(fused.backend.empty_cache(1, 4)), 0)


class _CancelledOnSecondLook(ServeRequest):
    """A client that goes away exactly while the scheduler scans the batch: once armed, the first reading of
    ``cancelled`` says False and every later one True (the event loop's thread cancelling mid-scan)."""

    armed = False
    looks = 0

    @property
    def cancelled(self) -> bool:
        if not self.armed:
            return False
        self.looks += 1
        return self.looks > 1


def test_a_cancel_during_the_drop_scan_still_ends_the_request(model):
    """Row 0 was cancelled before the scan; row 1 is cancelled during it. Row 1 is either kept (and dropped at the
    next step) or dropped with its cancelled event and count: never removed silently, which leaves its client
    waiting for ever and the count short."""
    sched = Scheduler(model, max_batch=2)  # not started: the test drives its steps
    cfg = GenerationConfig(max_new_tokens=50, eos_token_ids=())
    first, second = [], []
    gone = ServeRequest(model.encode("green tea"), cfg, first.append)
    late = _CancelledOnSecondLook(model.encode("cup of tea"), cfg, second.append)
    sched._admit(gone)
    sched._admit(late)
    assert len(sched._rows) == 2
    gone.cancel()
    late.armed = True
    sched._drop_cancelled()
    assert first[-1].finish_reason == "cancelled"
    if sched._rows:  # kept for the next step
        assert [r.req for r in sched._rows] == [late] and second[-1].finish_reason is None
        sched._drop_cancelled()
    assert sched._rows == [] and second[-1].finish_reason == "cancelled"
    assert sched.metrics.finish_reasons["cancelled"] == 2
