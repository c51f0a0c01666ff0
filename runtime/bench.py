"""The bench routine behind ``glm-export bench``: prefill latency, decode speed and per-token latency of a loaded
model on random prompts, and the process's peak memory.

Where it stands: ``exporter.cli.run.bench`` loads a ``runtime.api.GlmModel`` and prints what :func:`bench_model`
returns; scripts under ``bench/`` call the CLI. Speeds are for comparing runs on one machine (ratios), never for
asserting in tests.
"""
from __future__ import annotations

import statistics
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from runtime.errors import GenerationError
from runtime.positions import PositionRule
from runtime.sampling import GenerationConfig


def _percentile(values: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def peak_rss_mib() -> Optional[float]:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def bench_model(model, prompt_len: int, batch: int, new_tokens: int, runs: int, warmup: int,
                seed: int = 0) -> Dict[str, Any]:
    """Prefill latency, decode speed and per-token latency for random prompts; exactly ``new_tokens`` each."""
    spec = model.spec
    if prompt_len + new_tokens > model.context_length:
        raise GenerationError(
            f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the context of "
            f"{model.context_length} tokens"
        )
    rng = np.random.default_rng(seed)
    forbidden = set(spec.eos_token_ids) | set(spec.special_tokens.values())
    pool = np.array([i for i in range(spec.vocab_size) if i not in forbidden], dtype=np.int64)
    suffix = PositionRule.from_spec(spec).prompt_suffix()  # ChatGLM-6B prompts end with [gMASK] <sop>
    if prompt_len <= len(suffix):
        raise GenerationError(f"--prompt-len {prompt_len}: a {spec.generation} prompt needs more than "
                              f"{len(suffix)} tokens")
    prompts = [rng.choice(pool, size=prompt_len - len(suffix)).tolist() + suffix for _ in range(batch)]
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())  # greedy, never stops early
    prefill, speed, steps = [], [], []
    for i in range(warmup + runs):
        gen = model.start(prompts, config)
        for _ in gen:
            pass
        if i >= warmup:
            t = gen.timings
            prefill.append(t["prefill_ms"])
            speed.append(t["decode_tokens_per_s"])
            steps.extend(gen.step_ms)
    per_seq = statistics.median(speed) if speed else 0.0
    return {
        "prompt_len": prompt_len,
        "batch": batch,
        "new_tokens": new_tokens,
        "runs": runs,
        "prefill_ms": statistics.median(prefill),
        "decode_tokens_per_s": per_seq,  # per sequence
        "batch_tokens_per_s": per_seq * batch,
        "token_latency_p50_ms": _percentile(steps, 50),
        "token_latency_p90_ms": _percentile(steps, 90),
    }
