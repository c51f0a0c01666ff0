"""The external-data file names an ONNX file refers to, read without the onnx package.

The runtime may not depend on ``onnx`` (its base install is numpy + onnxruntime), and onnxruntime opens whatever
``location`` a tensor names. So this module walks the protobuf wire format of ModelProto just far enough to collect
every ``TensorProto.external_data["location"]``: graph initializers, sparse initializers, tensor attributes and
subgraphs of every node (If/Loop/Scan bodies), recursively. Raw tensor bytes are skipped by length, never copied,
so a 1 GB inline graph costs one memory map and a walk over its field headers.

Field numbers (onnx.proto3): ModelProto.graph = 7, .functions = 25; GraphProto.node = 1, .initializer = 5,
.sparse_initializer = 15; NodeProto.attribute = 5; FunctionProto.node = 7; AttributeProto.t = 5, .g = 6,
.tensors = 10, .graphs = 11, .sparse_tensor = 22, .sparse_tensors = 23; SparseTensorProto.values = 1,
.indices = 2; TensorProto.external_data = 13; StringStringEntryProto.key = 1, .value = 2.
"""
import mmap
from typing import List, Set, Tuple

from runtime.errors import BundleError

_MAX_DEPTH = 64  # nested subgraphs deeper than this are refused (a crafted file cannot exhaust the stack)


def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # the common one-byte case, on the fast path
        return buf[pos], pos + 1
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end) of each field in buf[start:end]; varints are skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError("field runs past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
            continue
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")


_TENSOR, _SPARSE, _GRAPH, _NODE, _ATTR, _FUNCTION, _MODEL = range(7)
# message kind -> {field number: kind of the sub-message}
_CHILDREN = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},
    _FUNCTION: {7: _NODE},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}


def _tensor_locations(buf, start: int, end: int, out: List[str]) -> None:
    for number, _, s, e in _fields(buf, start, end):
        if number != 13:
            continue
        key = value = None
        for n, _, s2, e2 in _fields(buf, s, e):
            if n == 1:
                key = bytes(buf[s2:e2])
            elif n == 2:
                value = bytes(buf[s2:e2])
        if key == b"location":
            try:
                out.append((value or b"").decode("utf-8"))
            except UnicodeDecodeError:
                out.append(repr(value))


def _walk(buf, kind: int, start: int, end: int, depth: int, out: List[str]) -> None:
    if depth > _MAX_DEPTH:
        raise ValueError(f"subgraphs nested deeper than {_MAX_DEPTH}")
    if kind == _TENSOR:
        _tensor_locations(buf, start, end, out)
        return
    children = _CHILDREN[kind]
    for number, _, s, e in _fields(buf, start, end):
        child = children.get(number)
        if child is not None:
            _walk(buf, child, s, e, depth + 1, out)


def external_data_locations(path: str) -> Set[str]:
    """Every external-data ``location`` in the ONNX file at ``path``; BundleError when it is not a valid protobuf."""
    out: List[str] = []
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise BundleError(f"{path}: empty file; not an ONNX model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                view = memoryview(m)
                try:
                    _walk(view, _MODEL, 0, size, 0, out)
                finally:
                    view.release()
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise BundleError(f"{path}: not a valid ONNX file ({e})") from None
    return set(out)
