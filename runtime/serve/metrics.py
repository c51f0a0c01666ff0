"""Serving figures, and their Prometheus text exposition for ``GET /metrics``.

Hand-written rather than with ``prometheus_client``: eight series in the plain text format (version 0.0.4) are a
few lines, and the serve extra stays three packages. Time to first token is a summary (count, sum and the p50/p95
of the last ``WINDOW`` requests); tokens/s is measured over the last ``RATE_WINDOW_S`` seconds.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Deque, Dict, List, Tuple

import numpy as np

WINDOW = 1000  # requests kept for the TTFT quantiles
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter = Counter()  # (endpoint, status code) -> count
        self.finish_reasons: Counter = Counter()
        self.prompt_tokens_total = 0
        self.prefilled_tokens_total = 0  # prompt tokens actually run (the rest came from the prefix cache)
        self.generated_tokens_total = 0
        self.queue_depth = 0
        self.active_rows = 0
        self.prefix_cache_bytes = 0
        self.batch_steps = 0
        self.batch_rows_total = 0
        self._ttft: Deque[float] = deque(maxlen=WINDOW)
        self._ttft_sum = 0.0
        self._ttft_count = 0
        self._token_times: Deque[Tuple[float, int]] = deque()

    # ------------------------------------------------------------------------------------------------ recording

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1

    def finished(self, reason: str) -> None:
        with self._lock:
            self.finish_reasons[reason] += 1

    def prompt_tokens(self, total: int, prefilled: int) -> None:
        with self._lock:
            self.prompt_tokens_total += total
            self.prefilled_tokens_total += prefilled

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self.generated_tokens_total += n
            self._token_times.append((now, n))
            while self._token_times and self._token_times[0][0] < now - RATE_WINDOW_S:
                self._token_times.popleft()

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self._ttft.append(seconds)
            self._ttft_sum += seconds
            self._ttft_count += 1

    def batch_step(self, rows: int) -> None:
        with self._lock:
            self.batch_steps += 1
            self.batch_rows_total += rows

    # ------------------------------------------------------------------------------------------------ reading

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        with self._lock:
            recent = [(t, n) for t, n in self._token_times if t >= now - RATE_WINDOW_S]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def ttft_quantiles(self) -> Dict[str, float]:
        with self._lock:
            values = list(self._ttft)
        if not values:
            return {"0.5": 0.0, "0.95": 0.0}
        a = np.asarray(values, dtype=np.float64)
        return {"0.5": float(np.percentile(a, 50)), "0.95": float(np.percentile(a, 95))}

    def exposition(self, prefix_hits: int = 0, prefix_misses: int = 0) -> str:
        """Prometheus text format."""
        lines: List[str] = []

        def metric(name: str, kind: str, help_: str, samples: List[Tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

        with self._lock:
            reqs = sorted(self.requests.items())
            reasons = sorted(self.finish_reasons.items())
            counts = (self.prompt_tokens_total, self.prefilled_tokens_total, self.generated_tokens_total)
            ttft_sum, ttft_count = self._ttft_sum, self._ttft_count
            steps, rows_total = self.batch_steps, self.batch_rows_total
        metric("glm_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{{endpoint="{e}",code="{c}"}}', n) for (e, c), n in reqs])
        metric("glm_finished_total", "counter", "Generations by finish reason.",
               [(f'{{reason="{r}"}}', n) for r, n in reasons])
        metric("glm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", counts[0])])
        metric("glm_prefilled_tokens_total", "counter", "Prompt tokens run through the model (not reused).",
               [("", counts[1])])
        metric("glm_generated_tokens_total", "counter", "Tokens generated.", [("", counts[2])])
        metric("glm_queue_depth", "gauge", "Requests waiting to join the batch.", [("", self.queue_depth)])
        metric("glm_active_rows", "gauge", "Requests in the running batch (its batch size).",
               [("", self.active_rows)])
        metric("glm_batch_size_mean", "gauge", "Mean rows per decode step since start.",
               [("", float(rows_total) / steps if steps else 0.0)])
        metric("glm_tokens_per_second", "gauge", f"Generated tokens/s over the last {RATE_WINDOW_S:g} s.",
               [("", float(self.tokens_per_s()))])
        q = self.ttft_quantiles()
        metric("glm_time_to_first_token_seconds", "summary", "Time from submission to the first token.",
               [(f'{{quantile="{k}"}}', float(v)) for k, v in q.items()]
               + [("_sum", float(ttft_sum)), ("_count", ttft_count)])
        metric("glm_prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", [("", self.prefix_cache_bytes)])
        metric("glm_prefix_cache_lookups_total", "counter", "Prefix cache lookups by result.",
               [('{result="hit"}', prefix_hits), ('{result="miss"}', prefix_misses)])
        return "\n".join(lines) + "\n"
