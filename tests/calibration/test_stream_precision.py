"""Bundles written straight from the trained tiny ChatGLM's checkpoint (``glm-export onnx --precision ...``, the
streaming export of issue 15) hold the accuracy bounds of runtime/tolerances.py against its fp32 bundle."""
from __future__ import annotations

import os

import pytest

from calibration.accuracy import accuracy_bounds, check_bounds
from trained_fixture import trained  # noqa: F401  (pytest fixture)

BOUNDS = accuracy_bounds()


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic", "int8"])
def test_direct_export_within_accuracy_bounds(trained, tmp_path, precision):
    from calibration.pipeline import evaluate_bundles
    from exporter.stream_export import StreamOptions, export_streamed

    out = str(tmp_path / precision)
    result = export_streamed(trained.checkpoint, out, precision,
                             options=StreamOptions(calib_data=trained.calib_file, calib_samples=64))
    assert result.manifest.verification["weights"]["checked"] > 0
    report = evaluate_bundles(out, trained.bundle("fp32"), trained.eval_file, max_samples=200)
    print(f"\n[direct {precision}] {report.summary()} ppl_ratio={report.ppl_ratio:.5f}")
    assert check_bounds(precision, report, BOUNDS) == []
    assert os.path.isfile(os.path.join(out, "manifest.json"))
