"""What a precision costs: perplexity, top-1 agreement, KL divergence and logit difference against the fp32 bundle.

Where it stands: the last step of ``glm-export quantize`` (on held-out calibration text) and the whole of
``glm-export eval``. Both bundles run through the runtime's onnxruntime backend on the same token sequences, each a
teacher-forced prefill from an empty cache; every position after the prompt prefix predicts the next token.

Figures (over the scored positions of all sequences):

* ``ppl`` / ``ppl_reference``   exp(mean negative log-likelihood of the actual next token);
* ``top1_agreement``            share of positions where both bundles' most likely token is the same;
* ``mean_kl``                   mean KL(reference || model) of the next-token distributions, in nats;
* ``max_abs_logit_diff``        largest |logit - reference logit| over every position and vocabulary entry;
* ``accuracy`` / ``accuracy_reference``  share of positions whose most likely token is the actual next token.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from runtime import graph_contract as gc
from runtime.progress import NullProgress
from runtime.positions import left_pad_positions
from runtime.steps import empty_past, token_feeds

# ------------------------------------------------------------------------------------------------ the math


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64. (..., V) -> (..., V)"""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def token_nll(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per position. logp (N, V), targets (N,) -> (N,)"""
    return -logp[np.arange(len(targets)), targets]


def kl_rows(logp_ref: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """KL(ref || model) per row, in nats. (N, V), (N, V) -> (N,)"""
    return (np.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1)


@dataclass
class AccuracyReport:
    ppl: float
    ppl_reference: float
    ppl_ratio: float
    top1_agreement: float
    mean_kl: float
    max_abs_logit_diff: float
    accuracy: float
    accuracy_reference: float
    nonfinite_logits: int
    tokens: int
    sequences: int
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, float]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        return (f"ppl {self.ppl:.4f} vs {self.ppl_reference:.4f} fp32 ({100 * (self.ppl_ratio - 1):+.2f}%), "
                f"top-1 agreement {100 * self.top1_agreement:.2f}%, mean KL {self.mean_kl:.2e}, "
                f"max |logit diff| {self.max_abs_logit_diff:.3g}, next-token accuracy {100 * self.accuracy:.1f}% "
                f"(fp32 {100 * self.accuracy_reference:.1f}%), {self.tokens} tokens")


class Accumulator:
    """Sums over scored positions, fed one sequence at a time."""

    def __init__(self):
        self.nll = self.nll_ref = self.kl = 0.0
        self.agree = self.correct = self.correct_ref = self.tokens = self.sequences = self.nonfinite = 0
        self.max_diff = 0.0

    def add(self, logits: np.ndarray, logits_ref: np.ndarray, targets: np.ndarray) -> None:
        """logits, logits_ref (N, V) predicting targets (N,)."""
        self.nonfinite += int((~np.isfinite(logits)).sum())
        safe = np.nan_to_num(np.asarray(logits, np.float64), nan=0.0, posinf=1e4, neginf=-1e4)
        logp, logp_ref = log_softmax(safe), log_softmax(logits_ref)
        self.nll += float(token_nll(logp, targets).sum())
        self.nll_ref += float(token_nll(logp_ref, targets).sum())
        self.kl += float(kl_rows(logp_ref, logp).sum())
        top, top_ref = safe.argmax(-1), np.asarray(logits_ref).argmax(-1)
        self.agree += int((top == top_ref).sum())
        self.correct += int((top == targets).sum())
        self.correct_ref += int((top_ref == targets).sum())
        self.max_diff = max(self.max_diff, float(np.abs(safe - logits_ref).max()))
        self.tokens += len(targets)
        self.sequences += 1

    def report(self, seconds: float = 0.0) -> AccuracyReport:
        n = max(self.tokens, 1)
        with np.errstate(over="ignore"):  # broken (non-finite) logits give an infinite perplexity, which is right
            ppl, ppl_ref = float(np.exp(self.nll / n)), float(np.exp(self.nll_ref / n))
        return AccuracyReport(
            ppl=ppl, ppl_reference=ppl_ref, ppl_ratio=ppl / ppl_ref, top1_agreement=self.agree / n,
            mean_kl=self.kl / n, max_abs_logit_diff=self.max_diff, accuracy=self.correct / n,
            accuracy_reference=self.correct_ref / n, nonfinite_logits=self.nonfinite, tokens=self.tokens,
            sequences=self.sequences, seconds=round(seconds, 2),
        )


# ------------------------------------------------------------------------------------------------ running


def prefill_logits(backend, spec, ids: Sequence[int]) -> np.ndarray:
    """Logits (T, V) float32 of one sequence, teacher-forced from an empty cache."""
    feeds = token_feeds(*left_pad_positions(spec, [ids], spec.pad_token_id),
                        empty_past(spec, 1, backend.kv_dtype))  # (1, T)
    return np.asarray(backend.run(feeds)[gc.LOGITS][0], dtype=np.float32)


def compare(backend, reference, spec, sequences: Sequence[Sequence[int]], score_from: int = 0,
            progress=None) -> AccuracyReport:
    """Figures of ``backend`` against ``reference`` (both runtime backends) over ``sequences``; targets before index
    ``score_from`` (the prompt prefix) are not scored."""
    progress = progress or NullProgress()
    acc = Accumulator()
    start = time.perf_counter()
    first = max(score_from, 1)
    for ids in progress.iterate(sequences, total=len(sequences), desc="evaluating"):
        if len(ids) <= first:
            continue
        targets = np.asarray(ids[first:], dtype=np.int64)
        logits = prefill_logits(backend, spec, ids)[first - 1: -1]  # position t predicts token t+1
        logits_ref = prefill_logits(reference, spec, ids)[first - 1: -1]
        acc.add(logits, logits_ref, targets)
    return acc.report(time.perf_counter() - start)


def open_backend(bundle_dir: str, threads: Optional[int] = None, manifest=None, graph: str = "portable"):
    """(manifest, the runtime's onnxruntime backend) for a bundle (plain session.run: whole-sequence logits are
    needed); ``manifest`` is read from the bundle unless given. ``graph`` "fused": the bundle's fused graph, through
    the fused backend's portable-contract ``run``."""
    import os

    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.manifest import GRAPH_FUSED, read_manifest

    manifest = manifest if manifest is not None else read_manifest(bundle_dir)
    if graph == GRAPH_FUSED:
        from runtime.backends.onnxruntime_fused import FusedOnnxRuntimeBackend

        return manifest, FusedOnnxRuntimeBackend(os.path.join(bundle_dir, manifest.graph_file(GRAPH_FUSED)),
                                                 manifest.spec, kv_dtype=manifest.fused_kv_dtype, threads=threads)
    path = os.path.join(bundle_dir, manifest.model_file)
    return manifest, OnnxRuntimeBackend(path, manifest.spec, kv_dtype=manifest.kv_dtype, threads=threads,
                                        io_binding=False)


def accuracy_bounds() -> Dict[str, Dict[str, float]]:
    """precision -> {"min_top1": ..., "max_ppl_ratio": ...}, from the one tolerance table."""
    from runtime.tolerances import ACCURACY_BOUNDS

    return ACCURACY_BOUNDS


def check_bounds(precision: str, report: AccuracyReport, bounds: Optional[Dict] = None) -> List[str]:
    """Which of ``precision``'s bounds the report breaks (empty when within bounds)."""
    b = (bounds or accuracy_bounds()).get(precision, {})
    broken = []
    if report.nonfinite_logits:
        broken.append(f"{report.nonfinite_logits} non-finite logits")
    if "min_top1" in b and report.top1_agreement < b["min_top1"]:
        broken.append(f"top-1 agreement {report.top1_agreement:.4f} < {b['min_top1']}")
    if "max_ppl_ratio" in b and report.ppl_ratio > b["max_ppl_ratio"]:
        broken.append(f"perplexity ratio {report.ppl_ratio:.4f} > {b['max_ppl_ratio']}")
    return broken
