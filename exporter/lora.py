"""PEFT LoRA adapters merged into the weights at export (``glm-export onnx --lora DIR [--lora DIR2] --lora-scale S``).

Where this stands in the flow: ``exporter.onnx_export`` wraps the canonical weight stream of
``exporter.weights.load_canonical_weights`` with :func:`merge_adapters`, so each weight gets ``W += scale * B @ A``
as it streams past, once, before the model is built; the manifest records every adapter with its checksums.

An adapter directory is what PEFT's ``save_pretrained`` writes: ``adapter_config.json`` (``peft_type`` LORA, ``r``,
``lora_alpha``, ``target_modules``, ``fan_in_fan_out``, ``use_rslora``, ``rank_pattern``/``alpha_pattern``) and
``adapter_model.safetensors`` or ``adapter_model.bin`` with ``base_model.model.<module>.lora_A.weight`` (r, in) and
``lora_B.weight`` (out, r). Module names of either layout map onto our canonical linears:

| adapter module | canonical rows |
|---|---|
| ``self_attention.query_key_value`` (THUDM) | ``qkv`` all rows |
| ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` (hf) | ``qkv`` rows of Q heads / K groups / V groups |
| ``self_attention.dense`` / ``self_attn.o_proj`` | ``attn_out`` |
| ``mlp.dense_h_to_4h`` / ``mlp.gate_up_proj`` | ``gate_up`` |
| ``mlp.dense_4h_to_h`` / ``mlp.down_proj`` | ``down`` |

Scale per adapter: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) times ``--lora-scale``. ``fan_in_fan_out``:
every ChatGLM target is an ``nn.Linear``, for which PEFT itself resets the flag to false (its Conv1D layout does not
exist here), so A and B are read as (r, in) / (out, r) either way; shapes are checked, so an adapter stored the
other way round is refused. Hand-written because PEFT needs the transformers model class in memory (and THUDM's
remote code for THUDM-layout bases); this reads the same files with safetensors/torch only.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Tuple

from runtime.errors import ConfigError, WeightsError, read_json_object
from runtime.manifest import sha256_of
from runtime.spec import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# adapter module path (after the layer index) -> (canonical linear, which rows: "all", "q", "k", "v")
MODULES = {
    "self_attention.query_key_value": ("qkv", "all"),
    "self_attn.q_proj": ("qkv", "q"),
    "self_attn.k_proj": ("qkv", "k"),
    "self_attn.v_proj": ("qkv", "v"),
    "self_attention.dense": ("attn_out", "all"),
    "self_attn.o_proj": ("attn_out", "all"),
    "mlp.dense_h_to_4h": ("gate_up", "all"),
    "mlp.gate_up_proj": ("gate_up", "all"),
    "mlp.dense_4h_to_h": ("down", "all"),
    "mlp.down_proj": ("down", "all"),
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.encoder\.layers|model\.layers|layers)\.(\d+)\."
                  r"(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass
class LoraPair:
    layer: int
    module: str  # adapter module path, e.g. "self_attn.q_proj"
    a: Any = None  # (r, in)
    b: Any = None  # (out, r)


@dataclass
class Adapter:
    path: str
    r: int
    alpha: float
    scale: float  # alpha / r (or / sqrt(r)) times the user's --lora-scale
    target_modules: List[str]
    fan_in_fan_out: bool
    weights_file: str
    pairs: List[LoraPair] = field(default_factory=list)

    def record(self) -> Dict[str, Any]:
        files = [ADAPTER_CONFIG, self.weights_file]
        return {
            "path": os.path.abspath(self.path),
            "r": self.r,
            "lora_alpha": self.alpha,
            "scale": self.scale,
            "target_modules": self.target_modules,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_merged": len(self.pairs),
            "files": {name: {"sha256": sha256_of(os.path.join(self.path, name)),
                             "bytes": os.path.getsize(os.path.join(self.path, name))} for name in files},
        }


def _read_tensors(path: str) -> Dict[str, Any]:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"{path}: not loadable as a weights-only torch file ({str(e).splitlines()[0]})") from None


def read_adapter(path: str, user_scale: float = 1.0) -> Adapter:
    """An adapter directory -> Adapter with its A/B pairs; refuses what cannot be merged as plain LoRA."""
    if not os.path.isdir(path):
        raise ConfigError(f"--lora {path}: not a directory (expected a PEFT adapter directory with {ADAPTER_CONFIG})")
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"--lora {path}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter directory)")
    cfg = read_json_object(cfg_path, ConfigError)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                     ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                     ("layer_replication", "layer replication")):
        if cfg.get(key):
            raise ConfigError(f"{cfg_path}: field '{key}' ({why}) is not supported for merging")
    if cfg.get("bias", "none") != "none":
        raise ConfigError(f"{cfg_path}: field 'bias' = {cfg.get('bias')!r} is not supported (expected 'none')")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{cfg_path}: field 'r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"{cfg_path}: field 'lora_alpha' must be a number, got {alpha!r}")
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    weights_file = next((f for f in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(path, f))), None)
    if weights_file is None:
        raise WeightsError(f"--lora {path}: no {' or '.join(ADAPTER_WEIGHTS)}")
    scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r) * float(user_scale)
    adapter = Adapter(path, r, float(alpha), scale, targets, bool(cfg.get("fan_in_fan_out", False)), weights_file)
    pairs: Dict[Tuple[int, str], LoraPair] = {}
    where = os.path.join(path, weights_file)
    for key, tensor in _read_tensors(where).items():
        m = _KEY.match(key)
        if m is None:
            raise WeightsError(f"{where}: tensor '{key}' is not a LoRA A/B weight of a ChatGLM layer")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in MODULES:
            known = ", ".join(sorted({k.split(".")[-1] for k in MODULES}))
            raise WeightsError(f"{where}: module '{module}' (tensor '{key}') is not a ChatGLM linear "
                               f"(known target modules: {known}); is the adapter for another model?")
        pair = pairs.setdefault((layer, module), LoraPair(layer, module))
        setattr(pair, ab.lower(), tensor.float())
    for pair in pairs.values():
        if pair.a is None or pair.b is None:
            raise WeightsError(f"{where}: layer {pair.layer} module '{pair.module}' has only lora_"
                               f"{'B' if pair.a is None else 'A'}")
    adapter.pairs = sorted(pairs.values(), key=lambda p: (p.layer, p.module))
    if not adapter.pairs:
        raise WeightsError(f"{where}: no LoRA weights")
    return adapter


def _rows(spec: ModelSpec, part: str) -> Tuple[int, int]:
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[part]


def check_adapters(spec: ModelSpec, shapes: Dict[str, Tuple[int, ...]], adapters: Iterable[Adapter]) -> None:
    """Refuse, naming the module, any pair whose layer, rank or shapes do not fit the base model."""
    for adapter in adapters:
        where = os.path.join(adapter.path, adapter.weights_file)
        for p in adapter.pairs:
            canonical, part = MODULES[p.module]
            name = f"layers.{p.layer}.{canonical}.weight"
            if name not in shapes:
                raise WeightsError(f"{where}: module 'layers.{p.layer}.{p.module}' does not exist in the base "
                                   f"model ({spec.num_layers} layers)")
            out_rows, in_features = shapes[name]
            if part != "all":
                lo, hi = _rows(spec, part)
                out_rows = hi - lo
            a, b = tuple(p.a.shape), tuple(p.b.shape)
            if a != (adapter.r, in_features) or b != (out_rows, adapter.r):
                raise WeightsError(
                    f"{where}: module 'layers.{p.layer}.{p.module}' has lora_A {a} and lora_B {b}; the base model "
                    f"needs ({adapter.r}, {in_features}) and ({out_rows}, {adapter.r}) (r = {adapter.r}); is the "
                    "adapter for another model?")


def merge_adapters(stream: Iterator[Tuple[str, Any]], spec: ModelSpec,
                   adapters: List[Adapter]) -> Iterator[Tuple[str, Any]]:
    """Pass (canonical name, tensor) through, adding every adapter's ``scale * B @ A`` to the weights it targets."""
    import torch

    by_name: Dict[str, List[Tuple[Adapter, LoraPair]]] = {}
    for adapter in adapters:
        for p in adapter.pairs:
            by_name.setdefault(f"layers.{p.layer}.{MODULES[p.module][0]}.weight", []).append((adapter, p))
    for name, tensor in stream:
        for adapter, p in by_name.get(name, []):
            delta = (p.b @ p.a) * adapter.scale  # (out rows, in) in float32
            merged = tensor.float().clone() if tensor.dtype != torch.float32 else tensor.clone()
            part = MODULES[p.module][1]
            lo, hi = (0, merged.shape[0]) if part == "all" else _rows(spec, part)
            merged[lo:hi] += delta
            tensor = merged.to(tensor.dtype)
        yield name, tensor


def read_adapters(paths: Iterable[str], user_scale: float = 1.0) -> List[Adapter]:
    return [read_adapter(p, user_scale) for p in paths]

