"""A calibration ranges file (--ranges) is type-checked where it is read: one QuantizationError naming the file."""
from __future__ import annotations

import json

import pytest

from calibration.errors import QuantizationError
from calibration.ranges import RANGES_FORMAT, RANGES_VERSION, read_ranges

GOOD = {"min": -1.0, "max": 1.0, "absmax": 1.0, "percentile_amax": 0.9, "entropy_amax": 0.8, "count": 10}


def _file(tmp_path, body):
    p = tmp_path / "calibration_ranges.json"
    p.write_text(body if isinstance(body, str) else json.dumps(body, allow_nan=True))
    return str(p)


def _ranges(tensors, **extra):
    return dict({"format": RANGES_FORMAT, "version": RANGES_VERSION, "method": "minmax", "tensors": tensors}, **extra)


def test_a_good_file_reads(tmp_path):
    assert read_ranges(_file(tmp_path, _ranges({"t": GOOD}))).tensors["t"].count == 10


@pytest.mark.parametrize("body, needle", [
    (_ranges(["t"]), "malformed"),
    (_ranges({"t": dict(GOOD, max=float("nan"))}), "'max'"),
    (_ranges({"t": dict(GOOD, absmax="1.0")}), "'absmax'"),
    (_ranges({"t": dict(GOOD, count=True)}), "'count'"),
    (_ranges({"t": dict(GOOD, extra=1.0)}), "malformed"),
    (_ranges({"t": GOOD}, method="magic"), "magic"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ([1, 2], "not a glm-export calibration ranges file"),
])
def test_bad_ranges_files_are_one_line(tmp_path, body, needle):
    with pytest.raises(QuantizationError) as info:
        read_ranges(_file(tmp_path, body))
    assert needle in str(info.value) and "\n" not in str(info.value)
