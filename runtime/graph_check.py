"""The opened graph must agree with the manifest's spec, checked once at load (the manifest is the only file a
bundle does not checksum, so a changed kv_heads or num_layers there must be caught before the first step feeds
onnxruntime tensors of the wrong shape).

Compares the session's past_key_values inputs (count, kv_heads, head_dim, element type) and the logits' vocabulary
size with the spec; BundleError naming the field otherwise. Python 3.8; no onnx package needed.
"""
from typing import Any

from runtime.errors import BundleError
from runtime.graph_contract import LOGITS
from runtime.spec import ModelSpec

_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def check_session_matches_spec(session: Any, spec: ModelSpec, kv_dtype: str, model_path: str) -> None:
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if len(pasts) != 2 * spec.num_layers:
        raise BundleError(f"{model_path}: the graph has {len(pasts) // 2} layers of KV cache but the manifest's "
                          f"spec.num_layers is {spec.num_layers}")
    for t in pasts:
        shape = list(t.shape)
        for axis, field, want in ((1, "num_kv_heads", spec.num_kv_heads), (3, "head_dim", spec.head_dim)):
            have = shape[axis] if len(shape) == 4 else None
            if isinstance(have, int) and have != want:
                raise BundleError(f"{model_path}: input {t.name} has {have} on axis {axis} but the manifest's "
                                  f"spec.{field} is {want}")
        if _ORT_TYPES.get(kv_dtype, t.type) != t.type:
            raise BundleError(f"{model_path}: input {t.name} is {t.type} but the manifest's KV dtype is {kv_dtype}")
    for o in session.get_outputs():
        if o.name == LOGITS and len(o.shape) == 3 and isinstance(o.shape[2], int) and o.shape[2] != spec.vocab_size:
            raise BundleError(f"{model_path}: logits have {o.shape[2]} entries but the manifest's spec.vocab_size is "
                              f"{spec.vocab_size}")
