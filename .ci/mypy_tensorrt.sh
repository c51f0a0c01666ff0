#!/usr/bin/env bash
# Type-check the TensorRT-facing code against TensorRT 10's Python API, without TensorRT installed.
#
# Installs, pinned and into its own directory (reused when the pins match): mypy and numpy in a venv, and
# tensorrt-stubs with --no-deps (its declared dependency is the real TensorRT bindings). The stubs are copied and
# patched (.ci/patch_trt_stubs.py: a parameter named `in`, a non-default parameter after default ones, and the
# untyped tensorrt_libs import), then mypy runs with MYPYPATH on the patched copy. cuda-python has no stubs: it is
# treated as Any (see .ci/mypy_tensorrt.ini). Idempotent; needs python3 with venv and pip access to PyPI.
#
#   bash .ci/mypy_tensorrt.sh            # GLM_MYPY_TRT_DIR=... to choose the tool directory
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MYPY_VERSION=1.14.1          # the newest mypy line that still type-checks for Python 3.8 (the runtime's floor)
NUMPY_VERSION=2.2.6
STUBS_VERSION=10.13.0.35.1   # tensorrt-stubs: TensorRT 10.13's API
PYTHON="${PYTHON:-python3}"
TOOLS="${GLM_MYPY_TRT_DIR:-${TMPDIR:-/tmp}/glm-export-mypy-trt}"
VENV="$TOOLS/venv"
SITE="$TOOLS/stubs-site-$STUBS_VERSION"
PATCHED="$TOOLS/stubs-patched"
PINS="mypy==$MYPY_VERSION numpy==$NUMPY_VERSION"

mkdir -p "$TOOLS"
if [ ! -x "$VENV/bin/mypy" ] || [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PINS
    echo "$PINS" > "$VENV/.pins"
fi
if [ ! -f "$SITE/.complete" ]; then
    rm -rf "$SITE"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$SITE" \
        "tensorrt-stubs==$STUBS_VERSION"
    touch "$SITE/.complete"
fi
"$VENV/bin/python" .ci/patch_trt_stubs.py "$SITE" "$PATCHED"

FILES=(
    exporter/tensorrt/build.py
    runtime/backends/tensorrt.py
    exporter/tensorrt/trtexec.py
    exporter/tensorrt/check.py
    runtime/tensorrt/engine_record.py
    runtime/tensorrt/profiles.py
    runtime/tensorrt/ep_options.py
    runtime/backends/onnxruntime.py
    runtime/api.py
)
MYPYPATH="$PATCHED" "$VENV/bin/mypy" --config-file .ci/mypy_tensorrt.ini --cache-dir "$TOOLS/mypy-cache" "${FILES[@]}"
