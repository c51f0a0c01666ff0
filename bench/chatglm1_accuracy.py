"""What each precision costs a trained tiny ChatGLM-6B (v1): fp16, static and dynamic INT8, INT4 against fp32.

    python bench/chatglm1_accuracy.py [--workdir DIR] [--steps 600] [--eval-records 300]

Trains a tiny ChatGLM-6B with ``exporter.tiny.train`` (generation chatglm1: LayerNorm, GELU, alpha residual, 2D
positions, prefix-LM attention; ice_text tokenizer with ``num_image_tokens: 0`` as THUDM's later files have it, which
keeps the vocabulary small), cached under .cache/ like the ChatGLM3 trained model; exports it (verified), converts
it with ``glm-export quantize`` and evaluates every bundle on held-out text the model never trained or calibrated on
(text records only: v1 scores text generated after ``[gMASK] <sop>``). Prints a Markdown table and one JSON line.
Not part of the test suite: training takes minutes on this machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRECISIONS = ["fp16", "int8", "int8-dynamic", "int4"]


def _cli(*args):
    cmd = [sys.executable, "-m", "exporter.cli"] + list(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _text_file(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r["text"] + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-records", type=int, default=300)
    args = parser.parse_args()
    from exporter.tiny.train import REPORT_FILE, TrainSettings, corpus_records, heldout_records, trained_checkpoint
    from runtime.progress import TqdmProgress

    work = args.workdir or tempfile.mkdtemp(prefix="chatglm1-acc-")
    os.makedirs(work, exist_ok=True)
    settings = dataclasses.replace(TrainSettings(generation="chatglm1"), steps=args.steps)
    ckpt = trained_checkpoint(os.path.join(ROOT, ".cache"), settings, TqdmProgress())
    with open(os.path.join(ckpt, REPORT_FILE), encoding="utf-8") as f:
        report = json.load(f)
    seen = corpus_records(settings.train_records, settings.seed)
    calib = [r for r in heldout_records(1200, seed=777, exclude=seen) if "text" in r][:300]
    evals = [r for r in heldout_records(3 * args.eval_records, seed=999, exclude=seen + calib) if "text" in r]
    calib_file = _text_file(os.path.join(work, "calib.txt"), calib)
    eval_file = _text_file(os.path.join(work, "eval.txt"), evals[: args.eval_records])
    fp32 = os.path.join(work, "fp32")
    export = _cli("onnx", "--model", ckpt, "--out", fp32, "--overwrite", "--json", "--quiet")
    rows = {}
    for precision in PRECISIONS:
        out = os.path.join(work, precision)
        got = _cli("quantize", "--model", fp32, "--out", out, "--precision", precision, "--calib-data", calib_file,
                   "--eval-data", eval_file, "--eval-samples", str(args.eval_records), "--overwrite", "--json",
                   "--quiet")
        rows[precision] = got["accuracy"]
    print(f"trained ChatGLM-6B (v1) tiny: {report['params']} parameters, held-out next-token accuracy "
          f"{report['heldout_next_token_accuracy']:.2%} (chance {report['chance_accuracy']:.2%}), export max diff "
          f"{max(export['max_abs_diff'].values()):.2e}; fp32 perplexity {rows['fp16']['ppl_reference']:.4f}")
    print("| bundle | top-1 agreement | perplexity | mean KL | tokens |")
    print("|---|---|---|---|---|")
    for precision, acc in rows.items():
        print(f"| {precision} | {acc['top1_agreement']:.2%} | {(acc['ppl_ratio'] - 1) * 100:+.2f}% | "
              f"{acc['mean_kl']:.1e} | {acc['tokens']} |")
    print(json.dumps({"train_report": report, "export": export["max_abs_diff"], "accuracy": rows}))


if __name__ == "__main__":
    main()
