"""What checking a bundle's sha256 checksums at load costs, on the 288 M-parameter mid-size bundle (1.15 GB).

    python bench/verify_cost.py [--workdir DIR] [--rounds 5]

Makes the bundle once (``glm-export tiny --size mid --generation glm4``, then ``glm-export onnx --no-verify``),
then times ``GlmModel.load`` + ``close`` three ways, interleaved round after round: "cold" (no verified stamp:
every file hashed), "warm" (the stamp from the previous load: files stat'ed only) and "none"
(``verify_files=False``). Prints one JSON line with the medians and the ratios to "none". "Cold" means unhashed,
not an empty page cache: the files are in memory after the export, so the figure is hashing speed, not disk speed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import common_args, interleaved_medians  # noqa: E402


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "exporter.cli", *args], check=True)


def main() -> None:
    parser = common_args(__doc__.splitlines()[0])
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-verify-")
    ckpt, bundle = os.path.join(work, "mid-ckpt"), os.path.join(work, "mid-bundle")
    if not os.path.isdir(ckpt):
        _cli("tiny", "--size", "mid", "--generation", "glm4", "--out", ckpt)
    if not os.path.isdir(bundle):
        _cli("onnx", "--model", ckpt, "--out", bundle, "--no-verify", "--quiet")

    from runtime import GlmModel
    from runtime.integrity import STAMP_NAME, _cache_stamp_path

    def forget_stamp() -> None:
        for path in (os.path.join(bundle, STAMP_NAME), _cache_stamp_path(bundle)):
            if os.path.exists(path):
                os.unlink(path)

    def load(verify: bool) -> float:
        start = time.perf_counter()
        with GlmModel.load(bundle, threads=args.threads, verify_files=verify):
            pass
        return time.perf_counter() - start

    def cold():
        forget_stamp()
        return {"s": load(True)}

    measures = {"cold": cold, "warm": lambda: {"s": load(True)}, "none": lambda: {"s": load(False)}}
    load(True)  # warm the page cache and onnxruntime once
    medians = interleaved_medians(measures, args.rounds)

    # the bundle check alone (manifest, names, graph references, checksums), without onnxruntime's session
    from runtime.manifest import read_manifest

    def check(verify: bool, forget: bool = False) -> float:
        if forget:
            forget_stamp()
        start = time.perf_counter()
        read_manifest(bundle, verify_files=verify)
        return time.perf_counter() - start

    checks = interleaved_medians({"cold": lambda: {"s": check(True, forget=True)},
                                  "warm": lambda: {"s": check(True)},
                                  "none": lambda: {"s": check(False)}}, args.rounds * 4)
    size = sum(os.path.getsize(os.path.join(bundle, f)) for f in os.listdir(bundle) if not f.startswith("."))
    none = medians["none"]["s"]
    print(json.dumps({
        "bundle_bytes": size,
        "rounds": args.rounds,
        "load_s": {k: round(v["s"], 3) for k, v in medians.items()},
        "cold_vs_none": round(medians["cold"]["s"] / none, 2),
        "warm_vs_none": round(medians["warm"]["s"] / none, 3),
        "hash_gb_per_s": round(size / 1e9 / max(checks["cold"]["s"] - checks["none"]["s"], 1e-9), 2),
        "check_ms": {k: round(v["s"] * 1000, 1) for k, v in checks.items()},
        "check_cold_vs_load_none": round(checks["cold"]["s"] / none, 3),
        "check_warm_minus_none_ms": round((checks["warm"]["s"] - checks["none"]["s"]) * 1000, 1),
    }))


if __name__ == "__main__":
    main()
