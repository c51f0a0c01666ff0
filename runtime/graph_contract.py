"""The ONNX graph contract: input/output names, dtypes and symbolic shapes, in one place.

Names follow optimum and onnxruntime-genai: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key|value`` in, ``logits`` and ``present.{i}.key|value`` out. The KV layout is batch-first:
[batch, kv_heads, past, head_dim].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union

from runtime.spec import POSITIONS_2D_BLOCK, ModelSpec

Dim = Union[int, str]

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "past_plus_seq"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def past_names(num_layers: int) -> List[str]:
    """Every past_key_values.* input in graph order: layer 0 key, layer 0 value, layer 1 key, ..."""
    return [n for i in range(num_layers) for n in (past_key_name(i), past_value_name(i))]


def present_names(num_layers: int) -> List[str]:
    """Every present.* output in graph order, matching :func:`past_names`."""
    return [n for i in range(num_layers) for n in (present_key_name(i), present_value_name(i))]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: Tuple[Dim, ...]

    def to_dict(self):
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d):
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


def position_ids_shape(spec: ModelSpec) -> Tuple[Dim, ...]:
    """[batch, seq]; ChatGLM-6B's 2D positions: [batch, 2, seq] (row 0 the position, row 1 the block position)."""
    return (BATCH, 2, SEQ) if spec.position_kind == POSITIONS_2D_BLOCK else (BATCH, SEQ)


def graph_inputs(spec: ModelSpec, kv_dtype: str = "float32") -> List[TensorSpec]:
    kv_shape = (BATCH, spec.num_kv_heads, PAST, spec.head_dim)
    tensors = [
        TensorSpec(INPUT_IDS, "int64", (BATCH, SEQ)),
        TensorSpec(ATTENTION_MASK, "int64", (BATCH, TOTAL)),
        TensorSpec(POSITION_IDS, "int64", position_ids_shape(spec)),
    ]
    for i in range(spec.num_layers):
        tensors.append(TensorSpec(past_key_name(i), kv_dtype, kv_shape))
        tensors.append(TensorSpec(past_value_name(i), kv_dtype, kv_shape))
    return tensors


def graph_outputs(spec: ModelSpec, kv_dtype: str = "float32") -> List[TensorSpec]:
    kv_shape = (BATCH, spec.num_kv_heads, TOTAL, spec.head_dim)
    tensors = [TensorSpec(LOGITS, "float32", (BATCH, SEQ, spec.vocab_size))]
    for i in range(spec.num_layers):
        tensors.append(TensorSpec(present_key_name(i), kv_dtype, kv_shape))
        tensors.append(TensorSpec(present_value_name(i), kv_dtype, kv_shape))
    return tensors


# ---- the fused onnxruntime graph (exporter/fused_graph.py): the same names, with a shared-buffer KV cache
LOGITS_TO_KEEP = "logits_to_keep"  # int64 [1]: logits of the last k positions only; 0 keeps all
MAX_LEN = "max_length"  # the shared KV buffer's length: the longest past + seq one generation needs
KEPT = "kept_positions"


def fused_graph_inputs(spec: ModelSpec, kv_dtype: str = "float32") -> List[TensorSpec]:
    """The portable inputs with past_key_values.* as the shared buffer [batch, kv_heads, max_length, head_dim]
    (written in place: present.* is the same buffer), plus the optional ``logits_to_keep``."""
    kv_shape = (BATCH, spec.num_kv_heads, MAX_LEN, spec.head_dim)
    tensors = [t if not t.name.startswith("past_key_values.") else TensorSpec(t.name, kv_dtype, kv_shape)
               for t in graph_inputs(spec, kv_dtype)]
    tensors.append(TensorSpec(LOGITS_TO_KEEP, "int64", (1,)))
    return tensors


def fused_graph_outputs(spec: ModelSpec, kv_dtype: str = "float32") -> List[TensorSpec]:
    kv_shape = (BATCH, spec.num_kv_heads, MAX_LEN, spec.head_dim)
    tensors = [TensorSpec(LOGITS, "float32", (BATCH, KEPT, spec.vocab_size))]
    for t in graph_outputs(spec, kv_dtype)[1:]:
        tensors.append(TensorSpec(t.name, kv_dtype, kv_shape))
    return tensors
