"""Up-front checks that a checkpoint's config matches its weights and that the export fits in memory.

Run before any tensor or module is allocated: a config that says ``num_layers: 1000000`` is refused in
milliseconds (the layers its weight names hold, and the memory its parameter count needs), instead of dying with
MemoryError after a minute of building modules.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from runtime.errors import WeightsError
from runtime.spec import ModelSpec

# the export holds the weights about twice at its peak (1.8x the fp32 weight bytes measured on the 288M model)
PEAK_FACTOR = 2.0
_LAYER = re.compile(r"\blayers\.(\d+)\.")


def available_memory_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo lowered by a cgroup limit (``exporter.memory_plan.available_memory``), else
    free physical pages; None when unknown."""
    from exporter.memory_plan import available_memory

    found = available_memory()["available"]
    if found is not None:
        return found
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def layers_held(weight_files) -> int:
    """1 + the highest layer index in the checkpoint's weight names (0 when none names a layer)."""
    found = [int(m.group(1)) for m in map(_LAYER.search, weight_files.key_to_file) if m]
    return max(found) + 1 if found else 0


def check_layers_held(ckpt_dir: str, spec: ModelSpec, weight_files) -> None:
    """WeightsError when config.json describes more layers than the weights hold (every export checks it; the
    streaming export plans its memory itself, exporter.memory_plan)."""
    held = layers_held(weight_files)
    if spec.num_layers > held:
        raise WeightsError(f"{os.path.join(ckpt_dir, 'config.json')}: num_layers is {spec.num_layers} but the weight "
                           f"files hold {held} layers; the config does not belong to these weights")


def check_checkpoint_fits(ckpt_dir: str, spec: ModelSpec, weight_files, layout: str, bytes_per_param: int) -> None:
    """WeightsError when config.json describes more layers than the weights hold, or when the export would need
    more memory than is available (the weights' own names and shapes are checked one by one while loading)."""
    check_layers_held(ckpt_dir, spec, weight_files)
    wanted = spec.num_params
    need = int(wanted * bytes_per_param * PEAK_FACTOR)
    have = available_memory_bytes()
    if have is not None and need > have:
        raise WeightsError(f"{ckpt_dir}: exporting {wanted / 1e9:.2f} B parameters needs about {need / 2**30:.1f} GiB "
                           f"of memory, {have / 2**30:.1f} GiB is available")
