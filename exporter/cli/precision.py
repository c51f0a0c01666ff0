"""``glm-export quantize`` and ``glm-export eval``: thin commands over ``calibration.pipeline``.

Each command parses its options, calls one library function, prints. Option values are checked by the library, so a
bad one (an unknown --precision, --calib-samples 0, a missing calibration file) is a typed error printed on one
line by the command group (exit 2). ``quantize`` writes into a staged directory, so a failure leaves nothing at
--out. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import json

import click

from exporter.cli.options import (int4_form_options, json_option, memory_plan_options, overwrite_option, quiet_option,
                                  threads_option)

PRECISION_HELP = "fp16 | int8 (static Q/DQ, calibrated) | int8-dynamic | int4 (weight-only MatMulNBits)."


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="fp32 bundle written by 'glm-export onnx'.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--precision", required=True, help=PRECISION_HELP)
@click.option("--calib-data", default=None,
              help='Text file (one sample per line) or JSONL ({"text": ...} or {"messages": [...]} per line). '
                   "A seeded part is held out for the accuracy report; int8 calibrates on the rest.")
@click.option("--calib-format", default="auto", show_default=True, help="auto | text | jsonl.")
@click.option("--calib-samples", default=128, show_default=True, type=int, help="Samples to calibrate on (at most).")
@click.option("--calib-seq-len", default=128, show_default=True, type=int, help="Tokens per sample (longer ones cut).")
@click.option("--calib-seed", default=0, show_default=True, type=int, help="Seed of the sample choice and split.")
@click.option("--method", default="minmax", show_default=True, help="int8 ranges: minmax | entropy | percentile.")
@click.option("--percentile", default=99.99, show_default=True, type=float, help="With --method percentile.")
@click.option("--keep-float", multiple=True,
              help="Linear layers to leave in float (repeatable): lm_head, first, last, mlp_down, attention, mlp, "
                   "or a pattern such as 'layers.11.*'.")
@click.option("--ranges", "ranges_file", default=None,
              help="int8: quantize with this calibration_ranges.json instead of calibrating.")
@click.option("--calib-batch", default=4, show_default=True, type=int, help="Sequences per calibration batch.")
@click.option("--decode-steps", default=8, show_default=True, type=int,
              help="Cached single-token decode steps calibrated after each prefill.")
@int4_form_options
@click.option("--int4-accuracy-level", default=4, show_default=True, type=int,
              help="int4: MatMulNBits compute type (0 auto, 1 fp32, 4 int8: fastest on CPU).")
@click.option("--embedding", default="fp16", show_default=True,
              help="int8/int8-dynamic/int4: store the embedding table as fp16 | fp32.")
@click.option("--kv-cache", default="float32", show_default=True,
              help="The fused graph's KV cache: float32 | int8 (a quarter of the memory, faster at long contexts; "
                   "scales calibrated on --calib-data; the portable graph keeps float32).")
@click.option("--eval/--no-eval", "evaluate", default=True, show_default=True,
              help="Measure perplexity, top-1 agreement and KL against the fp32 bundle and record them.")
@click.option("--eval-data", default=None, help="Evaluate on this file instead of held-out calibration text.")
@click.option("--eval-samples", default=64, show_default=True, type=int, help="Held-out samples to evaluate (at most).")
@threads_option()
@click.option("--accept-accuracy-loss", is_flag=True,
              help="Write the bundle even when its measured accuracy breaks the bounds of runtime/tolerances.py "
                   "(the manifest records it); without it such a bundle is an error and nothing is written.")
@overwrite_option
@memory_plan_options
@click.option("--in-memory", is_flag=True, hidden=True,
              help="Convert the whole graph in memory (the earlier flow), kept for comparison benchmarks.")
@json_option()
@quiet_option
def quantize(model_dir, out_dir, precision, calib_data, calib_format, calib_samples, calib_seq_len, calib_seed,
             method, percentile, keep_float, ranges_file, calib_batch, decode_steps, block_size,
             int4_symmetric, int4_accuracy_level, embedding, kv_cache, evaluate, eval_data, eval_samples, threads,
             accept_accuracy_loss, overwrite, dry_run, memory_available, in_memory, as_json, quiet):
    """Convert an fp32 bundle to fp16, INT8 (static or dynamic) or INT4, and record what it cost in accuracy."""
    from calibration.pipeline import QuantizeOptions, check_quantize, quantize_bundle
    from exporter.staging import check_destination, input_pairs, staged_directory
    from runtime.progress import TqdmProgress

    opts = QuantizeOptions(
        precision=precision, calib_data=calib_data, calib_format=calib_format, calib_samples=calib_samples,
        calib_seq_len=calib_seq_len, calib_seed=calib_seed, method=method, percentile=percentile,
        keep_float=tuple(keep_float), ranges=ranges_file, calib_batch=calib_batch,
        decode_steps=decode_steps, block_size=block_size, int4_symmetric=int4_symmetric,
        int4_accuracy_level=int4_accuracy_level, embedding=embedding, evaluate=evaluate, eval_data=eval_data,
        eval_samples=eval_samples, threads=threads, accept_accuracy_loss=accept_accuracy_loss,
        streaming=not in_memory, kv_cache=kv_cache,
    )
    inputs = input_pairs(model=model_dir, calib_data=calib_data, ranges=ranges_file, eval_data=eval_data)
    check_destination(out_dir, overwrite, inputs=inputs)  # before any work
    source = check_quantize(model_dir, opts)  # before anything is created at --out
    if not in_memory:
        from exporter.memory_plan import check_plan, parse_bytes, plan_export

        plan = plan_export(source.spec, precision, verify=evaluate, embedding_fp16=embedding == "fp16",
                           block_size=block_size, calibrate=precision == "int8" and not ranges_file,
                           from_bundle=True, kv_calibrate=kv_cache == "int8")
        if dry_run:
            click.echo(json.dumps(plan.to_dict()) if as_json else plan.summary())
            return
        check_plan(plan, out_dir, parse_bytes(memory_available, "--memory-available") if memory_available else None)
    with staged_directory(out_dir, overwrite, inputs=inputs) as tmp:
        from exporter.stream_calibrate import bundle_calibrator_for

        # only static INT8 calibrates; asking for the calibrator imports torch (0.2 GB resident), which the other
        # precisions never need
        calibrate = not in_memory and precision == "int8" and not ranges_file
        result = quantize_bundle(model_dir, tmp, opts, progress=TqdmProgress(enabled=not quiet and not as_json),
                                 source=source, calibrator=bundle_calibrator_for(source.spec) if calibrate else None,
                                 plan=None if in_memory else plan.summary())
    result.bundle_dir = out_dir
    if as_json:
        click.echo(json.dumps({
            "bundle": result.bundle_dir,
            "precision": result.manifest.precision,
            "file_bytes": result.file_bytes,
            "source_model_bytes": result.source_bytes,
            "accuracy": result.accuracy.to_dict() if result.accuracy else None,
            "quantization": result.manifest.extra.get("quantization", {}),
            "seconds": round(result.seconds, 3),
        }, ensure_ascii=False))
    else:
        click.echo(result.summary())


@click.command(name="eval")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Bundle to measure.")
@click.option("--reference", "reference_dir", required=True, type=click.Path(), help="The fp32 bundle it came from.")
@click.option("--data", required=True, help="Held-out text: one sample per line, or JSONL with text / messages.")
@click.option("--format", "fmt", default="auto", show_default=True, help="auto | text | jsonl.")
@click.option("--samples", default=0, show_default=True, type=int, help="Evaluate a seeded choice of N samples (0: all).")
@click.option("--seq-len", default=128, show_default=True, type=int, help="Tokens per sample (longer ones cut).")
@click.option("--seed", default=0, show_default=True, type=int)
@threads_option()
@json_option("Print the figures as one JSON object.")
@quiet_option
def eval_(model_dir, reference_dir, data, fmt, samples, seq_len, seed, threads, as_json, quiet):
    """Perplexity of both bundles, top-1 agreement, mean KL divergence and max logit difference on held-out text."""
    from calibration.pipeline import evaluate_bundles
    from runtime.progress import TqdmProgress

    report = evaluate_bundles(model_dir, reference_dir, data, seq_len=seq_len, max_samples=samples, seed=seed,
                              fmt=fmt, threads=threads, progress=TqdmProgress(enabled=not quiet and not as_json))
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), model=model_dir, reference=reference_dir, data=data)))
    else:
        click.echo(f"{model_dir} vs {reference_dir}: {report.summary()}")


