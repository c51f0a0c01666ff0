"""Calibration: run the float model on realistic feeds, collect activation statistics, write a ranges JSON file.

Where it stands: the calibration stage of static INT8. Its only product is the ranges file (this module's
``write_ranges``), which ``calibration.quantize`` reads: the quantizer never sees the calibration data.

The float bundle's graph is copied with extra outputs (the inputs of the linear layers to be quantized) and run
through the runtime's onnxruntime backend on the steps of ``calibration.feeds``. For each tensor the exact min, max
and max |x| are kept, plus a histogram of |x| (``qmath.AbsHistogram``, which accepts batches of any shape), over the
real (non-padding) positions only. From those, each method gives the clipping threshold ``amax``:

* ``minmax``      the largest |x| seen;
* ``percentile``  the |x| below which ``percentile`` percent of the values fall;
* ``entropy``     TensorRT's KL-divergence threshold (``qmath.entropy_amax``).

All three are computed and stored; ``method`` says which one the quantizer uses.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from runtime.errors import read_json_object
from runtime.manifest import sha256_of
from runtime.progress import NullProgress
from runtime.spec import ModelSpec

from calibration import qmath
from calibration.errors import CalibrationDataError, QuantizationError
from calibration.feeds import calibration_steps, count_steps
from calibration.graph_io import DATA_FILE, graph_with_outputs

RANGES_FORMAT = "glm-export-calibration-ranges"
RANGES_VERSION = 1
RANGES_FILE = "calibration_ranges.json"
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_PERCENTILE = 99.99
HISTOGRAM_BINS = 2048


@dataclass
class TensorRange:
    """What calibration learned about one activation tensor."""

    min: float
    max: float
    absmax: float  # max |x| seen (the minmax threshold)
    percentile_amax: float
    entropy_amax: float
    count: int  # values seen

    def amax(self, method: str) -> float:
        return {"minmax": self.absmax, "percentile": self.percentile_amax, "entropy": self.entropy_amax}[method]


@dataclass(frozen=True)
class GraphChecksums:
    """sha256 of a float graph's files: ``model.onnx`` and, where the weights are external, ``model.onnx.data``."""

    model: str
    data: str = ""  # "" where the graph keeps its weights inline


def graph_checksums(model_path: str, recorded: Optional[Mapping[str, Mapping[str, Any]]] = None) -> GraphChecksums:
    """The checksums of the graph at ``model_path`` and of the ``model.onnx.data`` beside it, if any.

    The graph file is hashed here (it is small wherever there is a data file: the bundles' rule moves weights over
    256 MB there). The data file can hold gigabytes, so its checksum is taken from ``recorded`` (the bundle
    manifest's ``files``, whose sizes ``read_manifest`` has checked) when that lists it, and hashed otherwise.
    """
    data_path = os.path.join(os.path.dirname(model_path), DATA_FILE)
    data = ""
    if os.path.isfile(data_path):
        data = str((recorded or {}).get(DATA_FILE, {}).get("sha256", "")) or sha256_of(data_path)
    return GraphChecksums(model=sha256_of(model_path), data=data)


@dataclass
class CalibrationRanges:
    method: str
    tensors: Dict[str, TensorRange]
    settings: Dict[str, Any] = field(default_factory=dict)  # samples, tokens, seq len, seed, decode steps, ...
    model_sha256: str = ""  # of the float graph the ranges belong to
    data_sha256: str = ""  # of that graph's external data file ("" where it has none, or in older files)

    def amax(self, tensor: str) -> float:
        return self.tensors[tensor].amax(self.method)

    def for_another_graph(self, graph: GraphChecksums) -> bool:
        """Whether a checksum these ranges record differs from the graph's (ranges without checksums match any)."""
        return bool(self.model_sha256 and self.model_sha256 != graph.model) or \
            bool(self.data_sha256 and self.data_sha256 != graph.data)


# ------------------------------------------------------------------------------------------------ statistics


class StatsCollector:
    """Running min / max / |x| histogram per tensor, fed one step at a time."""

    def __init__(self, names: Sequence[str], bins: int = HISTOGRAM_BINS):
        self.hist = {n: qmath.AbsHistogram(bins) for n in names}
        self.min = {n: np.inf for n in names}
        self.max = {n: -np.inf for n in names}

    def update(self, name: str, values: np.ndarray, real: np.ndarray) -> None:
        """values (B, S, ...) of one step; real (B, S) marks the positions to count."""
        picked = values[real] if values.ndim >= 2 and values.shape[:2] == real.shape else values
        if picked.size == 0:
            return
        try:
            self.hist[name].add(picked)
        except ValueError:
            raise QuantizationError(
                f"calibration: tensor {name} has non-finite values in the float model; the bundle is broken"
            ) from None
        self.min[name] = min(self.min[name], float(picked.min()))
        self.max[name] = max(self.max[name], float(picked.max()))

    def ranges(self, percentile: float) -> Dict[str, TensorRange]:
        out = {}
        for name, h in self.hist.items():
            if h.total == 0:
                raise QuantizationError(f"calibration never saw tensor {name}")
            out[name] = TensorRange(
                min=self.min[name], max=self.max[name], absmax=h.amax,
                percentile_amax=min(h.amax, qmath.percentile_amax(h.counts, h.width, percentile)),
                entropy_amax=min(h.amax, qmath.entropy_amax(h.counts, h.width)),
                count=h.total,
            )
        return out


def calibrate(
    model_path: str,
    spec: ModelSpec,
    sequences: Sequence[Sequence[int]],
    tensor_names: Sequence[str],
    method: str = "entropy",
    percentile: float = DEFAULT_PERCENTILE,
    batch_size: int = 4,
    decode_steps: int = 8,
    threads: Optional[int] = None,
    work_dir: Optional[str] = None,
    progress=None,
    settings: Optional[Dict[str, Any]] = None,
    checksums: Optional[GraphChecksums] = None,
) -> CalibrationRanges:
    """Ranges of ``tensor_names`` over ``sequences`` run through the float graph at ``model_path``; ``checksums``
    (that graph's, when the caller has them) are recorded with the ranges, else computed here."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    check_method(method, percentile)
    if not sequences:
        raise CalibrationDataError("no calibration sequences")
    progress = progress or NullProgress()
    tmp = tempfile.mkdtemp(prefix=".calibration-", dir=work_dir)
    try:
        augmented = graph_with_outputs(model_path, tensor_names, tmp)
        backend = OnnxRuntimeBackend(augmented, spec, kv_dtype="float32", threads=threads, io_binding=False)
        collector = StatsCollector(tensor_names)
        start = time.perf_counter()
        n_steps = n_tokens = 0
        steps = calibration_steps(spec, sequences, backend.run, batch_size, decode_steps)
        total = count_steps(sequences, batch_size, decode_steps)
        for step, outputs in progress.iterate(steps, total=total, desc="calibrating"):
            for name in tensor_names:
                collector.update(name, outputs[name], step.real)
            n_steps += 1
            n_tokens += int(step.real.sum())
        backend.close()
        del backend
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = dict(settings or {})
    record.update({"steps": n_steps, "tokens": n_tokens, "batch_size": batch_size, "decode_steps": decode_steps,
                   "percentile": percentile, "histogram_bins": HISTOGRAM_BINS,
                   "seconds": round(time.perf_counter() - start, 2)})
    graph = checksums or graph_checksums(model_path)
    return CalibrationRanges(method=method, tensors=collector.ranges(percentile), settings=record,
                             model_sha256=graph.model, data_sha256=graph.data)


def check_method(method: str, percentile: float = DEFAULT_PERCENTILE) -> None:
    if method not in METHODS:
        raise QuantizationError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0 < percentile <= 100:
        raise QuantizationError(f"--percentile must be in (0, 100], got {percentile}")


# ------------------------------------------------------------------------------------------------ the file


def write_ranges(path: str, ranges: CalibrationRanges) -> str:
    data = {
        "format": RANGES_FORMAT,
        "version": RANGES_VERSION,
        "method": ranges.method,
        "model_sha256": ranges.model_sha256,
        "data_sha256": ranges.data_sha256,
        "settings": ranges.settings,
        "tensors": {name: vars(r) for name, r in sorted(ranges.tensors.items())},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path


def read_ranges(path: str, method: Optional[str] = None) -> CalibrationRanges:
    """A ranges file; ``method`` (when given) overrides the one recorded, since all three are stored."""
    if not os.path.isfile(path):
        raise QuantizationError(f"{path}: calibration ranges file not found")
    data = read_json_object(path, QuantizationError, "calibration ranges",
                            hint="not a glm-export calibration ranges file")
    if data.get("format") != RANGES_FORMAT:
        raise QuantizationError(f"{path}: not a glm-export calibration ranges file")
    if data.get("version") != RANGES_VERSION:
        raise QuantizationError(f"{path}: ranges format version {data.get('version')} is not {RANGES_VERSION}; "
                                "calibrate again with this glm-export")
    try:
        tensors = {name: TensorRange(**{k: _range_value(k, v, name) for k, v in rec.items()})
                   for name, rec in data["tensors"].items()}
        chosen = method or data["method"]
        check_method(chosen)
        return CalibrationRanges(method=chosen, tensors=tensors, settings=dict(data.get("settings", {})),
                                 model_sha256=str(data.get("model_sha256", "")),
                                 data_sha256=str(data.get("data_sha256", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise QuantizationError(f"{path}: malformed calibration ranges ({type(e).__name__}: {e})") from None


def _range_value(key: str, value, tensor: str):
    """One recorded figure: a finite number (a whole one for "count"); ValueError naming the tensor otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"tensor {tensor!r} field {key!r} = {value!r:.40} is not a finite number")
    return int(value) if key == "count" else float(value)
