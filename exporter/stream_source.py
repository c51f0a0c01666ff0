"""Read one weight at a time, in graph form, from a checkpoint or from an fp32 bundle, without keeping files mapped.

Where it stands: the source side of the streaming export and quantization (``calibration.stream_write``,
``calibration.stream_quant``) and of the layer-streaming reference (``exporter.stream_reference``). Both readers
answer ``graph_array(name)``: the initializer ``name`` of the traced graph (``layers.3.qkv.weight_t`` (K, N),
``embed.weight`` (vocab, hidden), ...) as a numpy array in the requested float dtype, and ``canonical(name)``: the
same tensor in checkpoint orientation as torch (the reference's form).

Why the files are reopened per read: safetensors (and numpy's memmap) map the whole file, and every page a read
touched stays in the process's resident set until the mapping goes; for a 12 GB checkpoint that is 12 GB of RSS
(clean page cache, but counted against cgroup limits and by ``/usr/bin/time``). safetensors' ``safe_open`` only
parses the JSON header, so opening it again for each tensor costs microseconds and drops the mapping as soon as
the tensor is copied out. ``pytorch_model*.bin`` checkpoints are read through torch's own memory map
(``exporter.weights``), which stays open for the run.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from runtime.errors import WeightsError
from runtime.spec import ModelSpec

from calibration.stream_write import BundleReader

from exporter.weights import (
    _load_bin,
    _open_safetensors,
    canonical_shapes,
    find_weight_files,
    name_table,
    part_shapes,
    skipped_keys,
)

LINEAR_SUFFIX = ".weight_t"
READ_BLOCK_BYTES = 32 * 1024**2  # graph_array converts this many bytes (in the requested dtype) of rows at a time  # graph name of a linear layer's (in, out) weight (exporter.model.Linear)


def graph_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Every weight initializer of the traced graph with its shape (linear weights transposed to (in, out))."""
    out = {}
    for name, shape in canonical_shapes(spec).items():
        if _is_linear(name):
            out[name[: -len(".weight")] + LINEAR_SUFFIX] = (shape[1], shape[0])
        else:
            out[name] = shape
    return out


def _is_linear(canonical_name: str) -> bool:
    stem = canonical_name.rsplit(".", 1)[0]
    return canonical_name.endswith(".weight") and (stem == "lm_head" or stem.split(".")[-1] in
                                                   ("qkv", "attn_out", "gate_up", "down"))


def canonical_name_of(graph_name: str) -> str:
    return graph_name[: -len(LINEAR_SUFFIX)] + ".weight" if graph_name.endswith(LINEAR_SUFFIX) else graph_name


class CheckpointReader:
    """Canonical weights of a checkpoint directory, one tensor per call; names and shapes checked up front."""

    def __init__(self, ckpt_dir: str, spec: ModelSpec, layout: str):
        self.ckpt_dir, self.spec = ckpt_dir, spec
        self.files = find_weight_files(ckpt_dir)
        self.table = name_table(spec, layout)
        self.shapes = canonical_shapes(spec)
        available = set(self.files.key_to_file)
        for name, keys in self.table.items():
            for key in keys:
                if key not in available:
                    raise WeightsError(f"{ckpt_dir}: weight '{key}' is missing (needed for {name})")
        expected = {k for keys in self.table.values() for k in keys}
        extra = sorted(available - expected - set(skipped_keys(layout)))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise WeightsError(f"{ckpt_dir}: unexpected weight '{extra[0]}'{more} does not belong to this model")

    def _read(self, key: str, want: Tuple[int, ...], rows: Optional[Tuple[int, int]] = None):
        path = self.files.key_to_file[key]
        if self.files.kind == "safetensors":
            handle = _open_safetensors(path)  # header only; the mapping goes with the handle (see module doc)
            try:
                if rows is None:
                    t = handle.get_tensor(key)
                else:
                    t = handle.get_slice(key)[rows[0]: rows[1]]
                shape = tuple(handle.get_slice(key).get_shape())
            except Exception as e:  # safetensors raises its own error types for short reads
                raise WeightsError(f"{path}: cannot read tensor '{key}' ({e}); is the file truncated?") from None
            finally:
                del handle
        else:
            full = _load_bin(path)[key]
            shape = tuple(full.shape)
            t = full if rows is None else full[rows[0]: rows[1]]
        if shape != want:
            raise WeightsError(f"{self.ckpt_dir}: weight '{key}' has shape {shape}, expected {want}")
        return t

    def canonical(self, name: str, dtype, rows: Optional[Tuple[int, int]] = None):
        """Canonical tensor ``name`` ((out, in) for linear layers) as torch ``dtype``; ``rows`` a [start, stop)
        slice of dim 0 (single-part tensors only: the embedding and the LM head)."""
        import torch

        keys = self.table[name]
        parts = []
        for key, want in zip(keys, part_shapes(self.spec, self.shapes[name], len(keys))):
            parts.append(self._read(key, want, rows if len(keys) == 1 else None))
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return t if t.dtype == dtype else t.to(dtype)

    def canonical_rows(self, name: str, start: int, stop: int, dtype):
        """Rows [start, stop) of the canonical tensor ``name`` as torch ``dtype``, whatever its number of parts
        (q/k/v of the hf layout: each part sliced where the range crosses it); only those rows are read."""
        import torch

        keys = self.table[name]
        pieces, row = [], 0
        for key, want in zip(keys, part_shapes(self.spec, self.shapes[name], len(keys))):
            lo, hi = max(start, row), min(stop, row + want[0])
            if lo < hi:
                pieces.append(self._read(key, want, (lo - row, hi - row)))
            row += want[0]
        t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        return t if t.dtype == dtype else t.to(dtype)

    def graph_array(self, graph_name: str, dtype) -> np.ndarray:
        """Graph initializer ``graph_name`` as numpy ``dtype`` (float32 or float16; linear weights (in, out),
        contiguous): the same values, bit for bit, as the whole-model export's ``load_canonical_weights`` then
        ``model_from_weights`` (torch's conversion, then the transpose)."""
        import torch

        torch_dtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]
        name = canonical_name_of(graph_name)
        shape = self.shapes[name]
        linear = graph_name.endswith(LINEAR_SUFFIX)
        # Filled a block of checkpoint rows at a time, each converted (exact or elementwise, so the bytes are those
        # of converting and transposing the whole) and written transposed into place: the whole tensor in the
        # checkpoint dtype, its converted copy and the transposed copy were alive together before (2.5x the fp32
        # bytes of the LM head, the largest tensor), now the result and one block.
        out = np.empty((shape[1], shape[0]) if linear else shape, dtype=dtype)
        keys = self.table[name]
        row = 0
        for key, want in zip(keys, part_shapes(self.spec, shape, len(keys))):
            width = max(1, READ_BLOCK_BYTES // (out.itemsize * max(1, int(np.prod(want[1:])))))
            for start in range(0, want[0], width):
                stop = min(want[0], start + width)
                t = self._read(key, want, (start, stop))
                block = (t if t.dtype == torch_dtype else t.to(torch_dtype)).numpy()
                if linear:
                    out[:, row + start: row + stop] = block.T
                else:
                    out[row + start: row + stop] = block
                del t, block
            row += want[0]
        return out


class BundleTensors(BundleReader):
    """``calibration.stream_write.BundleReader`` with the reference's ``canonical`` form (torch)."""

    def canonical(self, name: str, dtype, rows: Optional[Tuple[int, int]] = None):
        """As CheckpointReader.canonical: torch, (out, in) for linear layers."""
        import torch

        graph_name = name[: -len(".weight")] + LINEAR_SUFFIX if _is_linear(name) else name
        array = self.graph_array(graph_name, np.float32)
        t = torch.from_numpy(array if array.flags.writeable else array.copy())
        if graph_name.endswith(LINEAR_SUFFIX):
            t = t.t()
        if rows is not None:
            t = t[rows[0]: rows[1]]
        return t.contiguous().to(dtype)
