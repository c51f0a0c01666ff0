"""Writing a Triton model repository that serves a bundle (``glm-export triton``).

Route: Triton's Python backend in decoupled mode, wrapping ``runtime.serve.scheduler``
(``runtime.serve.triton.model``): continuous batching, per-request sampling state and streaming work inside Triton as they do in ``glm-export serve``,
and Triton adds its HTTP/gRPC front ends, metrics, model management and replicas across machines. Not chosen: the
onnxruntime backend with the sequence batcher's implicit state. Our graph's Concat cache grows every step, so the
client (or an ensemble) would have to drive every decode step as one Triton request, choose the tokens and keep the
attention mask and position ids itself; rows of one batch must have the same past length, so a joining sequence
would have to wait for a new batch. That route fits a fixed-size, in-place KV buffer (the GroupQueryAttention graph
of issue 10) better than this one.

Layout (``max_batch_size: 0``: Triton does not batch requests itself; the model's own scheduler does)::

    REPO/NAME/config.pbtxt
    REPO/NAME/1/model.py           imports runtime.serve.triton.model (glm-export must be installed in the image)
    REPO/NAME/1/bundle/            a copy of the bundle (manifest.json and every file it lists)
"""
from __future__ import annotations

import os
import shutil
from typing import List

from runtime.errors import BundleError
from runtime.manifest import read_manifest

MANIFEST = "manifest.json"
BUNDLE_DIR = "bundle"
VERSION = "1"

MODEL_PY = '''"""Triton Python-backend entry point (written by glm-export triton); the model is in glm-export."""
from runtime.serve.triton.model import TritonPythonModel  # noqa: F401
'''

# (name, Triton type, optional); every input is one element ([1]); strings are UTF-8 bytes
INPUTS = (
    ("text_input", "TYPE_STRING", False),  # the prompt, or with chat=true the user's message
    ("system", "TYPE_STRING", True),  # chat: a system message
    ("chat", "TYPE_BOOL", True),  # wrap text_input in the model's chat format [default: true when it has one]
    ("max_tokens", "TYPE_INT32", True),
    ("temperature", "TYPE_FP32", True),  # 0 or absent: greedy
    ("top_p", "TYPE_FP32", True),
    ("top_k", "TYPE_INT32", True),
    ("seed", "TYPE_UINT64", True),
    ("stream", "TYPE_BOOL", True),  # one response per piece of text instead of one at the end
)
OUTPUTS = (("text_output", "TYPE_STRING"), ("finish_reason", "TYPE_STRING"))


def config_pbtxt(name: str, max_batch: int, instances: int = 1, max_queue: int = 64,
                 prefix_cache_mb: int = 256) -> str:
    """The model's config.pbtxt (protobuf text of Triton's ModelConfig)."""
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy {", "  decoupled: true", "}", "input ["]
    for i, (inp, dtype, optional) in enumerate(INPUTS):
        sep = "," if i < len(INPUTS) - 1 else ""
        opt = " optional: true" if optional else ""
        lines.append(f'  {{ name: "{inp}" data_type: {dtype} dims: [ 1 ]{opt} }}{sep}')
    lines += ["]", "output ["]
    for i, (out, dtype) in enumerate(OUTPUTS):
        sep = "," if i < len(OUTPUTS) - 1 else ""
        lines.append(f'  {{ name: "{out}" data_type: {dtype} dims: [ 1 ] }}{sep}')
    lines += ["]", f"instance_group [ {{ count: {int(instances)} kind: KIND_CPU }} ]"]
    params = {"bundle": BUNDLE_DIR, "max_batch": str(int(max_batch)), "max_queue": str(int(max_queue)),
              "prefix_cache_mb": str(int(prefix_cache_mb))}
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def _bundle_files(bundle_dir: str) -> List[str]:
    manifest = read_manifest(bundle_dir, check_files=True)
    names = [MANIFEST]
    for name in manifest.files:
        parts = name.replace("\\", "/").split("/")
        if os.path.isabs(name) or ".." in parts or name != os.path.basename(name):
            raise BundleError(f"{os.path.join(bundle_dir, MANIFEST)}: file entry {name!r} is not a plain file name "
                              "inside the bundle")
        names.append(name)
    return names


def write_repository(bundle_dir: str, repo_dir: str, name: str = "glm", max_batch: int = 8,
                     instances: int = 1) -> List[str]:
    """Write the repository into ``repo_dir`` (an empty directory: the CLI stages it); returns the paths written,
    relative to it."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise BundleError(f"--name {name!r}: a model name is one path component")
    files = _bundle_files(bundle_dir)
    model_dir = os.path.join(repo_dir, name)
    version_dir = os.path.join(model_dir, VERSION)
    target = os.path.join(version_dir, BUNDLE_DIR)
    os.makedirs(target)
    written = []
    with open(os.path.join(model_dir, "config.pbtxt"), "w", encoding="utf-8") as f:
        f.write(config_pbtxt(name, max_batch, instances))
    written.append(f"{name}/config.pbtxt")
    with open(os.path.join(version_dir, "model.py"), "w", encoding="utf-8") as f:
        f.write(MODEL_PY)
    written.append(f"{name}/{VERSION}/model.py")
    for fname in files:
        shutil.copyfile(os.path.join(bundle_dir, fname), os.path.join(target, fname))
    written.append(f"{name}/{VERSION}/{BUNDLE_DIR}/ ({len(files)} files)")
    return written
