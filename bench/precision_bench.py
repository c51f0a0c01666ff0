"""Bundle size and decode speed of every precision on the 288 M-parameter mid-size model, as ratios to fp32.

    python bench/precision_bench.py [--workdir DIR] [--rounds 3] [--threads 2] [--prompt-len 32] [--new-tokens 64]

Writes `glm-export tiny --size mid` (random weights), exports it to an fp32 bundle, converts that with
`glm-export quantize` to fp16, static INT8 (Q/DQ), dynamic INT8 and INT4, then measures each with `glm-export bench` (batch 1, greedy, --threads),
round after round with the bundles interleaved, and compares medians as ratios: this machine's absolute speed varies
with its neighbours, the ratios much less. Calibration and the accuracy record use the tiny trainer's generated
text; on random weights the accuracy figures are not meaningful (see docs/precision.md for the trained model's).
Prints a Markdown table and one JSON line. Bundles are kept in --workdir and reused on a second run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import common_args, interleaved_medians  # noqa: E402  (bench/, the script's directory)

VARIANTS = [  # name, quantize arguments (None: the fp32 export itself)
    ("fp32", None),
    ("fp16", ["--precision", "fp16"]),
    ("int8 static", ["--precision", "int8"]),
    ("int8 dynamic", ["--precision", "int8-dynamic"]),
    ("int4", ["--precision", "int4"]),
]


def _cli(*args, capture=False):
    cmd = [sys.executable, "-m", "exporter.cli"] + list(args)
    if capture:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        return json.loads(out.stdout.strip().splitlines()[-1])
    subprocess.run(cmd, check=True, cwd=ROOT)
    return None


def _graph_bytes(manifest) -> int:
    return sum(rec["bytes"] for name, rec in manifest.files.items() if name.startswith("model.onnx"))


def prepare(work: str):
    """The fp32 bundle and every converted bundle, built once."""
    from exporter.tiny.train import corpus_records

    ckpt, fp32 = os.path.join(work, "mid-ckpt"), os.path.join(work, "mid-fp32")
    calib = os.path.join(work, "calib.jsonl")
    if not os.path.isdir(ckpt):
        _cli("tiny", "--size", "mid", "--out", ckpt)
    if not os.path.isdir(fp32):
        _cli("onnx", "--model", ckpt, "--out", fp32, "--quiet")
    if not os.path.isfile(calib):
        with open(calib, "w", encoding="utf-8") as f:
            for r in corpus_records(200, seed=5):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    bundles = {}
    for name, args in VARIANTS:
        if args is None:
            bundles[name] = fp32
            continue
        out = os.path.join(work, "mid-" + name.replace(" ", "-").replace("(", "").replace(")", "").replace(".", ""))
        if not os.path.isdir(out):
            _cli("quantize", "--model", fp32, "--out", out, "--calib-data", calib, "--calib-samples", "32",
                 "--eval-samples", "16", "--accept-accuracy-loss", "--quiet", *args)  # random weights: figures say nothing
        bundles[name] = out
    return bundles


def main() -> None:
    args = common_args(__doc__.splitlines()[0]).parse_args()
    from runtime.manifest import read_manifest

    work = args.workdir or tempfile.mkdtemp(prefix="glm-export-precision-")
    bundles = prepare(work)
    manifests = {name: read_manifest(bundle) for name, bundle in bundles.items()}

    def measure(bundle):
        def run():
            res = _cli("bench", "--model", bundle, "--threads", str(args.threads), "--prompt-len",
                       str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--runs", "1", "--warmup", "1",
                       "--json", capture=True)
            row = res["results"][0]
            return {"decode_tps": row["decode_tokens_per_s"], "prefill_ms": row["prefill_ms"]}

        return run

    med = interleaved_medians({name: measure(bundle) for name, bundle in bundles.items()}, args.rounds)
    base_speed = med["fp32"]["decode_tps"]
    base_bytes = _graph_bytes(manifests["fp32"])
    rows = []
    for name, manifest in manifests.items():
        acc = manifest.extra.get("accuracy", {})
        size = _graph_bytes(manifest)
        tps = med[name]["decode_tps"]
        rows.append({"precision": name, "graph_bytes": size, "size_ratio": round(base_bytes / size, 2),
                     "decode_tokens_per_s": round(tps, 1), "speed_ratio": round(tps / base_speed, 2),
                     "prefill_ms": round(med[name]["prefill_ms"], 1),
                     "top1_vs_fp32_random_weights": acc.get("top1_agreement")})
    print(f"| precision | graph MB | smaller than fp32 | decode tokens/s | vs fp32 | prefill ms ({args.prompt_len}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['graph_bytes'] / 1e6:.0f} | {r['size_ratio']:.2f}x | "
              f"{r['decode_tokens_per_s']:.1f} | {r['speed_ratio']:.2f}x | {r['prefill_ms']:.0f} |")
    print(json.dumps({"threads": args.threads, "rounds": args.rounds, "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "workdir": work, "results": rows}))


if __name__ == "__main__":
    main()
