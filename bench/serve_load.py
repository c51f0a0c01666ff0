"""glm-export serve under load: throughput (total generated tokens/s) at concurrency 1, 4, 16 against a serial server
(--max-batch 1) on the same bundle, p50/p95 time to first token, and time to first token on turn 5 of a chat with
and without prefix reuse.

Every server is a real ``glm-export serve`` process on 127.0.0.1; clients stream with httpx and read ``usage``. The
contenders run one after the other in each round (interleaved, medians over ``--rounds``), and figures are quoted
as ratios: this machine's absolute speed depends on its neighbours.

    PYTHONPATH=. python bench/serve_load.py [--model BUNDLE] [--size small] [--rounds 3] [--threads 2] [--json]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import httpx
import numpy as np

from _common import common_args, interleaved_medians

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from serve_helpers import server_process  # noqa: E402  (the tests' loopback server launcher)

WORDS = ["hello", "world", "the", "model", "green", "tea", "cup", "of", "text", "chat"]
CONCURRENCY = (1, 4, 16)


def make_bundle(workdir: str, size: str) -> str:
    ckpt, bundle = os.path.join(workdir, f"ckpt-{size}"), os.path.join(workdir, f"bundle-{size}")
    if not os.path.isdir(bundle):
        env = dict(os.environ, PYTHONPATH=ROOT)
        cli = [sys.executable, "-m", "exporter.cli"]
        subprocess.run(cli + ["tiny", "--out", ckpt, "--generation", "chatglm3", "--size", size, "--overwrite"],
                       check=True, env=env, cwd=ROOT, capture_output=True)
        subprocess.run(cli + ["onnx", "--model", ckpt, "--out", bundle, "--overwrite", "--quiet"], check=True,
                       env=env, cwd=ROOT, capture_output=True)
    return bundle


def stream_one(base: str, messages, max_tokens: int) -> Tuple[float, int, str]:
    """-> (time to first token s, completion tokens, text) of one streamed chat."""
    body = {"model": "bench", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, chunks, text = None, 0, 0, []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            c = json.loads(line[6:])
            if ttft is None and chunks > 1:  # the first chunk only announces the role
                ttft = time.perf_counter() - t0
            if c.get("usage"):
                tokens = c["usage"]["completion_tokens"]
            elif c["choices"]:
                text.append(c["choices"][0]["delta"].get("content") or "")
    return ttft or 0.0, tokens, "".join(text)


PROMPT_WORDS = (4, 16, 48, 120, 200)


def prompts(n: int, seed: int, words=PROMPT_WORDS) -> List[list]:
    rng = np.random.default_rng(seed)
    lengths = rng.choice(list(words), size=n)
    return [[{"role": "user", "content": " ".join(rng.choice(WORDS, size=int(k)))}] for k in lengths]


def load_round(base: str, concurrency: int, max_tokens: int, seed: int, words=PROMPT_WORDS) -> Dict[str, float]:
    jobs = prompts(max(2 * concurrency, 8), seed, words)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda m: stream_one(base, m, max_tokens), jobs))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    return {"tokens_per_s": sum(r[1] for r in results) / wall,
            "ttft_p50_ms": 1000 * float(np.percentile(ttfts, 50)),
            "ttft_p95_ms": 1000 * float(np.percentile(ttfts, 95))}


def chat_turn5_ttft(base: str, seed: int, max_tokens: int) -> Dict[str, float]:
    rng = np.random.default_rng(seed)
    history = [{"role": "system", "content": f"Conversation {seed}: answer briefly."}]
    ttft = 0.0
    for _turn in range(5):
        # 100 words a turn keeps turn 5 (about 1500 ids) inside a 2048 context: a conversation cut to fit changes
        # its first turns, which ends the reuse (only the system message is then a common prefix)
        history.append({"role": "user", "content": " ".join(rng.choice(WORDS, size=100))})
        ttft, _, reply = stream_one(base, history, max_tokens)
        history.append({"role": "assistant", "content": reply})
    return {"turn5_ttft_ms": 1000 * ttft}


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle to serve [default: a tiny chatglm3 of --size]")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "mid"))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prompt-words", default=",".join(map(str, PROMPT_WORDS)),
                        help="prompt lengths in words, drawn at random per request")
    parser.add_argument("--no-prefix", action="store_true", help="skip the turn-5 prefix reuse measurement")
    parser.add_argument("--no-load", action="store_true", help="skip the throughput measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    words = tuple(int(w) for w in args.prompt_words.split(","))
    workdir = args.workdir or tempfile.mkdtemp(prefix="serve-bench-")
    bundle = args.model or make_bundle(workdir, args.size)
    common = ["--model-name", "bench", "--threads", str(args.threads)]
    life = 4 * 3600.0  # the servers stop by themselves after this (they are stopped at the end anyway)
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    if not args.no_load:
        load(args, bundle, common, life, words, out)
    if args.no_prefix:
        return report(args, bundle, out, words)
    prefix(args, bundle, common, life, out)
    report(args, bundle, out, words)


def load(args, bundle, common, life, words, out) -> None:
    with server_process(bundle, *common, "--max-batch", str(args.max_batch), "--prefix-cache-mb", "0",
                        lifetime_s=life) as batched, \
            server_process(bundle, *common, "--max-batch", "1", "--prefix-cache-mb", "0", lifetime_s=life) as serial:
        for base in (batched, serial):  # warm-up: sessions, tokenizer, allocator
            load_round(base, 2, 8, seed=999)
        for c in CONCURRENCY:
            seeds = iter(range(1000))
            out[f"c{c}"] = interleaved_medians({
                "batched": lambda c=c: load_round(batched, c, args.new_tokens, next(seeds), words),
                "serial": lambda c=c: load_round(serial, c, args.new_tokens, next(seeds), words),
            }, args.rounds)
            print(f"concurrency {c}: {out[f'c{c}']}", file=sys.stderr, flush=True)


def prefix(args, bundle, common, life, out) -> None:
    with server_process(bundle, *common, "--max-batch", "4", lifetime_s=life) as reuse, \
            server_process(bundle, *common, "--max-batch", "4", "--prefix-cache-mb", "0", lifetime_s=life) as no_reuse:
        seeds = iter(range(2000, 3000))
        out["prefix"] = interleaved_medians({
            "reuse": lambda: chat_turn5_ttft(reuse, next(seeds), 16),
            "no_reuse": lambda: chat_turn5_ttft(no_reuse, next(seeds), 16),
        }, args.rounds)


def report(args, bundle: str, out, words) -> None:
    if args.json:
        print(json.dumps({"bundle": bundle, "rounds": args.rounds, "prompt_words": words, "results": out}))
        return
    print(f"bundle {bundle}, {args.rounds} rounds (medians), {args.new_tokens} new tokens per request, prompts of "
          f"{'/'.join(map(str, words))} words")
    print(f"{'concurrency':>11} {'batched tok/s':>13} {'serial tok/s':>12} {'ratio':>6} "
          f"{'TTFT p50 ms':>11} {'p95 ms':>7} {'serial p50':>10} {'p95':>7}")
    for c in CONCURRENCY if "c1" in out else ():
        b, s = out[f"c{c}"]["batched"], out[f"c{c}"]["serial"]
        print(f"{c:>11} {b['tokens_per_s']:>13.1f} {s['tokens_per_s']:>12.1f} "
              f"{b['tokens_per_s'] / s['tokens_per_s']:>6.2f} {b['ttft_p50_ms']:>11.1f} {b['ttft_p95_ms']:>7.1f} "
              f"{s['ttft_p50_ms']:>10.1f} {s['ttft_p95_ms']:>7.1f}")
    if "prefix" not in out:
        return
    p = out["prefix"]
    with_, without = p["reuse"]["turn5_ttft_ms"], p["no_reuse"]["turn5_ttft_ms"]
    print(f"turn-5 TTFT: {with_:.1f} ms with prefix reuse, {without:.1f} ms without ({without / with_:.2f}x)")


if __name__ == "__main__":
    main()
