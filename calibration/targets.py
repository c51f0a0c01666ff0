"""Which parts of the graph a precision conversion touches: the linear layers, and the user's keep-float choice.

Where it stands: every quantizer (static/dynamic INT8, INT4) quantizes exactly the linear layers found here and
nothing else. In a glm-export graph a linear layer is a MatMul whose second input is a 2-D weight initializer (K, N)
named ``<module>.weight_t`` (exporter/model.py stores linear weights transposed), e.g. ``layers.3.qkv``,
``layers.3.attn_out``, ``layers.3.gate_up``, ``layers.3.down``, ``lm_head``. Attention's QK^T and PV MatMuls (no
weight), norms, softmax, rotary and the embedding Gather are never touched: quantizing their activations is what
wrecks a small ChatGLM (perplexity x6 in a trial).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

from calibration.errors import QuantizationError

WEIGHT_SUFFIX = ".weight_t"
LINEAR_KINDS = ("qkv", "attn_out", "gate_up", "down")
# shorthands accepted by --keep-float besides glob patterns over linear names
KEEP_FLOAT_ALIASES = ("lm_head", "first", "last", "mlp_down", "attention", "mlp")


@dataclass(frozen=True)
class Linear:
    """One linear layer of the graph."""

    name: str  # "layers.3.down", "lm_head"
    node: str  # the MatMul node's name
    activation: str  # the MatMul's input tensor (B, S, K)
    weight: str  # the (K, N) initializer's name
    shape: Tuple[int, int]  # (K, N)

    @property
    def layer(self) -> int:
        """Decoder layer index, -1 for the LM head."""
        m = re.match(r"layers\.(\d+)\.", self.name)
        return int(m.group(1)) if m else -1


def find_linears(proto) -> List[Linear]:
    """The linear layers of a glm-export graph, in graph order (weights need not be loaded)."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or not w.name.endswith(WEIGHT_SUFFIX):
            continue
        out.append(Linear(w.name[: -len(WEIGHT_SUFFIX)], node.name, node.input[0], w.name, (w.dims[0], w.dims[1])))
    if not out:
        raise QuantizationError(
            "the graph has no linear layers (MatMul on a '*.weight_t' initializer); only bundles written by "
            "'glm-export onnx' can be quantized"
        )
    return out


def _alias_patterns(alias: str, num_layers: int) -> List[str]:
    return {
        "lm_head": ["lm_head"],
        "first": ["layers.0.*"],
        "last": [f"layers.{num_layers - 1}.*"],
        "mlp_down": ["layers.*.down"],
        "attention": ["layers.*.qkv", "layers.*.attn_out"],
        "mlp": ["layers.*.gate_up", "layers.*.down"],
    }[alias]


def select(linears: Sequence[Linear], keep_float: Iterable[str], num_layers: int) -> Tuple[List[Linear], List[Linear]]:
    """-> (linears to quantize, linears kept in float). ``keep_float`` holds aliases (see KEEP_FLOAT_ALIASES) or
    glob patterns over linear names ("layers.11.*", "layers.*.down"); a pattern that matches nothing is an error,
    so a typo never silently quantizes what the user meant to keep."""
    keep: Dict[str, Linear] = {}
    names = [lin.name for lin in linears]
    for item in keep_float:
        patterns = _alias_patterns(item, num_layers) if item in KEEP_FLOAT_ALIASES else [item]
        hits = [lin for lin in linears if any(fnmatch.fnmatchcase(lin.name, p) for p in patterns)]
        if not hits:
            raise QuantizationError(
                f"--keep-float {item!r} matches no linear layer; use one of {', '.join(KEEP_FLOAT_ALIASES)} or a "
                f"pattern over names such as {names[0]!r}, {names[-1]!r}"
            )
        keep.update((lin.name, lin) for lin in hits)
    quantize = [lin for lin in linears if lin.name not in keep]
    if not quantize:
        raise QuantizationError("--keep-float keeps every linear layer in float; nothing would be quantized")
    return quantize, [lin for lin in linears if lin.name in keep]
