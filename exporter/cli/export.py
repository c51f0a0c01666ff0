"""``glm-export tiny`` and ``glm-export onnx``: make a tiny checkpoint; export a checkpoint to a verified bundle."""
from __future__ import annotations

import json

import click

from exporter.cli.options import int4_form_options, json_option, memory_plan_options, overwrite_option, quiet_option


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--generation", default="chatglm3", show_default=True,
              type=click.Choice(["chatglm1", "chatglm2", "chatglm3", "chatglm3-32k", "glm4", "glm4-0414"]),
              help="chatglm1 is ChatGLM-6B (v1: 2D positions, prefix-LM attention, ice_text tokenizer).")
@click.option("--layout", default="thudm", show_default=True, type=click.Choice(["thudm", "hf"]),
              help="thudm: transformer.encoder.layers.N names; hf: transformers' glm / glm4 names.")
@click.option("--size", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "mid", "0.6b", "1b"]))
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weight dtype on disk (published checkpoints are bfloat16).")
@click.option("--weights-format", default="safetensors", show_default=True,
              type=click.Choice(["safetensors", "sharded", "bin"]))
@click.option("--seed", default=0, show_default=True, type=int)
@overwrite_option
def tiny(out_dir, generation, layout, size, dtype, weights_format, seed, overwrite):
    """Write a small random ChatGLM checkpoint (published config shape, real tokenizer) to try the tool."""
    from exporter.staging import staged_directory
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    with staged_directory(out_dir, overwrite, checkpoint_stamp=True) as tmp:
        write_tiny_checkpoint(tmp, generation=generation, layout=layout, size=size, seed=seed,
                              weight_format=weights_format, dtype=dtype)
    click.echo(f"wrote {generation} ({layout} layout, {size}) checkpoint to {out_dir}")


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Checkpoint directory (config.json + weights).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--precision", default=None, type=click.Choice(["fp32", "fp16", "int8-dynamic", "int8", "int4"]),
              help="Bundle precision, written straight from the checkpoint one tensor at a time (default fp32). "
                   "int8 calibrates on --calib-data.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run prefill + 3 cached decode steps in onnxruntime and compare with PyTorch.")
@overwrite_option
@click.option("--rope-scaling", type=click.Choice(["interpolation", "base"]), default=None,
              help="How THUDM's rope_ratio applies (default: detected; ChatGLM2-32k interpolates, ChatGLM3-32k/GLM-4 scale the base).")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 21))
@click.option("--fp16", is_flag=True, help="Same as --precision fp16 (norms, softmax, rotary and logits stay fp32).")
@click.option("--generation", type=click.Choice(["chatglm1", "chatglm2", "chatglm3", "glm4", "glm4-0414"]),
              default=None, help="Override the detected model family (when the checkpoint's signals disagree).")
@click.option("--prefix", "prefix_dir", type=click.Path(), default=None,
              help="P-tuning v2 output directory (prefix encoder + config.json with pre_seq_len) for this base.")
@click.option("--lora", "lora", multiple=True, type=click.Path(),
              help="PEFT LoRA adapter directory to merge (repeatable; applied in order).")
@click.option("--lora-scale", default=1.0, show_default=True, type=float,
              help="Multiplies every adapter's lora_alpha / r.")
@click.option("--keep-checkpoint-quantization", is_flag=True,
              help="THUDM int4/int8 checkpoints: keep their integers and scales (as MatMulNBits) "
                   "instead of dequantizing to float.")
@click.option("--keep-float", multiple=True, help="int8/int8-dynamic/int4: linear layers left in float (see quantize).")
@int4_form_options
@click.option("--int4-accuracy-level", default=4, show_default=True, type=int, help="int4: MatMulNBits compute type.")
@click.option("--embedding", default="fp16", show_default=True, help="int8/int8-dynamic/int4: embedding fp16 | fp32.")
@click.option("--calib-data", default=None, help="int8: calibration text (see quantize).")
@click.option("--calib-samples", default=128, show_default=True, type=int)
@click.option("--calib-seq-len", default=128, show_default=True, type=int)
@click.option("--method", default="minmax", show_default=True, help="int8 ranges: minmax | entropy | percentile.")
@memory_plan_options
@click.option("--in-memory", is_flag=True, hidden=True,
              help="The whole-model flow (fp32/fp16 only), kept for comparison benchmarks.")
@json_option()
@quiet_option
def onnx(model_dir, out_dir, precision, verify, overwrite, rope_scaling, opset, fp16, generation, prefix_dir, lora,
         lora_scale, keep_checkpoint_quantization, keep_float, block_size, int4_symmetric, int4_accuracy_level,
         embedding, calib_data, calib_samples, calib_seq_len, method, dry_run, memory_available, in_memory, as_json,
         quiet):
    """Export a ChatGLM checkpoint to a verified ONNX bundle with a KV cache."""
    from exporter.memory_plan import parse_bytes
    from exporter.onnx_export import export_bundle
    from exporter.stream_export import StreamOptions, export_streamed
    from runtime.progress import TqdmProgress

    precision = precision or ("fp16" if fp16 else "fp32")
    options = StreamOptions(
        keep_float=tuple(keep_float), block_size=block_size, int4_symmetric=int4_symmetric,
        int4_accuracy_level=int4_accuracy_level, embedding=embedding, calib_data=calib_data,
        calib_samples=calib_samples, calib_seq_len=calib_seq_len, method=method,
        memory_available=parse_bytes(memory_available, "--memory-available") if memory_available else None,
    )
    if dry_run:
        plan = export_streamed(model_dir, out_dir, precision, verify=verify, rope_scaling=rope_scaling,
                               options=options, plan_only=True)
        click.echo(json.dumps(plan.to_dict()) if as_json else plan.summary())
        return
    result = export_bundle(model_dir, out_dir, verify=verify, overwrite=overwrite, rope_scaling=rope_scaling,
                           opset=opset, progress=TqdmProgress(enabled=not quiet and not as_json),
                           precision=precision, generation=generation, prefix_dir=prefix_dir, lora=lora,
                           lora_scale=lora_scale, keep_checkpoint_quantization=keep_checkpoint_quantization,
                           streaming=not in_memory, stream_options=options)
    if as_json:
        click.echo(json.dumps({
            "bundle": result.bundle_dir,
            "generation": result.manifest.spec.generation,
            "precision": result.manifest.precision,
            "params": result.num_params,
            "file_bytes": result.file_bytes,
            "max_abs_diff": result.max_diffs,
            "seconds": round(result.seconds, 3),
        }))
    else:
        click.echo(result.summary())
