"""Checkpoint weights -> our canonical state dict, for both layouts, without running checkpoint code.

Renames are data: one table per layout maps each canonical name (our ``GlmForExport`` parameter) to the checkpoint
key(s) it comes from, with ``{i}`` for the layer. Several keys are concatenated along dim 0 (transformers' split
q/k/v become our fused qkv, ordered [Q heads | K groups | V groups] exactly like THUDM's query_key_value).
After loading, every checkpoint key has been used exactly once and every shape checked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from runtime.errors import ConfigError, WeightsError, first_line, read_json_object
from runtime.progress import NullProgress
from runtime.spec import ModelSpec

from runtime.spec import ACT_SWIGLU, NORM_LAYER

from exporter.config import LAYOUT_GLM, LAYOUT_GLM4, LAYOUT_THUDM, LAYOUT_THUDM_V1

# canonical name -> checkpoint key templates (concatenated along dim 0 when several)
_THUDM_LAYER = {
    "input_norm.weight": ["transformer.encoder.layers.{i}.input_layernorm.weight"],
    "qkv.weight": ["transformer.encoder.layers.{i}.self_attention.query_key_value.weight"],
    "qkv.bias": ["transformer.encoder.layers.{i}.self_attention.query_key_value.bias"],
    "attn_out.weight": ["transformer.encoder.layers.{i}.self_attention.dense.weight"],
    "post_attn_norm.weight": ["transformer.encoder.layers.{i}.post_attention_layernorm.weight"],
    "gate_up.weight": ["transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight"],
    "down.weight": ["transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight"],
}
_THUDM_GLOBAL = {
    "embed.weight": ["transformer.embedding.word_embeddings.weight"],
    "final_norm.weight": ["transformer.encoder.final_layernorm.weight"],
    "lm_head.weight": ["transformer.output_layer.weight"],
}
# checkpoint keys that carry no information we need (recomputed buffers)
_THUDM_SKIPPED = ("transformer.rotary_pos_emb.inv_freq",)

# ChatGLM-6B (v1): every linear has a bias, the norms are LayerNorms (weight + bias), dense_h_to_4h is one GELU
# projection ("up"), query_key_value stays in its per-head [q_h | k_h | v_h] row order (exporter/model_v1.py splits
# it per head), and lm_head is the embedding (tied) unless the config unties it.
_V1_LAYER = {
    f"{ours}.{part}": [f"transformer.layers.{{i}}.{theirs}.{part}"]
    for ours, theirs in (
        ("input_norm", "input_layernorm"),
        ("qkv", "attention.query_key_value"),
        ("attn_out", "attention.dense"),
        ("post_attn_norm", "post_attention_layernorm"),
        ("up", "mlp.dense_h_to_4h"),
        ("down", "mlp.dense_4h_to_h"),
    )
    for part in ("weight", "bias")
}
_V1_GLOBAL = {
    "embed.weight": ["transformer.word_embeddings.weight"],
    "final_norm.weight": ["transformer.final_layernorm.weight"],
    "final_norm.bias": ["transformer.final_layernorm.bias"],
    "lm_head.weight": ["lm_head.weight"],
}
# THUDM's v1 saves each layer's rotary inv_freq buffer (recomputed here); a tied checkpoint may still carry lm_head
_V1_SKIPPED_LAYER = ("transformer.layers.{i}.attention.rotary_emb.inv_freq",)

_HF_LAYER = {
    "input_norm.weight": ["model.layers.{i}.input_layernorm.weight"],
    "qkv.weight": [
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ],
    "qkv.bias": [
        "model.layers.{i}.self_attn.q_proj.bias",
        "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.bias",
    ],
    "attn_out.weight": ["model.layers.{i}.self_attn.o_proj.weight"],
    "post_attn_norm.weight": ["model.layers.{i}.post_attention_layernorm.weight"],
    "gate_up.weight": ["model.layers.{i}.mlp.gate_up_proj.weight"],
    "down.weight": ["model.layers.{i}.mlp.down_proj.weight"],
}
_GLM4_SANDWICH = {
    "post_self_attn_norm.weight": ["model.layers.{i}.post_self_attn_layernorm.weight"],
    "post_mlp_norm.weight": ["model.layers.{i}.post_mlp_layernorm.weight"],
}
_HF_GLOBAL = {
    "embed.weight": ["model.embed_tokens.weight"],
    "final_norm.weight": ["model.norm.weight"],
    "lm_head.weight": ["lm_head.weight"],
}
_HF_SKIPPED = ("model.rotary_emb.inv_freq",)


def canonical_shapes(spec: ModelSpec) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of GlmForExport with its shape."""
    h, d = spec.hidden_size, spec.head_dim
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * d
    up = ("gate_up", 2 * spec.ffn_hidden_size) if spec.activation == ACT_SWIGLU else ("up", spec.ffn_hidden_size)
    layer = {
        "input_norm.weight": (h,),
        "qkv.weight": (qkv, h),
        "attn_out.weight": (h, spec.num_heads * d),
        "post_attn_norm.weight": (h,),
        f"{up[0]}.weight": (up[1], h),
        "down.weight": (h, spec.ffn_hidden_size),
    }
    if spec.qkv_bias:
        layer["qkv.bias"] = (qkv,)
    if spec.linear_bias:
        layer.update({"attn_out.bias": (h,), f"{up[0]}.bias": (up[1],), "down.bias": (h,)})
    if spec.norm_kind == NORM_LAYER:
        layer.update({"input_norm.bias": (h,), "post_attn_norm.bias": (h,)})
    if spec.sandwich_norms:
        layer["post_self_attn_norm.weight"] = (h,)
        layer["post_mlp_norm.weight"] = (h,)
    shapes = {"embed.weight": (spec.vocab_size, h), "final_norm.weight": (h,)}
    if spec.norm_kind == NORM_LAYER:
        shapes["final_norm.bias"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        for name, shape in layer.items():
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


def name_table(spec: ModelSpec, layout: str) -> Dict[str, List[str]]:
    """canonical name -> checkpoint keys, for this spec and layout."""
    if layout == LAYOUT_THUDM:
        per_layer, glob = dict(_THUDM_LAYER), _THUDM_GLOBAL
    elif layout == LAYOUT_THUDM_V1:
        per_layer, glob = dict(_V1_LAYER), _V1_GLOBAL
    elif layout in (LAYOUT_GLM, LAYOUT_GLM4):
        per_layer, glob = dict(_HF_LAYER), _HF_GLOBAL
        if layout == LAYOUT_GLM4:
            per_layer.update(_GLM4_SANDWICH)
    else:
        raise ConfigError(f"unknown checkpoint layout {layout!r}; expected {LAYOUT_THUDM!r}, {LAYOUT_GLM!r} or {LAYOUT_GLM4!r}")
    wanted = canonical_shapes(spec)
    table = {}
    for name in wanted:
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            table[name] = [t.format(i=i) for t in per_layer[rest]]
        else:
            table[name] = list(glob[name])
    return table


def part_shapes(spec: ModelSpec, shape: Tuple[int, ...], n_parts: int) -> List[Tuple[int, ...]]:
    """Shapes of the checkpoint tensors concatenated into one canonical tensor: q/k/v rows split as
    [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]."""
    if n_parts == 1:
        return [shape]
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return [(rows,) + tuple(shape[1:]) for rows in (q, kv, kv)]


def skipped_keys(layout: str, spec: "ModelSpec | None" = None) -> Tuple[str, ...]:
    """Checkpoint keys that may be present and are not read (recomputed buffers; a tied model's lm_head)."""
    if layout == LAYOUT_THUDM_V1:
        layers = spec.num_layers if spec is not None else 0
        tied = ("lm_head.weight",) if spec is not None and spec.tie_word_embeddings else ()
        return tuple(t.format(i=i) for t in _V1_SKIPPED_LAYER for i in range(layers)) + tied
    return _THUDM_SKIPPED if layout == LAYOUT_THUDM else _HF_SKIPPED


# ---------------------------------------------------------------------------------------------------------------
# reading tensors from the checkpoint files


@dataclass
class WeightFiles:
    """The weight files of a checkpoint and which key lives in which file."""

    kind: str  # "safetensors" or "bin"
    key_to_file: Dict[str, str]

    @property
    def files(self) -> List[str]:
        return sorted(set(self.key_to_file.values()))


def find_weight_files(ckpt_dir: str) -> WeightFiles:
    """Locate the weights: model.safetensors, a sharded safetensors index, or pytorch_model*.bin (+ index)."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        index_path = os.path.join(ckpt_dir, index)
        if os.path.isfile(index_path):
            weight_map = read_json_object(index_path, WeightsError, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise WeightsError(f"{index_path}: field 'weight_map' = {weight_map!r:.60} is invalid; expected an "
                                   "object of weight name -> shard file name")
            key_to_file = {k: checkpoint_member(ckpt_dir, v, index_path) for k, v in weight_map.items()}
            for path in set(key_to_file.values()):
                if not os.path.isfile(path):
                    raise WeightsError(f"{path}: listed in {index} but missing")
            return WeightFiles(kind, key_to_file)
        single_path = os.path.join(ckpt_dir, single)
        if os.path.isfile(single_path):
            return WeightFiles(kind, {k: single_path for k in _keys_of(kind, single_path)})
    # unindexed shards, as some THUDM uploads have
    shards = sorted(f for f in os.listdir(ckpt_dir) if f.startswith("pytorch_model-") and f.endswith(".bin"))
    if shards:
        key_to_file = {}
        for s in shards:
            p = os.path.join(ckpt_dir, s)
            key_to_file.update({k: p for k in _keys_of("bin", p)})
        return WeightFiles("bin", key_to_file)
    raise WeightsError(
        f"{ckpt_dir}: no weights found (expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json)"
    )


def checkpoint_member(ckpt_dir: str, name: str, where: str) -> str:
    """The path of file ``name`` an index lists, which must be a plain name staying inside the checkpoint."""
    root = os.path.realpath(ckpt_dir)
    real = os.path.realpath(os.path.join(ckpt_dir, name))
    if not name or os.path.isabs(name) or "\0" in name or not real.startswith(root.rstrip(os.sep) + os.sep):
        raise WeightsError(f"{where}: shard file {name!r:.80} is not a file inside the checkpoint directory")
    return os.path.join(ckpt_dir, name)


def _keys_of(kind: str, path: str) -> List[str]:
    if kind == "safetensors":
        return list(_open_safetensors(path).keys())
    return list(_load_bin(path).keys())


_BIN_CACHE: Dict[str, Dict[str, object]] = {}


def _open_safetensors(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")  # memory-mapped; tensors are read on demand
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e}); is it truncated?") from None


def _load_bin(path: str):
    """A pytorch_model*.bin, loaded with weights_only=True (no pickled code runs) and memory-mapped."""
    import pickle

    import torch

    if path not in _BIN_CACHE:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
            raise WeightsError(f"{path}: not loadable as weights-only torch file ({first_line(e)})") from None
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise WeightsError(f"{path}: holds a {type(state).__name__}, expected a state dict of weight name -> "
                               "tensor")
        _BIN_CACHE[path] = state
    return _BIN_CACHE[path]


class TensorSource:
    """Reads named tensors from a checkpoint's files, one at a time."""

    def __init__(self, files: WeightFiles):
        self.files = files
        self._handles: Dict[str, object] = {}

    def get(self, key: str):
        path = self.files.key_to_file[key]
        if self.files.kind == "safetensors":
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = _open_safetensors(path)
            try:
                return handle.get_tensor(key)
            except Exception as e:  # safetensors raises its own error types for short reads
                raise WeightsError(f"{path}: cannot read tensor '{key}' ({e}); is the file truncated?") from None
        return _load_bin(path)[key]

    def close(self) -> None:
        self._handles.clear()
        for path in set(self.files.key_to_file.values()):
            _BIN_CACHE.pop(path, None)


def load_canonical_weights(
    ckpt_dir: str, spec: ModelSpec, layout: str, dtype=None, progress=None,
    reader: Optional[Callable[[TensorSource, str], "object"]] = None, claimed: Iterable[str] = (),
) -> Iterator[Tuple[str, "object"]]:
    """Yield (canonical name, tensor) for every parameter, checking names and shapes as it goes.

    Tensors are read lazily from memory-mapped files and converted to ``dtype`` one at a time, so the caller can
    place each into the model without the checkpoint ever being held twice. ``reader(source, key)`` replaces the
    plain read of a key (THUDM's quantized checkpoints dequantize there); ``claimed`` are checkpoint keys another
    stage reads (the P-tuning prefix encoder, quantization scales), so they are not "unexpected".
    """
    import torch

    progress = progress or NullProgress()
    files = find_weight_files(ckpt_dir)
    table = name_table(spec, layout)
    shapes = canonical_shapes(spec)
    available = set(files.key_to_file)
    for name, keys in table.items():
        for key in keys:
            if key not in available:
                raise WeightsError(f"{ckpt_dir}: weight '{key}' is missing (needed for {name})")
    expected_keys = {k for keys in table.values() for k in keys}
    extra = sorted(available - expected_keys - set(skipped_keys(layout, spec)) - set(claimed))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"{ckpt_dir}: unexpected weight '{extra[0]}'{more} does not belong to this model")
    source = TensorSource(files)
    try:
        for name in progress.iterate(list(table), total=len(table), desc="loading weights"):
            parts = []
            for key, want in zip(table[name], part_shapes(spec, shapes[name], len(table[name]))):
                t = reader(source, key) if reader is not None else source.get(key)
                if tuple(t.shape) != want:
                    raise WeightsError(f"{ckpt_dir}: weight '{key}' has shape {tuple(t.shape)}, expected {want}")
                parts.append(t)
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if dtype is not None and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            yield name, tensor
    finally:
        source.close()
