"""Optimization profiles for a TensorRT engine that generates text: one for prefill, one for decode.

Stands between the bundle manifest (graph inputs with symbolic dims) and the engine builder
(``exporter.trt_engine``) and ``trtexec`` command (``exporter.trtexec_cmd``). The code lives in ``runtime.trt_ep``,
since the runtime sizes onnxruntime's TensorRT execution provider from the same request and dims; this module is
the exporter's name for it. Pure: no TensorRT import.

With B = max batch, L = max input (prompt) length and S = max sequence length (prompt + generated):

    prefill  batch 1..B, seq 1..L, past 0..S-L, past_plus_seq 1..S    (prompt, from an empty or short cache)
    decode   batch 1..B, seq 1,    past 1..S-1, past_plus_seq 2..S    (one token at a time)
"""
from __future__ import annotations

from runtime.trt_ep import (
    EngineOptionError,
    ProfileRequest,
    envelope_profile,
    generation_dims,
    profiles_for_generation,
    profiles_for_manifest,
    request_with_defaults,
)

__all__ = [
    "EngineOptionError",
    "ProfileRequest",
    "envelope_profile",
    "generation_dims",
    "profiles_for_generation",
    "profiles_for_manifest",
    "request_with_defaults",
]
