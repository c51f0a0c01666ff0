"""Memory budgets for ChatGLM3-6B and GLM-4-9B-chat on Jetson Orin boards: arithmetic, not measurement.

Every number comes from the published configs (``exporter.tiny.published.PUBLISHED_CONFIGS``, read by
``exporter.config.spec_from_checkpoint`` as a real checkpoint would be) and ``runtime.spec.ModelSpec``:

    weights      = linear x bytes per weight + (num_params - linear) x 2
                   linear = the MatMul weights the quantizers touch (qkv, attn_out, gate_up, down, lm_head), at
                   fp16 2, int8 1, int4 0.5 bytes (int4 group scales not counted); the embedding table, norms and
                   qkv biases stay fp16 (calibration/targets.py: the embedding Gather is never quantized)
    KV cache     = sets x batch x tokens x kv_bytes_per_token,  kv_bytes_per_token = 2 x layers x kv_heads x
                   head_dim x 2 bytes (fp16 K and V); sets = 2: while a step runs, the cache it reads and the cache it
                   writes both exist (glm-export's TensorRT backend keeps two full-size sets)
    logits       = batch x max_input_len x vocab x 4 bytes (fp32 logits of a whole prompt; the TensorRT backend
                   allocates this once for the largest prefill)

TensorRT's activation memory, the CUDA context and the operating system are NOT included: nothing here has run on a
Jetson. ``python docs/memory_table.py`` prints the markdown that docs/jetson.md holds between its
``memory-table`` markers; tests/runtime/test_trt_ep.py checks that the two agree and that the numbers are ModelSpec's.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from exporter.config import spec_from_checkpoint  # noqa: E402
from exporter.tiny.published import PUBLISHED_CONFIGS  # noqa: E402
from runtime.spec import ModelSpec  # noqa: E402

GIB = 2**30
MIB = 2**20
MODELS: Tuple[Tuple[str, str], ...] = (("ChatGLM3-6B", "chatglm3"), ("GLM-4-9B-chat", "glm4"))
BOARDS: Tuple[Tuple[str, int], ...] = (  # module memory in GiB (LPDDR5, shared by CPU and GPU)
    ("Orin Nano 8GB", 8),
    ("Orin NX 16GB", 16),
    ("AGX Orin 32GB", 32),
    ("AGX Orin 64GB", 64),
)
BYTES_PER_WEIGHT: Dict[str, float] = {"fp16": 2.0, "int8": 1.0, "int4": 0.5}
KV_BYTES_PER_ELEMENT = 2  # fp16 K/V (an fp32 bundle's cache is twice this)
KV_SETS = 2
KV_TOKENS: Tuple[int, ...] = (2048, 8192, 32768, 131072)
BUDGET = {"batch": 1, "max_seq_len": 2048, "max_input_len": 1024}  # `glm-export trt`'s defaults


def published_spec(generation: str) -> ModelSpec:
    """The spec of a published checkpoint, from its config.json alone (no weights, no tokenizer needed)."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
            json.dump(PUBLISHED_CONFIGS[generation], f)
        spec, _ = spec_from_checkpoint(d)
    return spec


def linear_params(spec: ModelSpec) -> int:
    """Weights of the linear layers (the MatMul weights a quantizer converts): qkv, attention out, gate/up, down, and
    the LM head; biases excluded."""
    h, d = spec.hidden_size, spec.head_dim
    per_layer = (h * (spec.num_heads + 2 * spec.num_kv_heads) * d + spec.num_heads * d * h
                 + h * 2 * spec.ffn_hidden_size + spec.ffn_hidden_size * h)
    return spec.num_layers * per_layer + spec.vocab_size * h


def weight_bytes(spec: ModelSpec, precision: str) -> float:
    linear = linear_params(spec)
    return linear * BYTES_PER_WEIGHT[precision] + (spec.num_params - linear) * BYTES_PER_WEIGHT["fp16"]


def kv_bytes(spec: ModelSpec, tokens: int, batch: int = 1, sets: int = KV_SETS) -> int:
    return sets * batch * tokens * spec.kv_bytes_per_token(KV_BYTES_PER_ELEMENT)


def logits_bytes(spec: ModelSpec, batch: int, input_len: int) -> int:
    return batch * input_len * spec.vocab_size * 4


def budget(spec: ModelSpec, precision: str, batch: int = BUDGET["batch"], max_seq_len: int = BUDGET["max_seq_len"],
           max_input_len: int = BUDGET["max_input_len"]) -> Dict[str, float]:
    """Bytes of weights, KV cache (both sets), prompt logits and their total for one engine configuration."""
    parts = {
        "weights": weight_bytes(spec, precision),
        "kv": float(kv_bytes(spec, max_seq_len, batch)),
        "logits": float(logits_bytes(spec, batch, max_input_len)),
    }
    parts["total"] = sum(parts.values())
    return parts


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown() -> str:
    specs = [(name, published_spec(gen)) for name, gen in MODELS]
    out: List[str] = []

    out.append("Model facts (from the published config.json, via `spec_from_checkpoint`):")
    out.append("")
    out += _table(
        ["model", "parameters", "layers", "kv heads x head dim", "vocab", "KV bytes/token (fp16)", "trained context"],
        [[name, f"{s.num_params:,} ({s.num_params / 1e9:.2f} B)", str(s.num_layers), f"{s.num_kv_heads} x {s.head_dim}",
          f"{s.vocab_size:,}",
          f"{s.kv_bytes_per_token(KV_BYTES_PER_ELEMENT):,} ({s.kv_bytes_per_token(KV_BYTES_PER_ELEMENT) // 1024} KiB)",
          f"{s.max_position_embeddings:,}"] for name, s in specs],
    )
    out.append("")
    out.append("Weights, GiB: linear weights at 2 / 1 / 0.5 bytes, the rest (embedding, norms, biases) at 2 bytes:")
    out.append("")
    out += _table(["model", "linear weights", "embedding + norms + biases"] + list(BYTES_PER_WEIGHT),
                  [[name, f"{linear_params(s):,}", f"{s.num_params - linear_params(s):,}"]
                   + [_gib(weight_bytes(s, p)) for p in BYTES_PER_WEIGHT] for name, s in specs])
    out.append("")
    out.append(f"KV cache, GiB, batch 1, fp16, {KV_SETS} sets (`{KV_SETS} x tokens x KV bytes/token`):")
    out.append("")
    out += _table(["model"] + [f"{t:,} tokens" for t in KV_TOKENS],
                  [[name] + [_gib(kv_bytes(s, t)) for t in KV_TOKENS] for name, s in specs])
    out.append("")
    b, seq, inp = BUDGET["batch"], BUDGET["max_seq_len"], BUDGET["max_input_len"]
    out.append(f"Budget for `glm-export trt`'s default sizes (batch {b}, --max-seq-len {seq}, --max-input-len {inp}), "
               f"GiB; the board columns are module memory minus that total, before the OS, the CUDA context and "
               f"TensorRT's activations (none measured):")
    out.append("")
    rows = []
    for name, s in specs:
        for p in BYTES_PER_WEIGHT:
            parts = budget(s, p)
            rows.append([name, p] + [_gib(parts[k]) for k in ("weights", "kv", "logits", "total")]
                        + [f"{mem - parts['total'] / GIB:.2f}" for _, mem in BOARDS])
    out += _table(["model", "precision", "weights", "KV (2 sets)", "prompt logits", "total"]
                  + [f"{board} left" for board, _ in BOARDS], rows)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
