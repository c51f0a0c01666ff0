"""The trained tiny ChatGLM the precision tests measure, its fp32 bundle, its data files and its quantized bundles.

The checkpoint is trained once per machine (about a minute on one core) and cached under the repository's
``.cache/`` (git-ignored), keyed by a hash of the trainer settings; bundles and data files are built once per test
session. Import the ``trained`` fixture into a test module to use it.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache")
CALIB_RECORDS = 400  # calibration file: a quarter (at most --eval-samples) held out, the rest calibrates
EVAL_RECORDS = 500  # separate held-out file for stable figures (about 12k scored tokens)


class TrainedModels:
    def __init__(self, root: str):
        self.root = root
        self._made: Dict[str, str] = {}
        self._records: Optional[Tuple[List[dict], List[dict]]] = None

    def _once(self, key: str, make) -> str:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    @property
    def checkpoint(self) -> str:
        from exporter.tiny.train import TrainSettings, trained_checkpoint

        return self._once("ckpt", lambda: trained_checkpoint(CACHE, TrainSettings()))

    @property
    def report(self) -> dict:
        """The checkpoint's train_report.json."""
        from exporter.tiny.train import REPORT_FILE
        from runtime.errors import ConfigError, read_json_object

        return read_json_object(os.path.join(self.checkpoint, REPORT_FILE), ConfigError, "training report")

    def bundle(self, precision: str = "fp32") -> str:
        """The checkpoint exported directly (``glm-export onnx``, with ``--fp16`` for "fp16")."""
        from exporter.onnx_export import export_bundle

        path = os.path.join(self.root, "bundle-export-" + precision)
        return self._once("export-" + precision, lambda: export_bundle(self.checkpoint, path,
                                                                       precision=precision).bundle_dir)

    def _records_file(self, name: str, records) -> str:
        path = os.path.join(self.root, name)
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return path

    def _calib_records(self):
        """(the training corpus, the calibration records): made once, for the calibration and the eval file."""
        if self._records is None:
            from exporter.tiny.train import TrainSettings, corpus_records, heldout_records

            s = TrainSettings()
            seen = corpus_records(s.train_records, s.seed)
            self._records = (seen, heldout_records(CALIB_RECORDS, seed=777, exclude=seen))
        return self._records

    @property
    def calib_file(self) -> str:
        """JSONL calibration data (text and chat records) that the model never trained on."""
        return self._once("calib", lambda: self._records_file("calib.jsonl", self._calib_records()[1]))

    @property
    def eval_file(self) -> str:
        """A held-out JSONL file for the accuracy figures, disjoint from training and calibration data."""
        from exporter.tiny.train import heldout_records

        def make():
            seen, calib = self._calib_records()  # exactly the calibration file's records
            return self._records_file("eval.jsonl", heldout_records(EVAL_RECORDS, seed=999, exclude=seen + calib))

        return self._once("eval", make)

    def quantized(self, name: str, **options):
        """``quantize_bundle`` of the fp32 bundle with these options, evaluated on the eval file; returns the
        QuantizeResult (built once per name)."""
        from calibration.pipeline import QuantizeOptions, quantize_bundle

        key = "q-" + name
        if key not in self._made:
            out = os.path.join(self.root, "bundle-" + name)
            os.makedirs(out)
            opts = dict(calib_data=self.calib_file, eval_data=self.eval_file, eval_samples=EVAL_RECORDS)
            opts.update(options)
            self._made[key] = quantize_bundle(self.bundle("fp32"), out, QuantizeOptions(**opts))
        return self._made[key]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedModels:
    return TrainedModels(str(tmp_path_factory.mktemp("trained-models")))
