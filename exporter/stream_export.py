"""Checkpoint -> verified bundle of any precision, one weight at a time (``glm-export onnx --precision ...``).

Flow: config -> spec; memory plan checked against the machine (``exporter.memory_plan``); graph traced without
weights (``exporter.stream_weights.trace_weightless``); static INT8 only: ranges calibrated on the layer-streaming
reference (``exporter.stream_calibrate``); every weight read memory-mapped from the checkpoint, converted or
quantized (``calibration.stream_quant``) and appended to ``model.onnx.data`` before the next is read; verification:
the layer-streaming PyTorch reference (``exporter.stream_reference``, reading the checkpoint again, never the
written bundle) against onnxruntime on the written bundle, prefill + 3 cached decode steps, batch 2 left-padded;
manifest written; the staged directory renamed into place.

Where exporter/graph_choice.py allows it (fp32 and the quantized precisions; not fp16) the fused onnxruntime graph
``model.fused.onnx`` is written next, over the tensors just written (``exporter.fused_graph.write_fused_streamed``:
quantized layers rewired onto the portable graph's quantized tensors, nothing quantized twice, no weight read) and
verified against the same reference, logits within the same bound.

fp32 and fp16 bundles are those of the whole-model export (``exporter.onnx_export``, kept as
``export_bundle(..., streaming=False)``), weights bit for bit. int4 / int8-dynamic / int8 bundles are those of
``glm-export onnx`` followed by ``glm-export quantize`` with the same settings (int8: up to the float rounding of
the calibration ranges). Quantized bundles are verified against the float reference within the tolerance table's
``stream_quantized_vs_float`` bounds; their accuracy on text is measured by ``glm-export eval`` against an fp32
bundle, where one can be made.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np

from runtime import __version__
from runtime import graph_contract as gc
from runtime.errors import ConfigError, VerificationError
from runtime.manifest import DATA_FILE, FUSED_MODEL_FILE, GRAPH_FUSED, KV_DTYPE_OF_PRECISION, MODEL_FILE, PRECISIONS
from runtime.manifest import Manifest
from runtime.manifest import record_files, write_manifest
from runtime.progress import NullProgress
from runtime.tolerances import allowed_diff, tolerance

from calibration.defaults import INT4_BLOCK_SIZE, INT4_SYMMETRIC

from exporter.config import spec_from_checkpoint
from exporter.staging import staged_directory

log = logging.getLogger("glm_export")
QUANTIZED = ("int8", "int8-dynamic", "int4")


@dataclass
class StreamOptions:
    """Quantization settings of a direct export (the meaning of each is calibration.pipeline.QuantizeOptions')."""

    keep_float: Sequence[str] = ()
    block_size: int = INT4_BLOCK_SIZE
    int4_symmetric: bool = INT4_SYMMETRIC
    int4_accuracy_level: int = 4
    embedding: str = "fp16"
    calib_data: Optional[str] = None
    calib_format: str = "auto"
    calib_samples: int = 128
    calib_seq_len: int = 128
    calib_seed: int = 0
    calib_batch: int = 4
    decode_steps: int = 8
    method: str = "minmax"
    percentile: float = 99.99
    memory_available: Optional[int] = None  # bytes; None: detected (exporter.memory_plan)
    extra: Dict[str, Any] = field(default_factory=dict)

    def check(self, precision: str) -> None:
        from calibration.pipeline import check_options

        if precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision in QUANTIZED:
            check_options(self.quantize_options(precision))

    def quantize_options(self, precision: str):
        from calibration.pipeline import QuantizeOptions

        return QuantizeOptions(
            precision=precision, calib_data=self.calib_data, calib_format=self.calib_format,
            calib_samples=self.calib_samples, calib_seq_len=self.calib_seq_len, calib_seed=self.calib_seed,
            method=self.method, percentile=self.percentile, keep_float=tuple(self.keep_float),
            calib_batch=self.calib_batch, decode_steps=self.decode_steps, block_size=self.block_size,
            int4_symmetric=self.int4_symmetric, int4_accuracy_level=self.int4_accuracy_level,
            embedding=self.embedding, evaluate=False,
        )


def _calibration_sequences(ckpt_dir: str, spec, opts: StreamOptions):
    from calibration.data import load_split
    from runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt_dir, spec)
    # no held-out part: as calibration.pipeline does with --no-eval (a direct export evaluates nothing)
    split = load_split(opts.calib_data, tokenizer, spec, opts.calib_samples, opts.calib_seq_len, 0, opts.calib_seed,
                       opts.calib_format)
    return split.calibration


class StagePeaks:
    """Peak RSS of the process at the end of each stage (``ru_maxrss``: Linux, KiB), for the manifest and the
    memory plan's fit."""

    def __init__(self):
        self.peaks: Dict[str, int] = {}

    def mark(self, stage: str) -> None:
        import resource

        self.peaks[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        log.info("peak RSS after %s: %.2f GB", stage, self.peaks[stage] / 1024**3)


def export_streamed(ckpt_dir: str, out_dir: str, precision: str = "fp32", verify: bool = True,
                    overwrite: bool = False, rope_scaling: Optional[str] = None, opset: int = 17, progress=None,
                    options: Optional[StreamOptions] = None, plan_only: bool = False, forms=None,
                    inputs: Sequence = (), fused: bool = True):
    """Export ``ckpt_dir`` to ``out_dir`` at ``precision``; see the module docstring. ``plan_only`` returns the
    memory plan (``exporter.memory_plan.MemoryPlan``) without writing anything. ``forms``: the checkpoint's
    ``exporter.checkpoint_forms.CheckpointForms`` where the caller prepared them (``export_bundle`` does: its spec,
    e.g. with --generation, and its manifest records are used), a plain checkpoint else; ``inputs``: the (option,
    path) pairs the export reads, which ``--out`` may not touch (``exporter.staging``). ``fused``: also write the
    fused onnxruntime graph where exporter/graph_choice.py allows it (over the tensors just written, quantized ones
    included: exporter.fused_graph.write_fused_streamed), verified against the same reference."""
    import torch

    from calibration.stream_quant import ConverterChoice, form_record, make_converter
    from calibration.stream_write import read_only_once, write_streamed
    from calibration.targets import find_linears, select
    from calibration.genai_files import write_genai_files
    from exporter.fused_graph import run_fused, write_fused_streamed
    from exporter.graph_choice import fused_graph_refusal
    from exporter.memory_plan import check_plan, plan_export
    from exporter.onnx_export import copy_interop_side_files
    from exporter.onnx_export import ExportResult
    from exporter.stream_reference import StreamingReference
    from exporter.stream_source import CheckpointReader
    from exporter.stream_weights import trace_weightless
    from exporter.verify import make_plan, max_diffs, run_onnx, step_feeds
    from exporter.weights import find_weight_files

    opts = options or StreamOptions()
    opts.check(precision)
    progress = progress or NullProgress()
    start = time.perf_counter()
    if forms is not None:
        spec, info = forms.spec, forms.info
    else:
        spec, info = spec_from_checkpoint(ckpt_dir, rope_scaling=rope_scaling)
    reader = CheckpointReader(ckpt_dir, spec, info.layout)
    mplan = plan_export(spec, precision, verify=verify, embedding_fp16=opts.embedding == "fp16",
                        block_size=opts.block_size, calibrate=precision == "int8")
    if plan_only:
        return mplan
    check_plan(mplan, out_dir, opts.memory_available)
    progress.stage(mplan.summary())
    kv_dtype = KV_DTYPE_OF_PRECISION[precision]
    trace_dtype = torch.float16 if precision == "fp16" else torch.float32
    peaks = StagePeaks()
    peaks.mark("start")
    with staged_directory(out_dir, overwrite, inputs=tuple(inputs) or (("--model", ckpt_dir),)) as tmp:
        progress.stage(f"tracing {spec.generation} ({spec.num_params / 1e6:.1f}M params) to ONNX without weights")
        proto = trace_weightless(spec, trace_dtype, tmp, opset)
        peaks.mark("trace")
        record: Dict[str, Any] = {}
        chosen = []
        choice = ConverterChoice(precision, block_size=opts.block_size, int4_symmetric=opts.int4_symmetric,
                                 int4_accuracy_level=opts.int4_accuracy_level,
                                 embedding_fp16=opts.embedding == "fp16", work_dir=tmp)
        if precision in QUANTIZED:
            chosen, kept = select(find_linears(proto), opts.keep_float, spec.num_layers)
            record = {"precision": precision, "settings": opts.quantize_options(precision).settings(),
                      "source_checkpoint": os.path.abspath(ckpt_dir), "streamed": True,
                      "quantized_linears": [lin.name for lin in chosen],
                      "float_linears": [lin.name for lin in kept]}
            record.update(form_record(precision, opts.block_size, opts.int4_symmetric))
        if precision == "int8":
            from calibration.ranges import RANGES_FILE, write_ranges
            from exporter.stream_calibrate import calibrate_streamed

            sequences = _calibration_sequences(ckpt_dir, spec, opts)
            progress.stage(f"calibrating on {len(sequences)} samples with the layer-streaming reference")
            choice.ranges = calibrate_streamed(
                spec, reader, sequences, chosen, opts.method, opts.percentile, opts.calib_batch, opts.decode_steps,
                settings={"samples": len(sequences), "seq_len": opts.calib_seq_len, "seed": opts.calib_seed,
                          "data": opts.calib_data}, progress=progress)
            write_ranges(os.path.join(tmp, RANGES_FILE), choice.ranges)
            peaks.mark("calibration")
            record["calibration"] = choice.ranges.settings
        converter = make_converter(choice, chosen, source_precision="fp16" if precision == "fp16" else "fp32")
        float_headers = [_header_copy(i) for i in proto.graph.initializer]  # names, dtypes, dims: no data
        replaced: Dict[str, Any] = {}
        progress.stage(f"writing {precision} weights tensor by tensor")
        refusal = fused_graph_refusal(spec, precision, False) if fused else None
        fused = fused and refusal is None
        figures = write_streamed(proto, tmp, read_only_once(reader.graph_array), converter, progress,
                                 replaced=replaced, fused=fused)
        peaks.mark("writing")
        if precision in QUANTIZED:
            from calibration.graph_io import contrib_ops, default_opset

            record["embedding"] = "fp16 (cast to fp32 after the Gather)" if converter.embedding else "fp32"
            record["contrib_ops"] = contrib_ops(proto)
            record["opset"] = default_opset(proto)
        del proto
        copied = copy_interop_side_files(ckpt_dir, tmp, spec, info.tokenizer_files)
        fused_record: Dict[str, Any] = {}
        genai_files = []
        if fused:
            progress.stage("writing the fused onnxruntime graph over the same weights")
            fused_record = write_fused_streamed(tmp, spec, float_headers, replaced, precision)
            genai_files = write_genai_files(tmp, spec, FUSED_MODEL_FILE)  # onnxruntime_genai.Model(bundle) runs it
            peaks.mark("fused graph")
        elif refusal is not None:
            log.info("portable graph only: %s", refusal)
        del float_headers, replaced

        diffs: Dict[str, float] = {}
        verification: Dict[str, Any] = {}
        if verify:
            comparison = "onnx_vs_torch" if precision in ("fp32", "fp16") else "stream_quantized_vs_float"
            vplan = make_plan(spec)
            progress.stage("verifying: layer-streaming PyTorch reference from the checkpoint vs onnxruntime, "
                           "prefill + 3 cached decode steps, batch 2, left padding")
            reference = StreamingReference(spec, reader, trace_dtype).run([step_feeds(vplan)], keep_present=True)[0]
            peaks.mark("reference")
            session = verification_session(os.path.join(tmp, MODEL_FILE), precision)
            got = run_onnx(session, spec, vplan, kv_dtype=np.dtype(kv_dtype))
            del session
            peaks.mark("verification session")
            diffs = max_diffs(vplan, got, reference)
            del got
            if fused:
                got = run_fused(os.path.join(tmp, FUSED_MODEL_FILE), spec, vplan)
                # logits only: a left-padded row's cached keys are rotated at buffer positions (see fused_graph.py)
                diffs.update({f"fused.{k}": v for k, v in max_diffs(vplan, got, reference).items() if k != "present"})
                del got
                peaks.mark("fused verification session")
            scale = max(float(abs(r[gc.LOGITS]).max()) for r in reference)
            tol = allowed_diff(comparison, precision, scale)
            if not all(v <= tol for v in diffs.values()):
                listing = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
                raise VerificationError(f"exported ONNX differs from PyTorch (layer-streaming reference) beyond {tol:.3g}: "
                                        f"{listing}", diffs)
            weights: Dict[str, Any] = {}
            if precision in QUANTIZED:
                progress.stage(f"verifying: each of {len(chosen)} quantized weights, dequantized, against the "
                               "checkpoint")
                weights = check_quantized_weights(os.path.join(tmp, MODEL_FILE), reader, chosen, precision)
            verification = {"against": "pytorch (layer-streaming, from the checkpoint)",
                            "comparison": comparison, "tolerance": tolerance(comparison, precision),
                            "allowed_max_abs_diff": tol, "max_abs_diff": diffs,
                            "steps": "prefill + 3 decode, batch 2, left padding"}
            if weights:
                verification["weights"] = weights
        graph_files = [MODEL_FILE] + ([DATA_FILE] if os.path.exists(os.path.join(tmp, DATA_FILE)) else [])
        graph_files += [FUSED_MODEL_FILE] + genai_files if fused else []
        extra_files = ["calibration_ranges.json"] if precision == "int8" else []
        extra: Dict[str, Any] = {"streamed_export": dict(
            {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()},
            memory_plan=mplan.to_dict(), peak_rss_after=peaks.peaks),
            "graphs_decided": {"fused": "written" if fused else (refusal or "not asked (export_bundle fused=False)")}}
        if record:
            extra["quantization"] = record
            extra["accuracy"] = {"skipped": "direct export (measure with 'glm-export eval' against an fp32 bundle)"}
        manifest = Manifest(
            spec=spec, precision=precision, inputs=gc.graph_inputs(spec, kv_dtype),
            outputs=gc.graph_outputs(spec, kv_dtype), model_file=MODEL_FILE, opset=record.pop("opset", opset),
            tool_version=__version__,
            source={"checkpoint": info.path, "layout": info.layout, "model_type": info.model_type,
                    "weight_files": [os.path.basename(f) for f in find_weight_files(ckpt_dir).files],
                    "rope_scaling_decided_by": info.rope_scaling_source,
                    **(forms.source_records() if forms is not None else {})},
            files=record_files(tmp, graph_files + copied + extra_files),
            tokenizer_files=[f for f in copied if f != "config.json"],
            verification=verification, extra=extra,
            graphs={GRAPH_FUSED: fused_record} if fused else {},
        )
        write_manifest(tmp, manifest)
    return ExportResult(bundle_dir=os.path.abspath(out_dir), manifest=manifest, num_params=spec.num_params,
                        file_bytes={n: r["bytes"] for n, r in manifest.files.items()}, max_diffs=diffs,
                        seconds=time.perf_counter() - start)


def _header_copy(init):
    from onnx import TensorProto

    copy = TensorProto()
    copy.CopyFrom(init)
    return copy


def check_quantized_weights(model_path: str, reader, chosen, precision: str) -> Dict[str, Any]:
    """Every quantized linear layer of the written bundle, dequantized, against the checkpoint's weight (read
    again): VerificationError naming the first layer beyond the tolerance table's ``stream_weight_rel_rms``."""
    import torch

    from calibration.stream_quant import quantized_weight_error
    from calibration.stream_write import BundleReader
    from exporter.stream_source import canonical_name_of

    written = BundleReader(model_path)
    bound = allowed_diff("stream_weight_rel_rms", precision)
    worst, worst_name = 0.0, ""
    for lin in chosen:
        name = canonical_name_of(lin.weight)  # read again a block of rows at a time, in checkpoint orientation
        err = quantized_weight_error(lambda a, b, _n=name: reader.canonical_rows(_n, a, b, torch.float32).numpy(),
                                     written.graph_array, lin, precision)
        if not err <= bound:
            raise VerificationError(f"quantized weight {lin.weight} differs from the checkpoint's: relative RMS "
                                    f"error {err:.3g} > {bound:.3g}", {lin.weight: err})
        if err > worst:
            worst, worst_name = err, lin.weight
    return {"max_rel_rms_error": worst, "worst": worst_name, "allowed": bound, "checked": len(chosen)}


def verification_session(model_path: str, precision: str):
    """onnxruntime session for verification. fp32 and the quantized forms: the default session. fp16: onnxruntime
    has no fp16 MatMul on x86 CPUs and inserts Casts to fp32 before each; with its default optimizations constant
    folding turns those into fp32 copies of every weight (1.18 GB resident for the 288 M model's 0.58 GB of fp16
    weights, measured), and without folding its default execution order runs every weight's Cast first (1.54 GB).
    So fp16 verification runs with the basic optimizations minus ConstantFolding and the priority-based order, which
    casts each weight just before its MatMul and frees the copy after (0.85 GB, measured): the graph's own fp16
    weights, one fp32 weight at a time. The figures differ from the default session's only by its fusions'
    float rounding (within the fp16 tolerance)."""
    from runtime.backends.onnxruntime import new_session

    if precision != "fp16":
        return new_session(model_path)
    return new_session(model_path, configure=fp16_low_memory_options)


def fp16_low_memory_options(opts) -> None:
    """SessionOptions of fp16 verification (see ``verification_session``)."""
    import onnxruntime as ort

    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
