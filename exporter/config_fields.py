"""Typed reads of checkpoint config.json fields: one-line ConfigErrors naming the file, field, value and expectation.

``exporter.config`` reads every field through these, so ``kv_channels: "32"``, ``seq_length: NaN`` or
``layernorm_epsilon: "abc"`` are refused where they are read, naming the field, instead of failing later (or, for
NaN, passing into the graph and failing verification with "differs beyond nan").
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

from runtime.errors import ConfigError

MAX_SIZE = 1 << 24  # no published dimension, layer count or vocabulary comes near 16 M
MAX_CONTEXT = 1 << 26


def _bad(where: str, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where}: field '{key}' = {value!r:.60} is invalid; expected {expected}")


def int_field(cfg: Mapping[str, Any], key: str, where: str, default: Optional[int] = None, minimum: int = 1,
              maximum: int = MAX_SIZE, required: bool = False) -> Optional[int]:
    """An integer field (a float holding a whole number is accepted, as JSON writers produce 32.0)."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}: field '{key}' is missing")
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, key, value, f"a whole number from {minimum} to {maximum}")
    if not minimum <= value <= maximum:
        raise _bad(where, key, value, f"a whole number from {minimum} to {maximum}")
    return value


def float_field(cfg: Mapping[str, Any], key: str, where: str, default: float, positive: bool = True) -> float:
    """A finite number (> 0 when ``positive``)."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise _bad(where, key, value, "a finite number" + (" > 0" if positive else ""))
    return float(value)


def _typed_field(cfg: Mapping[str, Any], key: str, where: str, default: Any, kind: type, expected: str) -> Any:
    """The value of ``key`` when it is a ``kind`` (``default`` when absent or null); else the one-line error."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise _bad(where, key, value, expected)
    return value


def bool_field(cfg: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    return bool(_typed_field(cfg, key, where, default, bool, "true or false"))


def dict_field(cfg: Mapping[str, Any], key: str, where: str) -> Dict[str, Any]:
    return dict(_typed_field(cfg, key, where, {}, dict, "an object"))


def str_field(cfg: Mapping[str, Any], key: str, where: str, default: str) -> str:
    return str(_typed_field(cfg, key, where, default, str, "a string"))
