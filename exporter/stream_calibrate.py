"""Static-INT8 calibration on the layer-streaming PyTorch reference instead of an onnxruntime session.

Where it stands: what ``glm-export onnx --precision int8`` (no float bundle exists) and the streaming
``glm-export quantize --precision int8`` run in place of ``calibration.ranges.calibrate``, whose onnxruntime session
holds the whole fp32 model (4 bytes a parameter, plus the extra outputs). The feeds are the same
(``calibration.feeds``: length-sorted left-padded batches, a prefill, then ``decode_steps`` teacher-forced decode
steps on the cache), the statistics the same (``calibration.ranges.StatsCollector``, real positions only), and the
result the same ``CalibrationRanges``; each linear layer's input is observed in PyTorch (exporter/model.py's
``Linear``), which is the tensor the graph's MatMul reads, so the figures agree with onnxruntime's to float rounding.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from runtime.steps import left_pad, token_feeds

from calibration.feeds import batches_by_length, decode_step_count
from calibration.ranges import HISTOGRAM_BINS, CalibrationRanges, StatsCollector, check_method
from calibration.targets import Linear


def calibration_batches(spec, sequences: Sequence[Sequence[int]], batch_size: int, decode_steps: int) -> List[list]:
    """The step feeds of ``calibration.feeds.run_batch`` for every batch, without running anything (the next
    step's tokens come from the text, not from the model)."""
    batches = []
    for batch in batches_by_length(sequences, batch_size):
        ids, mask, positions = left_pad(batch, spec.pad_token_id)  # (B, T)
        split = ids.shape[1] - decode_step_count(batch, decode_steps)
        steps = [token_feeds(ids[:, :split], mask[:, :split], positions[:, :split])]
        for col in range(split, ids.shape[1]):
            steps.append(token_feeds(ids[:, col: col + 1], mask[:, : col + 1], positions[:, col: col + 1]))
        batches.append(steps)
    return batches


def calibrate_streamed(spec, reader, sequences: Sequence[Sequence[int]], linears: Sequence[Linear],
                       method: str, percentile: float, batch_size: int, decode_steps: int,
                       settings: Optional[Dict[str, Any]] = None, progress=None) -> CalibrationRanges:
    """Ranges of every chosen linear layer's input (keyed by the graph tensor it reads, as
    ``calibration.ranges.calibrate`` keys them)."""
    from exporter.stream_reference import StreamingReference

    check_method(method, percentile)
    by_name = {lin.name: lin.activation for lin in linears}
    collector = StatsCollector(list(by_name.values()))

    def observe(name, x, real):
        tensor = by_name.get(name)
        if tensor is not None:
            collector.update(tensor, x.float().numpy(), real)

    start = time.perf_counter()
    batches = calibration_batches(spec, sequences, batch_size, decode_steps)
    StreamingReference(spec, reader, progress=progress).run(batches, observe=observe, logits=False)
    n_steps = sum(len(b) for b in batches)
    n_tokens = int(sum(int((f["attention_mask"][:, -f["input_ids"].shape[1]:] > 0).sum()) for b in batches
                       for f in b))
    record = dict(settings or {})
    record.update({"steps": n_steps, "tokens": n_tokens, "batch_size": batch_size, "decode_steps": decode_steps,
                   "percentile": percentile, "histogram_bins": HISTOGRAM_BINS, "float_model": "layer-streaming pytorch",
                   "seconds": round(time.perf_counter() - start, 2)})
    return CalibrationRanges(method=method, tensors=collector.ranges(percentile), settings=record)


def bundle_calibrator(spec, model_path, sequences, linears, opts, settings, progress):
    """``calibration.pipeline.quantize_bundle``'s ``calibrator``: streamed calibration over an fp32 bundle's
    weights."""
    from exporter.stream_source import BundleTensors

    return calibrate_streamed(spec, BundleTensors(model_path), sequences, linears, opts.method, opts.percentile,
                              opts.calib_batch, opts.decode_steps, settings=settings, progress=progress)


def bundle_calibrator_for(spec):
    """``bundle_calibrator`` where the layer-streaming reference runs the bundle's model; None (onnxruntime's
    whole-graph calibration, ``calibration.ranges.calibrate``) for the forms it does not run: ChatGLM-6B's v1 block
    and a P-tuning v2 prefix (the same rule as ``exporter.checkpoint_forms.CheckpointForms.streaming_blocker``)."""
    import logging

    from exporter.model_v1 import uses_v1_block

    if uses_v1_block(spec) or spec.prefix_len:
        logging.getLogger("glm_export").info("static INT8 calibration on onnxruntime (whole fp32 graph): the "
                                             "layer-streaming reference does not run %s",
                                             "the v1 block" if uses_v1_block(spec) else "a P-tuning prefix")
        return None
    return bundle_calibrator


__all__ = ["calibrate_streamed", "calibration_batches", "bundle_calibrator", "bundle_calibrator_for", "np"]
