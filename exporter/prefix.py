"""P-tuning v2 checkpoints: the prefix encoder -> one fixed KV prefix for every layer, computed once at export.

Where this stands in the flow: ``exporter.onnx_export`` calls :func:`prefix_kv_from_checkpoint` when the spec has
``prefix_len``; the result goes into the model (``exporter.model.set_prefix_kv``) and so into the graph as the
initializers ``layers.{i}.prefix_key`` / ``prefix_value``, and its checksum into the manifest.

How THUDM's ChatGLM2/3 ``modeling_chatglm.py`` applies it (read, not copied; our own code below):
- ``transformer.prefix_encoder.embedding.weight`` is (pre_seq_len, layers * 2 * kv_heads * head_dim); with
  ``prefix_projection`` the rows go through Linear(kv_size, hidden) -> tanh -> Linear(hidden, kv_size)
  (``trans.0`` and ``trans.2``).
- Each row is viewed as (layers * 2, kv_heads, head_dim): entry 2i is layer i's key, 2i + 1 its value. The keys
  are used as they are (no rotary: they enter the cache already "rotated").
- The attention mask gets pre_seq_len ones in front; position ids do not count the prefix (the first real token is
  position 0; THUDM's stream_chat subtracts pre_seq_len from the cache length when it continues a conversation).

A P-tuning output directory holds only the prefix encoder (THUDM's ptuning scripts save ``pytorch_model.bin`` with
the ``transformer.prefix_encoder.*`` keys, and a config.json with ``pre_seq_len``/``prefix_projection``); ``--prefix
DIR`` reads it beside the base checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from runtime.errors import ConfigError, WeightsError, read_json_object
from runtime.spec import ModelSpec

PREFIX_KEY_STEM = "transformer.prefix_encoder."
EMBEDDING_KEY = PREFIX_KEY_STEM + "embedding.weight"
PROJECTION_KEYS = tuple(PREFIX_KEY_STEM + k for k in ("trans.0.weight", "trans.0.bias", "trans.2.weight",
                                                       "trans.2.bias"))


def prefix_keys(projection: bool) -> Tuple[str, ...]:
    """The checkpoint keys of the prefix encoder."""
    return (EMBEDDING_KEY,) + (PROJECTION_KEYS if projection else ())


def read_prefix_config(prefix_dir: str) -> Dict[str, Any]:
    """A P-tuning output directory's config.json: pre_seq_len and prefix_projection must be there."""
    path = os.path.join(prefix_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"--prefix {prefix_dir}: no config.json (a P-tuning output directory holds config.json "
                          "with pre_seq_len and the prefix encoder's weights)")
    cfg = read_json_object(path, ConfigError)
    if not isinstance(cfg.get("pre_seq_len"), int) or isinstance(cfg.get("pre_seq_len"), bool) \
            or cfg["pre_seq_len"] <= 0:
        raise ConfigError(f"{path}: field 'pre_seq_len' must be a positive integer for --prefix, "
                          f"got {cfg.get('pre_seq_len')!r}")
    return cfg


def _weights_of(directory: str):
    from exporter.weights import TensorSource, find_weight_files

    files = find_weight_files(directory)
    return files, TensorSource(files)


def prefix_kv_from_checkpoint(ckpt_dir: str, spec: ModelSpec, projection: bool,
                              prefix_dir: Optional[str] = None):
    """(layers, 2, kv_heads, prefix_len, head_dim) float32 torch tensor: every layer's fixed key/value prefix.

    The prefix encoder is read from ``prefix_dir`` when given, else from the checkpoint itself; a missing or
    misshapen tensor is a WeightsError naming the key.
    """
    where = prefix_dir or ckpt_dir
    files, source = _weights_of(where)
    try:
        tensors = {}
        for key in prefix_keys(projection):
            if key not in files.key_to_file:
                hint = "" if prefix_dir else " (pass the P-tuning output directory with --prefix DIR)"
                raise WeightsError(f"{where}: pre_seq_len is {spec.prefix_len} but weight '{key}' of the prefix "
                                   f"encoder is missing{hint}")
            tensors[key] = source.get(key).float()
    finally:
        source.close()
    return prefix_kv(spec, tensors, projection, where)


def expected_prefix_shapes(spec: ModelSpec, projection: bool) -> Dict[str, Tuple[int, ...]]:
    kv_size = spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim
    shapes = {EMBEDDING_KEY: (spec.prefix_len, kv_size)}
    if projection:
        h = spec.hidden_size
        shapes.update(dict(zip(PROJECTION_KEYS, [(h, kv_size), (h,), (kv_size, h), (kv_size,)])))
    return shapes


def prefix_kv(spec: ModelSpec, tensors: Dict[str, Any], projection: bool, where: str = "checkpoint"):
    """The prefix encoder's output for prefix tokens 0..pre_seq_len-1, as (layers, 2, kv_heads, prefix, head_dim)."""
    import torch

    for key, want in expected_prefix_shapes(spec, projection).items():
        got = tuple(tensors[key].shape)
        if got != want:
            raise WeightsError(f"{where}: weight '{key}' has shape {got}, expected {want} (pre_seq_len "
                               f"{spec.prefix_len}, {spec.num_layers} layers x 2 x {spec.num_kv_heads} kv heads x "
                               f"{spec.head_dim})")
    with torch.no_grad():
        rows = tensors[EMBEDDING_KEY].float()  # (P, L*2*KV*D): the embedding of prefix tokens 0..P-1
        if projection:
            w0, b0, w2, b2 = (tensors[k].float() for k in PROJECTION_KEYS)
            rows = torch.tanh(rows @ w0.t() + b0) @ w2.t() + b2  # (P, L*2*KV*D)
        s = spec
        kv = rows.reshape(s.prefix_len, s.num_layers * 2, s.num_kv_heads, s.head_dim)  # (P, L*2, KV, D)
        kv = kv.permute(1, 2, 0, 3)  # (L*2, KV, P, D)
        return kv.reshape(s.num_layers, 2, s.num_kv_heads, s.prefix_len, s.head_dim).contiguous()


def prefix_record(prefix_kv_tensor, projection: bool, prefix_dir: Optional[str]) -> Dict[str, Any]:
    """What the manifest says about the prefix: length, projection, source, and a checksum of its float32 bytes."""
    import hashlib

    data = prefix_kv_tensor.float().contiguous().numpy().tobytes()
    return {
        "pre_seq_len": int(prefix_kv_tensor.shape[3]),
        "prefix_projection": projection,
        "source": os.path.abspath(prefix_dir) if prefix_dir else "checkpoint",
        "initializers": "layers.{i}.prefix_key, layers.{i}.prefix_value (1, kv_heads, pre_seq_len, head_dim)",
        "sha256_float32": hashlib.sha256(data).hexdigest(),
        "positions": "not shifted by the prefix (the first real token is position 0)",
    }


def claimed_prefix_keys(ckpt_dir_keys: List[str]) -> List[str]:
    """Prefix-encoder keys present in a checkpoint (read by this module, not by the weight loader)."""
    return [k for k in ckpt_dir_keys if k.startswith(PREFIX_KEY_STEM)]
