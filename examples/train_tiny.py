"""Train a tiny ChatGLM3 from scratch (about a minute on one CPU core) and write it as a normal checkpoint.

    python examples/train_tiny.py --out DIR [--steps 600] [--seed 0]
    glm-export onnx --model DIR --out DIR-onnx
    glm-export quantize --model DIR-onnx --out DIR-int8 --precision int8 --calib-data calib.jsonl

The checkpoint is THUDM-layout (the published ChatGLM3 config shrunk, the tiny sentencepiece tokenizer, trained
weights in model.safetensors) plus train_report.json with the held-out next-token accuracy. The training text comes
from a small Chinese/English grammar (``exporter.tiny.train``); ``--write-data`` also writes calibration and
evaluation JSONL files from the same grammar, none of it seen in training. The library call is
``exporter.tiny.train.write_trained_checkpoint``; the tests use its cached form, ``trained_checkpoint``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from exporter.staging import staged_directory
    from exporter.tiny.train import TrainSettings, corpus_records, heldout_records, write_trained_checkpoint
    from runtime.progress import TqdmProgress

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    parser.add_argument("--write-data", action="store_true",
                        help="also write calib.jsonl and eval.jsonl (held-out text) next to --out")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    settings = dataclasses.replace(TrainSettings(), steps=args.steps, seed=args.seed)
    with staged_directory(args.out, args.overwrite, checkpoint_stamp=True) as tmp:
        report = write_trained_checkpoint(tmp, settings, progress=TqdmProgress())
    print(f"wrote {args.out}: {report['params']} params, trained in {report['train_seconds']}s, held-out next-token "
          f"accuracy {report['heldout_next_token_accuracy']:.3f} (chance {report['chance_accuracy']:.4f})")
    if args.write_data:
        seen = corpus_records(settings.train_records, settings.seed)
        calib = heldout_records(400, seed=777, exclude=seen)
        held = heldout_records(500, seed=999, exclude=seen + calib)
        for name, records in (("calib.jsonl", calib), ("eval.jsonl", held)):
            path = os.path.join(os.path.dirname(os.path.abspath(args.out)), name)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
