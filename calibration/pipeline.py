"""fp32 bundle -> fp16 / INT8 / INT8-dynamic / INT4 bundle, with its accuracy measured and recorded.

Where it stands: the library call behind ``glm-export quantize`` and ``glm-export eval``. The flow of
``quantize_bundle``, each step handing the next a file:

1. check the options and read the source manifest; refuse anything but an fp32 bundle (``check_quantize``, which
   the CLI runs before it creates --out and hands on); checksum the source graph once;
2. read and split the calibration text (``calibration.data``): held-out sequences for the accuracy report, the rest
   for calibration;
3. static INT8 only: calibrate (``calibration.ranges``) and write ``calibration_ranges.json`` into the new bundle;
4. convert the graph (``calibration.fp16`` / ``quantize`` / ``int4``), reading the ranges file back for INT8 (and
   refusing ranges recorded for another graph);
5. copy config and tokenizer files, make the manifest (precision, I/O dtypes, checksums, ``extra["quantization"]``);
6. evaluate the new bundle against the source on the held-out text (``calibration.accuracy``), record it in
   ``extra["accuracy"]`` and write ``manifest.json``, once.

``out_dir`` must be an empty directory the caller owns; the CLI passes a staged directory
(``exporter.staging.staged_directory``) so a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from runtime import __version__
from runtime import graph_contract as gc
from runtime.errors import BundleError
from runtime.manifest import (
    GRAPH_FUSED,
    GRAPH_PORTABLE,
    KV_DTYPE_OF_PRECISION,
    PRECISION_TABLE,
    PRECISIONS,
    Manifest,
    copy_side_files,
    read_manifest,
    record_files,
    write_manifest,
)
from runtime.progress import NullProgress
from runtime.user_input import check_threads

from calibration import accuracy as acc
from calibration.defaults import INT4_BLOCK_SIZE, INT4_SYMMETRIC
from calibration.embedding import embedding_to_fp16
from calibration.data import DataSplit, check_counts, load_eval_sequences, load_split
from calibration.errors import AccuracyBoundError, CalibrationDataError, QuantizationError
from calibration.graph_io import DATA_FILE, MODEL_FILE, contrib_ops, default_opset, load_graph, save_graph
from calibration.int4 import check_int4
from calibration.ranges import METHODS, RANGES_FILE, GraphChecksums, calibrate, check_method, graph_checksums, read_ranges
from calibration.ranges import write_ranges
from calibration.targets import find_linears, select
from calibration.fused import convert_fused, keeps_fused, rewire_fused
from calibration.kv_cache import KV_CACHE_DTYPES, write_int8_kv_cache

TARGET_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp32")  # fp16, int8, int8-dynamic, int4
DEFAULT_METHOD = "minmax"  # the default of NVIDIA's own LLM INT8 calibration ("max"); measured in docs/precision.md
EMBEDDING_DTYPES = ("fp16", "fp32")


@dataclass
class QuantizeOptions:
    precision: str
    calib_data: Optional[str] = None  # text or JSONL; held-out part evaluates, the rest calibrates (int8)
    calib_format: str = "auto"
    calib_samples: int = 128
    calib_seq_len: int = 128
    calib_seed: int = 0
    method: str = DEFAULT_METHOD  # static int8: minmax | entropy | percentile
    percentile: float = 99.99
    keep_float: Sequence[str] = ()  # linear layers left in float (aliases or globs, see calibration.targets)
    ranges: Optional[str] = None  # static int8: use this ranges file instead of calibrating
    calib_batch: int = 4
    decode_steps: int = 8
    block_size: int = INT4_BLOCK_SIZE  # int4
    int4_symmetric: bool = INT4_SYMMETRIC
    int4_accuracy_level: int = 4
    embedding: str = "fp16"  # int8 / int8-dynamic / int4: the embedding table in fp16 (or "fp32")
    evaluate: bool = True
    eval_data: Optional[str] = None  # evaluate on this file instead of held-out calibration text
    eval_samples: int = 64
    threads: Optional[int] = None
    # write the bundle even when its measured accuracy breaks runtime/tolerances.py ACCURACY_BOUNDS (recorded in the
    # manifest); without it such a bundle is an AccuracyBoundError and nothing is written
    accept_accuracy_loss: bool = False
    streaming: bool = True  # one weight at a time (calibration.stream_quant); False: whole graph in memory
    # the fused graph's KV cache: "float32", or "int8" with scales calibrated on the calibration text
    # (calibration/kv_cache.py; the portable graph keeps its float cache)
    kv_cache: str = "float32"

    def settings(self) -> Dict[str, Any]:
        """The options that shaped the result, for the manifest (paths as given)."""
        keys = {"precision", "keep_float"} | ({"embedding"} if self.precision != "fp16" else set())
        if self.precision == "int8":
            keys |= {"method", "calib_samples", "calib_seq_len", "calib_seed", "calib_batch",
                     "decode_steps", "ranges"} | ({"percentile"} if self.method == "percentile" else set())
        if self.precision == "int4":
            keys |= {"block_size", "int4_symmetric", "int4_accuracy_level"}
        if self.kv_cache != "float32":
            keys |= {"kv_cache", "calib_samples", "calib_seq_len", "calib_seed"}
        d = {k: v for k, v in asdict(self).items() if k in keys}
        d["keep_float"] = list(self.keep_float)
        return d


@dataclass
class QuantizeResult:
    bundle_dir: str
    manifest: Manifest
    accuracy: Optional[acc.AccuracyReport]
    file_bytes: Dict[str, int]
    source_bytes: int
    seconds: float
    record: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        size = sum(self.file_bytes.values())
        line = (f"{self.bundle_dir}: {self.manifest.precision}, {size / 1e6:.1f} MB "
                f"({self.source_bytes / max(size, 1):.2f}x smaller than fp32), {self.seconds:.1f}s")
        if self.accuracy is not None:
            line += "\n  " + self.accuracy.summary()
        return line


# ------------------------------------------------------------------------------------------------ checks


def check_options(opts: QuantizeOptions) -> None:
    """Every option value, before any work."""
    check_threads(opts.threads, "--threads", QuantizationError)
    if opts.precision not in TARGET_PRECISIONS:
        raise QuantizationError(
            f"--precision must be one of {', '.join(TARGET_PRECISIONS)}, got {opts.precision!r}"
        )
    check_counts(opts.calib_samples, opts.calib_seq_len, opts.eval_samples)
    check_method(opts.method, opts.percentile)
    if opts.precision == "int4":
        check_int4(opts.block_size, opts.int4_accuracy_level)
    if opts.embedding not in EMBEDDING_DTYPES:
        raise QuantizationError(f"--embedding must be one of {', '.join(EMBEDDING_DTYPES)}, got {opts.embedding!r}")
    if opts.calib_batch < 1 or opts.decode_steps < 0:
        raise QuantizationError("--calib-batch must be >= 1 and --decode-steps >= 0")
    if opts.ranges and opts.precision != "int8":
        raise QuantizationError(f"--ranges applies to --precision int8 only, not {opts.precision}")
    needs_calibration = PRECISION_TABLE[opts.precision].needs_calibration and opts.ranges is None
    if needs_calibration and not opts.calib_data:
        raise CalibrationDataError("--precision int8 calibrates on your text: give --calib-data FILE "
                                   "(or --ranges FILE from an earlier calibration)")
    if opts.evaluate and not (opts.calib_data or opts.eval_data):
        raise CalibrationDataError("quantize measures the accuracy cost on held-out text: give --calib-data FILE "
                                   "or --eval-data FILE (or --no-eval to skip the measurement)")
    if opts.evaluate and opts.eval_samples == 0:
        raise CalibrationDataError("--eval-samples 0 leaves nothing to evaluate; use --no-eval to skip it")
    if opts.kv_cache not in KV_CACHE_DTYPES:
        raise QuantizationError(f"--kv-cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {opts.kv_cache!r}")
    if opts.kv_cache != "float32":
        if not PRECISION_TABLE[opts.precision].fused_graph:
            raise QuantizationError(f"--kv-cache {opts.kv_cache} is the fused onnxruntime graph's, and a "
                                    f"--precision {opts.precision} bundle has none (int8, int8-dynamic or int4 do)")
        if not opts.calib_data:
            raise CalibrationDataError(f"--kv-cache {opts.kv_cache} calibrates the cache scales on your text: give "
                                       "--calib-data FILE")


def check_source(bundle_dir: str) -> Manifest:
    """The source bundle's manifest; QuantizationError unless it is an unquantized fp32 bundle."""
    manifest = read_manifest(bundle_dir)
    if manifest.precision != "fp32" or "quantization" in manifest.extra:
        raise QuantizationError(
            f"{bundle_dir}: already quantized (precision {manifest.precision}); quantize the fp32 bundle it came "
            "from (conversions start from fp32 only, never stacked)"
        )
    return manifest


def check_quantize(src_dir: str, opts: QuantizeOptions) -> Manifest:
    """Every check ``quantize_bundle`` needs before any work: the options, then the source bundle. Returns the
    source manifest, for ``quantize_bundle(..., source=...)`` (the CLI checks before it creates --out)."""
    check_options(opts)
    manifest = check_source(src_dir)
    if opts.kv_cache != "float32" and not keeps_fused(manifest, opts.precision):
        raise QuantizationError(f"{src_dir}: --kv-cache {opts.kv_cache} rewrites the fused graph, and this bundle has "
                                "none; re-export it with 'glm-export onnx' (the fused graph is written by default)")
    return manifest


# ------------------------------------------------------------------------------------------------ the flow


@dataclass
class _Source:
    """The checked fp32 bundle a conversion reads."""

    dir: str
    manifest: Manifest
    model: str  # path of its graph
    checksums: GraphChecksums  # of its graph files, computed once

    @property
    def spec(self):
        return self.manifest.spec


def _data(opts: QuantizeOptions, bundle_dir: str, spec) -> Tuple[DataSplit, Any]:
    """Held-out and calibration sequences as the options ask, and the tokenizer that made them (None, and no
    tokenizer loaded, when no text is needed)."""
    if not opts.calib_data and not (opts.evaluate and opts.eval_data):
        return DataSplit(calibration=[], heldout=[]), None
    from runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(bundle_dir, spec)
    eval_from_calib = opts.evaluate and not opts.eval_data
    if opts.calib_data:
        split = load_split(opts.calib_data, tokenizer, spec, opts.calib_samples, opts.calib_seq_len,
                           opts.eval_samples if eval_from_calib else 0, opts.calib_seed, opts.calib_format)
    else:
        split = DataSplit(calibration=[], heldout=[])
    if opts.evaluate and opts.eval_data:
        split.heldout = load_eval_sequences(opts.eval_data, tokenizer, spec, opts.calib_seq_len,
                                            opts.eval_samples, opts.calib_seed)
    return split, tokenizer


def _fp16(opts, src: _Source, out_dir, split, chosen, progress):
    from calibration.fp16 import fp16_from_fp32

    progress.stage("converting to fp16 (fp32 norms, softmax, rotary tables and logits)")
    return fp16_from_fp32(load_graph(src.model)), {
        "fp32_islands": ["norm reductions", "attention scores + mask + softmax", "rotary tables", "logits"],
        "runs_on": _runs_on("fp16"),
    }


def _int8(opts, src: _Source, out_dir, split, chosen, progress):
    """Calibrate (or take --ranges), write the ranges file, read it back, quantize from it."""
    from calibration.quantize import static_int8

    ranges_file = os.path.join(out_dir, RANGES_FILE)
    if opts.ranges:
        shutil.copyfile(opts.ranges, ranges_file)
    else:
        progress.stage(f"calibrating on {len(split.calibration)} samples: prefill + {opts.decode_steps} cached "
                       f"decode steps per batch of {opts.calib_batch}")
        ranges = calibrate(src.model, src.spec, split.calibration, [lin.activation for lin in chosen], opts.method,
                           opts.percentile, opts.calib_batch, opts.decode_steps, opts.threads, out_dir, progress,
                           settings={"samples": len(split.calibration), "seq_len": opts.calib_seq_len,
                                     "seed": opts.calib_seed, "data": opts.calib_data},
                           checksums=src.checksums)
        write_ranges(ranges_file, ranges)
    ranges = read_ranges(ranges_file, method=opts.method)  # the stage boundary: the quantizer reads the file
    if ranges.for_another_graph(src.checksums):
        raise QuantizationError(f"{opts.ranges or ranges_file}: calibrated for another graph (checksum differs)")
    progress.stage(f"quantizing {len(chosen)} linear layers to INT8 Q/DQ ({opts.method} ranges)")
    return static_int8(load_graph(src.model), chosen, ranges), {
        "form": "QDQ", "weights": "int8 per-channel symmetric (axis 1 of each (K, N) weight)",
        "activations": "int8 per-tensor symmetric", "ranges_file": RANGES_FILE, "calibration": ranges.settings,
        "runs_on": _runs_on("int8"),
    }


def _int8_dynamic(opts, src: _Source, out_dir, split, chosen, progress):
    from calibration.quantize import dynamic_int8

    progress.stage(f"quantizing {len(chosen)} linear layers to dynamic INT8")
    return dynamic_int8(src.model, chosen, out_dir), {
        "form": "dynamic (DynamicQuantizeLinear + MatMulInteger)", "weights": "int8 per-channel symmetric",
        "activations": "uint8 per-tensor, computed at run time", "runs_on": _runs_on("int8-dynamic"),
    }


def _int4(opts, src: _Source, out_dir, split, chosen, progress):
    from calibration.int4 import int4_weight_only

    progress.stage(f"quantizing {len(chosen)} linear layers to INT4 (MatMulNBits, block {opts.block_size})")
    proto = int4_weight_only(load_graph(src.model), chosen, opts.block_size, opts.int4_symmetric,
                             opts.int4_accuracy_level)
    return proto, {
        "form": "MatMulNBits", "runs_on": _runs_on("int4"),
        "weights": f"int4 blocks of {opts.block_size} along K, "
                   + ("symmetric" if opts.int4_symmetric else "with zero points"),
    }


def _runs_on(precision: str):
    """The manifest's ``runs_on`` for a precision, from runtime.manifest.PRECISION_TABLE (a JSON list)."""
    return list(PRECISION_TABLE[precision].runs_on)


_CONVERTERS = {"fp16": _fp16, "int8": _int8, "int8-dynamic": _int8_dynamic, "int4": _int4}


def _convert(opts: QuantizeOptions, src: _Source, out_dir: str, split: DataSplit, progress,
             calibrator=None) -> Dict[str, Any]:
    """Write the converted graph into ``out_dir``; returns the quantization record for the manifest."""
    record: Dict[str, Any] = {"precision": opts.precision, "settings": opts.settings(),
                              "source_bundle": os.path.abspath(src.dir), "source_model_sha256": src.checksums.model}
    chosen = []
    if opts.precision != "fp16":  # fp16 converts everything; the others choose linear layers
        linears = find_linears(load_graph(src.model, with_weights=False))
        chosen, kept = select(linears, opts.keep_float, src.spec.num_layers)
        record["quantized_linears"] = [lin.name for lin in chosen]
        record["float_linears"] = [lin.name for lin in kept]
    if opts.streaming:
        return _convert_streamed(opts, src, out_dir, split, chosen, record, progress, calibrator)
    proto, details = _CONVERTERS[opts.precision](opts, src, out_dir, split, chosen, progress)
    record.update(details)
    if opts.precision != "fp16":
        table = embedding_to_fp16(proto) if opts.embedding == "fp16" else None
        record["embedding"] = "fp16 (cast to fp32 after the Gather)" if table else "fp32"
    record["contrib_ops"] = contrib_ops(proto)
    record["opset"] = default_opset(proto)
    record["files"] = save_graph(proto, out_dir)
    if keeps_fused(src.manifest, opts.precision):
        del proto
        ranges = read_ranges(os.path.join(out_dir, RANGES_FILE), method=opts.method) if opts.precision == "int8" \
            else None
        progress.stage("quantizing the fused onnxruntime graph the same way")
        record["fused_graph"] = convert_fused(opts, src.dir, src.manifest, out_dir, chosen, ranges)
    return record


def _convert_streamed(opts: QuantizeOptions, src: _Source, out_dir: str, split: DataSplit, chosen, record,
                      progress, calibrator=None) -> Dict[str, Any]:
    """``_convert`` one weight at a time: the same graph and weights (calibration.stream_quant), a peak of one
    weight's working set. Static INT8 calibrates with ``calibrator`` where given (the CLI passes the exporter's
    layer-streaming PyTorch reference, exporter.stream_calibrate.bundle_calibrator), else on an onnxruntime session
    holding the whole fp32 graph (calibration.ranges)."""
    from calibration.stream_quant import ConverterChoice, form_record, make_converter
    from calibration.stream_write import BundleReader, read_only_once, write_streamed

    reader = BundleReader(src.model)
    choice = ConverterChoice(opts.precision, block_size=opts.block_size, int4_symmetric=opts.int4_symmetric,
                             int4_accuracy_level=opts.int4_accuracy_level, embedding_fp16=opts.embedding == "fp16",
                             work_dir=out_dir)
    if opts.precision == "int8":
        ranges_file = os.path.join(out_dir, RANGES_FILE)
        if opts.ranges:
            shutil.copyfile(opts.ranges, ranges_file)
        else:
            settings = {"samples": len(split.calibration), "seq_len": opts.calib_seq_len, "seed": opts.calib_seed,
                        "data": opts.calib_data}
            if calibrator is not None:  # a float model that streams too (the CLI: the exporter's layer reference)
                progress.stage(f"calibrating on {len(split.calibration)} samples, streaming the float model")
                ranges = calibrator(src.spec, src.model, split.calibration, chosen, opts, settings, progress)
                ranges.model_sha256, ranges.data_sha256 = src.checksums.model, src.checksums.data
            else:
                progress.stage(f"calibrating on {len(split.calibration)} samples: prefill + {opts.decode_steps} "
                               f"cached decode steps per batch of {opts.calib_batch}")
                ranges = calibrate(src.model, src.spec, split.calibration, [lin.activation for lin in chosen],
                                   opts.method, opts.percentile, opts.calib_batch, opts.decode_steps, opts.threads,
                                   out_dir, progress, settings=settings, checksums=src.checksums)
            write_ranges(ranges_file, ranges)
        choice.ranges = read_ranges(ranges_file, method=opts.method)
        if choice.ranges.for_another_graph(src.checksums):
            raise QuantizationError(f"{opts.ranges or ranges_file}: calibrated for another graph (checksum differs)")
        record["calibration"] = choice.ranges.settings
    record.update(form_record(opts.precision, opts.block_size, opts.int4_symmetric))
    converter = make_converter(choice, chosen)
    proto = load_graph(src.model, with_weights=False)
    replaced: Dict[str, Any] = {}
    fused = keeps_fused(src.manifest, opts.precision)
    progress.stage(f"writing {opts.precision} weights tensor by tensor")
    record["streamed"] = {k: round(v, 2) if isinstance(v, float) else v
                          for k, v in write_streamed(proto, out_dir, read_only_once(reader.graph_array), converter,
                                                     progress, replaced=replaced, fused=fused).items()}
    if opts.precision != "fp16":
        record["embedding"] = "fp16 (cast to fp32 after the Gather)" if converter.embedding else "fp32"
    record["contrib_ops"] = contrib_ops(proto)
    record["opset"] = default_opset(proto)
    record["files"] = [MODEL_FILE] + ([DATA_FILE] if os.path.exists(os.path.join(out_dir, DATA_FILE)) else [])
    del proto
    if fused:
        progress.stage("rewiring the fused onnxruntime graph onto the quantized tensors")
        record["fused_graph"] = rewire_fused(src.dir, src.manifest, set(reader.inits), out_dir, replaced,
                                             opts.precision)
    return record


def quantize_bundle(src_dir: str, out_dir: str, opts: QuantizeOptions, progress=None,
                    source: Optional[Manifest] = None, calibrator=None,
                    plan: Optional[str] = None) -> QuantizeResult:
    """Convert the fp32 bundle ``src_dir`` into ``out_dir`` (an empty directory); see the module docstring.

    ``source`` is the manifest :func:`check_quantize` returned for ``src_dir`` and these options, where the caller
    has run it already (the CLI does, before it creates --out); None runs it here. ``calibrator`` (streaming
    static INT8 only): (spec, model path, sequences, linears, opts, settings, progress) -> CalibrationRanges.
    ``plan`` (the CLI's memory plan, one line) is the first progress stage once the inputs have been read, so a bad
    input is still the only line a failed run shows.
    """
    progress = progress or NullProgress()
    start = time.perf_counter()
    manifest = source if source is not None else check_quantize(src_dir, opts)
    spec = manifest.spec
    src_model = os.path.join(src_dir, manifest.model_file)
    src = _Source(src_dir, manifest, src_model, graph_checksums(src_model, manifest.files))
    split, tokenizer = _data(opts, src_dir, spec)
    if plan:
        progress.stage(plan)

    record = _convert(opts, src, out_dir, split, progress, calibrator)
    graph_files = record.pop("files")
    fused = record.pop("fused_graph", None)
    graph_files += fused.pop("files") if fused else []
    if fused and opts.kv_cache == "int8":  # before the checksums: the fused graph file changes
        fused.update(write_int8_kv_cache(out_dir, spec, split.calibration, opts.threads, progress))
    copied = copy_side_files(src_dir, out_dir, manifest.tokenizer_files)
    extra_files = [RANGES_FILE] if os.path.isfile(os.path.join(out_dir, RANGES_FILE)) else []
    kv = KV_DTYPE_OF_PRECISION[opts.precision]
    new = Manifest(
        spec=spec,
        precision=opts.precision,
        inputs=gc.graph_inputs(spec, kv),
        outputs=gc.graph_outputs(spec, kv),
        model_file=graph_files[0],
        opset=record.pop("opset", manifest.opset),
        tool_version=__version__,
        source=dict(manifest.source, quantized_from=os.path.abspath(src_dir)),
        files=record_files(out_dir, graph_files + copied + extra_files),
        tokenizer_files=[f for f in copied if f != "config.json"],
        verification={},
        extra={"quantization": record},
        graphs={GRAPH_FUSED: fused} if fused else {},
    )

    report = None
    if opts.evaluate:
        progress.stage(f"measuring accuracy on {len(split.heldout)} held-out samples against the fp32 bundle")
        # the new bundle's tokenizer files are copies of the source's: the tokenizer _data loaded gives the prefix
        report = _evaluate(out_dir, new, src_dir, manifest, split.heldout, opts.threads, progress,
                           prefix=len(tokenizer.prefix_ids()) if tokenizer is not None else None)
        new.extra["accuracy"] = dict(report.to_dict(), data=opts.eval_data or opts.calib_data,
                                     heldout="separate file" if opts.eval_data else "held out from calibration data",
                                     reference="fp32 source bundle",
                                     bounds=_enforce_bounds(opts, report))
        if fused:
            progress.stage("measuring the fused graph's accuracy on the same samples")
            fused_report = _evaluate(out_dir, new, src_dir, manifest, split.heldout, opts.threads, progress,
                                     prefix=len(tokenizer.prefix_ids()) if tokenizer is not None else None,
                                     graph=GRAPH_FUSED)
            new.extra["accuracy_fused"] = dict(fused_report.to_dict(), reference="fp32 source bundle")
    else:
        new.extra["accuracy"] = {"skipped": "--no-eval"}
    write_manifest(out_dir, new)  # once, complete: the evaluation ran from the manifest in memory
    source_bytes = sum(rec.get("bytes", 0) for name, rec in manifest.files.items()
                       if name.startswith(os.path.splitext(manifest.model_file)[0]))
    file_bytes = {name: rec["bytes"] for name, rec in new.files.items()}
    return QuantizeResult(os.path.abspath(out_dir), new, report, file_bytes, source_bytes,
                          time.perf_counter() - start, record)


# ------------------------------------------------------------------------------------------------ evaluation


def _enforce_bounds(opts: QuantizeOptions, report: acc.AccuracyReport) -> Dict[str, Any]:
    """The manifest's record of the precision's accuracy bounds (runtime/tolerances.py ACCURACY_BOUNDS) and which
    the report breaks; AccuracyBoundError, before anything is written, when it breaks one and the user did not
    accept the loss."""
    limits = dict(acc.accuracy_bounds().get(opts.precision, {}))
    broken = acc.check_bounds(opts.precision, report)
    if broken and not opts.accept_accuracy_loss:
        raise AccuracyBoundError(
            f"--precision {opts.precision}: measured accuracy breaks runtime/tolerances.py ACCURACY_BOUNDS: "
            f"{'; '.join(broken)}; nothing written (--accept-accuracy-loss writes it anyway and records it)"
        )
    record: Dict[str, Any] = {"limits": limits, "broken": broken}
    if broken:
        record["accepted"] = "--accept-accuracy-loss"
    return record



def _evaluate(model_dir: str, manifest: Manifest, reference_dir: str, ref_manifest: Manifest,
              sequences: Sequence[Sequence[int]], threads: Optional[int], progress,
              prefix: Optional[int] = None, graph: str = GRAPH_PORTABLE) -> acc.AccuracyReport:
    """``evaluate`` with both manifests read; ``prefix`` (the prompt prefix's length) from the model's tokenizer
    unless given."""
    if manifest.spec.to_dict() != ref_manifest.spec.to_dict():
        raise BundleError(f"{model_dir} and {reference_dir} are different models (their specs differ)")
    if prefix is None:
        from runtime.tokenizer import load_tokenizer

        prefix = len(load_tokenizer(model_dir, manifest.spec).prefix_ids())
    backend = acc.open_backend(model_dir, threads, manifest=manifest, graph=graph)[1]
    try:
        reference = acc.open_backend(reference_dir, threads, manifest=ref_manifest)[1]
        try:
            return acc.compare(backend, reference, manifest.spec, sequences, score_from=prefix, progress=progress)
        finally:
            reference.close()
    finally:
        backend.close()


def evaluate(model_dir: str, reference_dir: str, sequences: Sequence[Sequence[int]], threads: Optional[int] = None,
             progress=None) -> acc.AccuracyReport:
    """``model_dir`` against ``reference_dir`` on ``sequences`` (both bundles must share the spec)."""
    return _evaluate(model_dir, read_manifest(model_dir), reference_dir, read_manifest(reference_dir), sequences,
                     threads, progress)


def evaluate_bundles(model_dir: str, reference_dir: str, data: str, seq_len: int = 128, max_samples: int = 0,
                     seed: int = 0, fmt: str = "auto", threads: Optional[int] = None,
                     progress=None, graph: str = GRAPH_PORTABLE) -> acc.AccuracyReport:
    """``glm-export eval``: every usable sample of ``data`` (or a seeded ``max_samples`` of them); ``graph``: which
    of ``model_dir``'s graphs is measured (the reference runs its portable graph)."""
    from runtime.tokenizer import load_tokenizer

    check_threads(threads, "--threads", QuantizationError)
    manifest = read_manifest(model_dir)  # both bundles verified (checksums included) before any work
    ref_manifest = read_manifest(reference_dir)
    tokenizer = load_tokenizer(reference_dir, ref_manifest.spec)
    sequences = load_eval_sequences(data, tokenizer, ref_manifest.spec, seq_len, max_samples, seed, fmt)
    return _evaluate(model_dir, manifest, reference_dir, ref_manifest, sequences, threads, progress, graph=graph)


__all__ = ["QuantizeOptions", "QuantizeResult", "quantize_bundle", "evaluate", "evaluate_bundles", "METHODS",
           "TARGET_PRECISIONS", "check_options", "check_quantize", "check_source"]
