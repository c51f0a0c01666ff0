"""Optimization profiles for a TensorRT engine that generates text: one for prefill, one for decode.

Stands between the bundle manifest (graph inputs with symbolic dims) and the engine builder
(``exporter.trt_engine``) and ``trtexec`` command (``exporter.trtexec_cmd``). Pure: no TensorRT import.

With B = max batch, L = max input (prompt) length and S = max sequence length (prompt + generated):

    prefill  batch 1..B, seq 1..L, past 0..S-L, past_plus_seq 1..S    (prompt, from an empty or short cache)
    decode   batch 1..B, seq 1,    past 1..S-1, past_plus_seq 2..S    (one token at a time)

Every graph input gets min/opt/max shapes from its symbolic dims, so each ``past_key_values.{i}.key|value`` is
covered along with ``input_ids``, ``attention_mask`` and ``position_ids``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from runtime.errors import BundleError, GlmExportError
from runtime.graph_contract import BATCH, PAST, SEQ, TOTAL, TensorSpec
from runtime.manifest import Manifest
from runtime.trt_profiles_select import Profile, Range, Shape, ShapeRange


class EngineOptionError(GlmExportError):
    """A TensorRT engine option (--max-batch, --max-input-len, --max-seq-len, --opt-seq, --fp16, ...) is invalid."""


@dataclass(frozen=True)
class ProfileRequest:
    """The sizes an engine must serve, as the user gives them on the command line.

    ``opt_batch`` and ``opt_seq`` are the sizes TensorRT tunes kernels for: the usual batch and the usual prompt
    length. ``opt_seq`` defaults to half of ``max_input_len``. Decode is tuned for ``opt_seq`` cached tokens.
    """

    max_batch: int
    max_input_len: int
    max_seq_len: int
    opt_batch: int = 1
    opt_seq: Optional[int] = None

    def __post_init__(self) -> None:
        for option, value in (
            ("--max-batch", self.max_batch),
            ("--max-input-len", self.max_input_len),
            ("--max-seq-len", self.max_seq_len),
            ("--opt-batch", self.opt_batch),
            ("--opt-seq", self.opt_seq),
        ):
            if value is None and option == "--opt-seq":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise EngineOptionError(f"{option} must be a whole number, got {value!r}")
            if value < 1:
                raise EngineOptionError(f"{option} must be at least 1, got {value}")
        if self.max_seq_len < 2:
            raise EngineOptionError(
                f"--max-seq-len must be at least 2 (one prompt token and one generated token), got {self.max_seq_len}"
            )
        if self.max_input_len > self.max_seq_len:
            raise EngineOptionError(
                f"--max-input-len {self.max_input_len} is larger than --max-seq-len {self.max_seq_len}; the prompt "
                f"is part of the sequence, so raise --max-seq-len or lower --max-input-len"
            )
        if self.opt_batch > self.max_batch:
            raise EngineOptionError(f"--opt-batch {self.opt_batch} is larger than --max-batch {self.max_batch}")
        if self.opt_seq is not None and self.opt_seq > self.max_input_len:
            raise EngineOptionError(f"--opt-seq {self.opt_seq} is larger than --max-input-len {self.max_input_len}")

    @property
    def prompt_opt(self) -> int:
        return self.opt_seq if self.opt_seq is not None else max(1, self.max_input_len // 2)


def generation_dims(request: ProfileRequest) -> Dict[str, Dict[str, Range]]:
    """The (min, opt, max) of every symbolic dim, for the prefill and the decode profile."""
    b, big_l, s = request.max_batch, request.max_input_len, request.max_seq_len
    ob, os_ = request.opt_batch, request.prompt_opt
    decode_past_opt = min(max(os_, 1), s - 1)
    return {
        "prefill": {
            BATCH: (1, ob, b),
            SEQ: (1, os_, big_l),
            PAST: (0, 0, s - big_l),
            TOTAL: (1, os_, s),
        },
        "decode": {
            BATCH: (1, ob, b),
            SEQ: (1, 1, 1),
            PAST: (1, decode_past_opt, s - 1),
            TOTAL: (2, decode_past_opt + 1, s),
        },
    }


def profiles_for_generation(
    inputs: Sequence[TensorSpec], request: ProfileRequest, max_positions: Optional[int] = None
) -> List[Profile]:
    """The prefill and decode profiles for a graph with these inputs; every input is given shapes.

    ``max_positions`` is the model's trained context (``spec.max_position_embeddings``); a longer ``max_seq_len``
    is refused, since positions past it are outside what the model (and its rotary tables) cover.
    """
    if max_positions is not None and request.max_seq_len > max_positions:
        raise EngineOptionError(
            f"--max-seq-len {request.max_seq_len} is longer than the model's context of {max_positions} positions; "
            f"use --max-seq-len {max_positions} or less"
        )
    if not inputs:
        raise BundleError("the manifest lists no graph inputs; re-export the bundle")
    profiles = []
    for name, dims in generation_dims(request).items():
        shapes: Dict[str, ShapeRange] = {}
        for tensor in inputs:
            shapes[tensor.name] = _shape_range(tensor, dims)
        profiles.append(Profile(name=name, dims=dims, shapes=shapes))
    return profiles


def profiles_for_manifest(manifest: Manifest, request: ProfileRequest) -> List[Profile]:
    """:func:`profiles_for_generation` for a bundle's manifest, checked against the model's trained context."""
    return profiles_for_generation(manifest.inputs, request, manifest.spec.max_position_embeddings)


def _shape_range(tensor: TensorSpec, dims: Dict[str, Range]) -> ShapeRange:
    lo: List[int] = []
    opt: List[int] = []
    hi: List[int] = []
    for d in tensor.shape:
        if isinstance(d, int):
            r: Tuple[int, int, int] = (d, d, d)
        elif d in dims:
            r = dims[d]
        else:
            raise BundleError(
                f"input {tensor.name!r} has dimension {d!r}, which is none of {sorted(dims)}; glm-export cannot size "
                f"it for TensorRT; re-export the bundle with the current glm-export"
            )
        lo.append(r[0])
        opt.append(r[1])
        hi.append(r[2])
    shapes: Tuple[Shape, Shape, Shape] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes
