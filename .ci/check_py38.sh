#!/usr/bin/env bash
# The runtime's Python floor: every runtime/ file must parse and run on Python 3.8 (edge devices: JetPack 5 ships
# 3.8). vermin finds syntax, standard-library members and builtin generics newer than that.
set -euo pipefail
cd "$(dirname "$0")/.."
vermin_bin=$(command -v vermin || true)
if [ -z "$vermin_bin" ] && [ -x .venv/bin/vermin ]; then
    vermin_bin=.venv/bin/vermin
fi
if [ -z "$vermin_bin" ]; then
    echo "vermin is not installed: pip install vermin (it is in the 'test' extra)" >&2
    exit 2
fi
"$vermin_bin" -t=3.8- --no-tips --violations runtime/
