"""The memory plan of a streaming export or quantization: estimated peak RSS and disk, checked before any work.

Where it stands: ``glm-export onnx`` and ``glm-export quantize`` build a plan from the spec's tensor sizes
(``exporter.stream_source.graph_shapes``), print it (``--dry-run`` prints it and stops) and refuse, with the numbers,
when the machine's available memory or the output file system cannot hold it, instead of being killed halfway.

The estimate is the largest of the phases, each held on top of the process's fixed cost (Python, torch, onnx and
onnxruntime loaded):

* trace (direct export): TorchScript's tracer running the weightless model, which makes a dense copy of each
  weight as its matmul runs (the largest: the LM head) and holds the graph;
* writing: the working set of the largest weight (read a block of rows at a time into its converted form, and the
  converter's copies: onnxruntime's INT8 quantizers copy their 64 MB column block several times; INT4 calls
  onnxruntime's kernel on the weight itself, its packed blocks an eighth of it);
* reference (verification, INT8 calibration): one decoder layer in fp32 plus its source copy;
* verification session: onnxruntime holding the written bundle (its weight bytes times a factor per precision;
  fp16: the fp16 weights plus the fp32 cast of one weight at a time, see exporter.stream_export.verification_session);
* ``quantize`` with its accuracy report (the default): onnxruntime holding the new bundle and the fp32 source
  together, which ``--no-eval`` avoids (the report is then made separately with ``glm-export eval`` where an fp32
  session fits).

The coefficients (``*_FACTOR(S)``, ``BASE_BYTES``) are fitted to the peaks measured with bench/stream_memory.py
(README "Scale"); that script also prints the estimate beside each measurement.

Available memory: ``MemAvailable`` of /proc/meminfo, lowered by a cgroup limit (v2 memory.max - memory.current,
or v1 limit_in_bytes - usage_in_bytes) where one is set; ``--memory-available`` or the environment variable
``GLM_EXPORT_MEMORY_AVAILABLE`` (bytes, or with a K/M/G suffix) overrides the detection.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, Optional

from runtime.errors import GlmExportError

from calibration.defaults import INT4_BLOCK_SIZE

GB = 1024**3
ENV_MEMORY = "GLM_EXPORT_MEMORY_AVAILABLE"
BASE_BYTES = int(0.40 * GB)  # interpreter + torch + onnx + onnxruntime: the 3 M-parameter model peaks at 0.37 GB
BASE_NO_TORCH = int(0.10 * GB)  # quantize from a bundle, no torch
BASE_CALIBRATING = int(0.34 * GB)  # quantize from a bundle to static INT8: torch for the streamed calibrator only
# the tracer's dense copies of the largest weight (in the traced dtype) and the graph it builds (measured on the
# 288 M model: 0.44 GB over the start for a 266 MB LM head)
TRACE_FACTOR = 1.7
# bytes alive per fp32 byte of the largest weight while it is converted: the converted array and one read block,
# INT4's packed blocks, INT8's quantized copy (fp16: the whole fp32 array as read, its fp16 copy and the range
# check's temporaries of one row block; measured 1.86x on the 288 M model's 266 MB embedding, quantize from a bundle)
WRITE_FACTORS = {"fp32": 1.2, "fp16": 1.9, "int4": 1.3, "int8": 0.4, "int8-dynamic": 1.0}
# ... and, for the INT8 forms, onnxruntime's copies of one column block (calibration.stream_quant.CHUNK_BYTES;
# dynamic INT8: 6.6x, measured on a 266 MB weight); INT4 calls the kernel directly (no copies)
# (static INT8 fitted on the 3 M, 288 M and 659 M models, direct and from a bundle: its peak grows with the
# quantizer's block, hardly with the weight, which is read and quantized a column block at a time)
QUANTIZER_COPIES = {"int8": 9.5, "int8-dynamic": 7.0}
# onnxruntime's resident bytes per byte of the bundle's weights, when it runs the verification (fp16: plus the
# fp32 cast of the largest weight, FP16_CAST_FACTOR x its fp32 bytes)
SESSION_FACTORS = {"fp32": 1.0, "fp16": 1.0, "int4": 1.05, "int8": 1.3, "int8-dynamic": 0.95}
FP16_CAST_FACTOR = 1.0
REFERENCE_FACTOR = 2.5  # one layer in fp32: the source copy, the fp32 copy, the transposed copy
MARGIN = 1.05  # the plan asks this much more than its estimate


class ResourceError(GlmExportError):
    """The machine cannot hold the planned work (memory or disk), or the plan's inputs are unreadable."""


@dataclass
class MemoryPlan:
    precision: str
    params: int
    peak_bytes: int  # estimated peak RSS
    phases: Dict[str, int]  # phase -> estimated bytes on top of the base
    output_bytes: int  # the bundle's files
    scratch_bytes: int  # temporary files beside the output (one-linear graphs of dynamic INT8)
    largest_tensor: str

    def summary(self) -> str:
        phase = max(self.phases, key=self.phases.get)
        return (f"memory plan ({self.precision}, {self.params / 1e9:.2f}B params): peak about "
                f"{self.peak_bytes / GB:.2f} GB ({phase}; largest tensor {self.largest_tensor}), output "
                f"{self.output_bytes / GB:.2f} GB on disk")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _stored_bytes(name: str, numel: int, rows: int, precision: str, embedding_fp16: bool, block_size: int,
                  quantized: bool) -> int:
    if precision == "fp32":
        return 4 * numel
    if precision == "fp16":
        return 2 * numel
    if name == "embed.weight":
        return (2 if embedding_fp16 else 4) * numel
    if not quantized:
        return 4 * numel
    if precision == "int4":
        k, n = rows, numel // rows
        blocks = -(-k // block_size)
        return n * blocks * (block_size // 2 + 4 + 1)  # packed nibbles, fp32 scale, zero point (half a byte, padded)
    return numel + 8 * (numel // rows)  # int8 + per-channel scale and zero point


def plan_export(spec, precision: str, verify: bool = True, embedding_fp16: bool = True, block_size: int = INT4_BLOCK_SIZE,
                calibrate: bool = False, from_bundle: bool = False, kv_calibrate: bool = False) -> MemoryPlan:
    """The plan of writing ``precision`` for ``spec`` (from a checkpoint, or from an fp32 bundle). ``kv_calibrate``:
    quantize's ``--kv-cache int8`` runs the new bundle's fused graph over the calibration text (one session)."""
    from exporter.stream_source import graph_shapes

    shapes = graph_shapes(spec)
    linear = {n for n, s in shapes.items() if n.endswith(".weight_t")}
    quantized = precision in ("int4", "int8", "int8-dynamic")
    largest = max(shapes, key=lambda n: _numel(shapes[n]))
    biggest = 4 * _numel(shapes[largest])
    out = sum(_stored_bytes(n, _numel(s), s[0], precision, embedding_fp16, block_size, quantized and n in linear)
              for n, s in shapes.items())
    layer = sum(4 * _numel(s) for n, s in shapes.items() if n.startswith("layers.0."))
    from calibration.stream_quant import CHUNK_BYTES

    phases = {"writing": int(WRITE_FACTORS[precision] * biggest
                             + QUANTIZER_COPIES.get(precision, 0.0) * min(biggest, CHUNK_BYTES))}
    if not from_bundle:
        phases["trace"] = int(TRACE_FACTOR * biggest * (0.5 if precision == "fp16" else 1.0))
    if (verify and not from_bundle) or calibrate:
        phases["reference"] = int(REFERENCE_FACTOR * layer)
    if verify and not from_bundle:
        phases["verification session"] = int(SESSION_FACTORS[precision] * out
                                              + (FP16_CAST_FACTOR * biggest if precision == "fp16" else 0))
    if verify and from_bundle:  # quantize's accuracy report runs the new bundle and the fp32 source side by side
        # (the report's session is a default one: an fp16 bundle's weights held as fp32 copies there, 2x)
        phases["accuracy sessions"] = int((2.0 if precision == "fp16" else SESSION_FACTORS[precision]) * out
                                          + SESSION_FACTORS["fp32"] * 4 * spec.num_params)
    if kv_calibrate:
        phases["kv-cache calibration session"] = int(SESSION_FACTORS[precision] * out)
    scratch = 2 * biggest if precision == "int8-dynamic" else 0
    base = BASE_BYTES if not from_bundle else (BASE_CALIBRATING if calibrate else BASE_NO_TORCH)
    peak = base + max(phases.values())
    return MemoryPlan(precision, spec.num_params, int(peak), phases, int(out), int(scratch), largest)


def parse_bytes(text: str, where: str) -> int:
    """'12G', '800M', '1073741824' -> bytes."""
    t = str(text).strip().upper().rstrip("B")
    mult = 1
    for suffix, m in (("K", 1024), ("M", 1024**2), ("G", 1024**3), ("T", 1024**4)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = float(t) * mult
    except ValueError:
        raise ResourceError(f"{where}: expected a size such as 12G, 800M or a number of bytes, got {text!r}") from None
    if value <= 0:
        raise ResourceError(f"{where}: must be positive, got {text!r}")
    return int(value)


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> Dict[str, Optional[int]]:
    """{"meminfo": MemAvailable bytes, "cgroup": limit - usage bytes (None without a limit), "available": the
    smaller}."""
    meminfo = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    meminfo = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    cgroup = None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            cgroup = max(0, limit - usage)
            break
    known = [v for v in (meminfo, cgroup) if v is not None]
    return {"meminfo": meminfo, "cgroup": cgroup, "available": min(known) if known else None}


def check_plan(plan: MemoryPlan, out_dir: str, memory_available: Optional[int] = None) -> None:
    """ResourceError, with the numbers, when ``plan`` does not fit in memory or on the output's file system."""
    source = "--memory-available"
    if memory_available is None and os.environ.get(ENV_MEMORY):
        memory_available, source = parse_bytes(os.environ[ENV_MEMORY], ENV_MEMORY), ENV_MEMORY
    if memory_available is None:
        from exporter import resources  # the one reading of available memory (tests lower it there)

        memory_available = resources.available_memory_bytes()
        found = available_memory()
        source = "cgroup limit" if found["cgroup"] is not None and found["cgroup"] == memory_available \
            else "MemAvailable"
    need = int(plan.peak_bytes * MARGIN)
    if memory_available is not None and need > memory_available:
        raise ResourceError(
            f"not enough memory for {plan.precision}: the plan needs about {need / GB:.2f} GB "
            f"(estimated peak {plan.peak_bytes / GB:.2f} GB + {int((MARGIN - 1) * 100)}%), {source} gives "
            f"{memory_available / GB:.2f} GB; free memory, or pass --memory-available to override")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent or ".").free
    disk = plan.output_bytes + plan.scratch_bytes
    if disk > free:
        raise ResourceError(f"not enough disk for {plan.precision} at {out_dir}: the bundle needs about "
                            f"{disk / GB:.2f} GB, the file system has {free / GB:.2f} GB free")
