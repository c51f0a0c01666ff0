"""Type checks of a manifest's fields, before any of them is used: one-line BundleErrors naming the field.

``Manifest.from_dict`` calls :func:`check_manifest_dict` first, so a manifest with a field of the wrong type (a
string where a count belongs, a list where an object belongs, NaN in a float) is refused where it is read, never
deep inside the runtime. The spec's fields are checked against ``ModelSpec``'s own annotations, so a new spec field
needs no edit here. Standard library only; Python 3.8.
"""
import dataclasses
import math
import re
from typing import Any, Mapping

from runtime.bundle_paths import check_member_name
from runtime.errors import BundleError
from runtime.spec import ModelSpec

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_COUNT = 1 << 40  # any count or size above this is not a model this runtime can load
_POSITIVE_INTS = {"num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                  "vocab_size", "max_position_embeddings"}
_POSITIVE_FLOATS = {"norm_eps", "rope_theta", "rope_position_scale"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(where: str, field: str, value: Any, expected: str) -> BundleError:
    return BundleError(f"{where}: field '{field}' = {value!r:.80} is invalid; expected {expected}")


def check_spec_dict(spec: Any, where: str) -> None:
    if not isinstance(spec, Mapping):
        raise _fail(where, "spec", spec, "an object")
    types = {f.name: f.type for f in dataclasses.fields(ModelSpec)}
    for name, value in spec.items():
        if name not in types:
            continue  # unknown names are refused by ModelSpec.from_dict with their list
        t = types[name] if isinstance(types[name], str) else getattr(types[name], "__name__", str(types[name]))
        field = f"spec.{name}"
        if t == "int":
            low = 1 if name in _POSITIVE_INTS else 0
            if not _is_int(value) or not (low <= value <= _MAX_COUNT):
                raise _fail(where, field, value, f"a whole number >= {low}")
        elif t == "float":
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise _fail(where, field, value, "a finite number")
            if name in _POSITIVE_FLOATS and value <= 0:
                raise _fail(where, field, value, "a number > 0")
        elif t == "bool":
            if not isinstance(value, bool):
                raise _fail(where, field, value, "true or false")
        elif t == "str":
            if not isinstance(value, str):
                raise _fail(where, field, value, "a string")
        elif t.startswith("Tuple"):
            if not isinstance(value, list) or not all(_is_int(v) and 0 <= v <= _MAX_COUNT for v in value):
                raise _fail(where, field, value, "a list of token ids")
        elif t.startswith("Dict"):
            if not isinstance(value, Mapping) or not all(isinstance(k, str) and _is_int(v) and 0 <= v <= _MAX_COUNT
                                                         for k, v in value.items()):
                raise _fail(where, field, value, "an object of token text -> id")


def _check_tensors(value: Any, field: str, where: str) -> None:
    if not isinstance(value, list):
        raise _fail(where, field, value, "a list of {name, dtype, shape} objects")
    for i, t in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(t, Mapping):
            raise _fail(where, f, t, "a {name, dtype, shape} object")
        if not isinstance(t.get("name"), str) or not isinstance(t.get("dtype"), str):
            raise _fail(where, f, t, "string 'name' and 'dtype'")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, str) or (_is_int(d) and d >= 0) for d in shape):
            raise _fail(where, f + ".shape", shape, "a list of sizes or axis names")


def check_manifest_dict(d: Mapping[str, Any], where: str) -> None:
    """BundleError naming the first field of ``d`` (a parsed manifest.json) that has the wrong type."""
    check_spec_dict(d.get("spec"), where)
    if not isinstance(d.get("precision"), str):
        raise _fail(where, "precision", d.get("precision"), "a precision name such as 'fp32'")
    _check_tensors(d.get("inputs"), "inputs", where)
    _check_tensors(d.get("outputs"), "outputs", where)
    if "model_file" in d:
        check_member_name(d["model_file"], "model_file", where)
    if "opset" in d and (not _is_int(d["opset"]) or not 1 <= d["opset"] <= 1000):
        raise _fail(where, "opset", d["opset"], "an ONNX opset number")
    for name in ("tool_version",):
        if name in d and not isinstance(d[name], str):
            raise _fail(where, name, d[name], "a string")
    for name in ("source", "verification", "extra"):
        if name in d and not isinstance(d[name], Mapping):
            raise _fail(where, name, d[name], "an object")
    files = d.get("files", {})
    if not isinstance(files, Mapping):
        raise _fail(where, "files", files, "an object of file name -> {sha256, bytes}")
    for name, rec in files.items():
        check_member_name(name, "files entry", where)
        if not isinstance(rec, Mapping):
            raise _fail(where, f"files[{name!r}]", rec, "a {sha256, bytes} object")
        if "sha256" in rec and not (isinstance(rec["sha256"], str) and _HEX64.match(rec["sha256"])):
            raise _fail(where, f"files[{name!r}].sha256", rec["sha256"], "64 lowercase hex digits")
        if "bytes" in rec and not (_is_int(rec["bytes"]) and 0 <= rec["bytes"] <= _MAX_COUNT << 10):
            raise _fail(where, f"files[{name!r}].bytes", rec["bytes"], "a size in bytes")
    tok = d.get("tokenizer_files", [])
    if not isinstance(tok, list):
        raise _fail(where, "tokenizer_files", tok, "a list of file names")
    for name in tok:
        check_member_name(name, "tokenizer_files entry", where)
