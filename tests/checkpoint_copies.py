"""Edited copies of a tiny checkpoint, as users' tools leave them (a P-tuning run, THUDM's quantizer): the config
updated and the safetensors rewritten by a function of the test's."""
from __future__ import annotations

import json
import shutil
from typing import Any, Callable, Dict


def edited_checkpoint(base, out, config_updates: Dict[str, Any], edit_tensors: Callable[[dict, dict], None]):
    """A copy of ``base`` at ``out`` (pathlib paths) with ``config_updates`` in its config.json and its tensors
    passed through ``edit_tensors(tensors, config)`` (which changes the dict in place) before they are saved."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    cfg = dict(json.loads((out / "config.json").read_text()), **config_updates)
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    edit_tensors(tensors, cfg)
    save_file(tensors, str(out / "model.safetensors"))
    return out
