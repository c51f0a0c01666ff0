"""Export the 288 M-parameter mid-size model and report time, peak RSS and bundle size.

    python bench/export_mid.py [--workdir DIR]

Writes a bf16 `glm-export tiny --size mid` checkpoint (as published checkpoints are half precision), exports it
with verification in a child process, and prints one JSON line: seconds, peak RSS, fp32 weight bytes, the ratio,
bundle bytes and the max difference against PyTorch. The peak is the export child's own ru_maxrss (os.wait4);
the checkpoint is written by another child, so the parent stays small and the fork does not inflate the figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-bench-")
    ckpt, bundle = os.path.join(work, "mid-ckpt"), os.path.join(work, "mid-bundle")
    if not os.path.isdir(ckpt):
        code = "from exporter.tiny.checkpoint import write_tiny_checkpoint as w; w(%r, size='mid', dtype='bfloat16')" % ckpt
        subprocess.run([sys.executable, "-c", code], check=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", "onnx", "--model", ckpt, "--out", bundle, "--overwrite", "--json"],
            stdout=out, stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit("export failed: " + text.strip())
    result = json.loads(text.strip().splitlines()[-1])
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    weights = result["params"] * 4
    print(json.dumps({
        "seconds": round(seconds, 1),
        "peak_rss_bytes": peak,
        "fp32_weight_bytes": weights,
        "peak_over_weights": round(peak / weights, 2),
        "bundle_bytes": sum(result["file_bytes"].values()),
        "max_abs_diff": max(result["max_abs_diff"].values()),
    }))


if __name__ == "__main__":
    main()
