"""Command-line options more than one command takes, each defined once (the commands' modules apply them).

Help texts, flags and defaults here are what ``glm-export COMMAND --help`` shows; a command that needs other wording
passes it (``json_option``). Each decorator adds its options in the order listed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import click

from exporter.cli.user_values import text_value, threads_value

# ---------------------------------------------------------------------------------------------------- every command

overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress output.")


def json_option(help: str = "Print the result as one JSON object.") -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=help)


def memory_plan_options(f: Callable) -> Callable:
    """``--dry-run`` and ``--memory-available``: the memory plan of ``onnx`` and ``quantize`` (exporter/memory_plan.py)."""
    f = click.option("--memory-available", default=None,
                     help="Memory to plan against (e.g. 12G) instead of the detected MemAvailable / cgroup limit.")(f)
    return click.option("--dry-run", is_flag=True, help="Print the memory plan (estimated peak RSS, disk) and stop.")(f)


def threads_option(help: str = "onnxruntime intra-op threads (1 to the cores here).") -> Callable:
    return click.option("--threads", type=int, default=None, callback=threads_value, help=help)


# ---------------------------------------------------------------------------------------------------- run, chat, bench

PROVIDER_CHOICES = ("cpu", "cuda", "tensorrt")
BACKEND_CHOICES = ("onnxruntime", "tensorrt")


def model_options(f: Callable) -> Callable:
    """--model and how to run it (backend, provider, device, threads, prefill chunk, TensorRT provider sizes):
    run, chat and bench."""
    options = [
        click.option("--model", "bundle", required=True, type=click.Path(),
                     help="Bundle directory written by 'glm-export onnx' (manifest, tokenizer; the graph for "
                          "onnxruntime)."),
        click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=None,
                     help="onnxruntime runs the bundle's graph; tensorrt runs a native engine (--engine) "
                          "[default: tensorrt with --engine, else onnxruntime]."),
        click.option("--engine", "engine_dir", type=click.Path(), default=None, metavar="ENGINE_DIR",
                     help="--backend tensorrt: engine built from --model by 'glm-export trt --model BUNDLE_DIR "
                          "--out ENGINE_DIR'."),
        click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default=None,
                     help="onnxruntime execution provider (cuda/tensorrt need onnxruntime-gpu) [default: cpu]."),
        click.option("--device", type=click.IntRange(min=0), default=None,
                     help="CUDA device for --provider cuda/tensorrt or --backend tensorrt [default: 0]."),
        threads_option("onnxruntime intra-op threads, 1 to the cores here (default: onnxruntime's choice)."),
        click.option("--graph", type=click.Choice(("auto", "fused", "portable")), default=None,
                     help="onnxruntime: the bundle's fused graph (contrib ops, shared-buffer cache) or its portable "
                          "one (standard ops) [default: auto: fused when the bundle has one, portable for "
                          "--provider tensorrt]."),
        click.option("--prefill-chunk", type=click.IntRange(min=0), default=None,
                     help="Prompt tokens per prefill pass (bounds memory on long prompts; 0: all at once) "
                          "[default: 256 on onnxruntime, at most --max-input-len with --provider tensorrt; "
                          "the whole prompt on --backend tensorrt]."),
        click.option("--max-batch", type=int, default=None, metavar="N",
                     help="--provider tensorrt: most rows per step in the provider's profile [default: 1]."),
        click.option("--max-input-len", type=int, default=None, metavar="N",
                     help="--provider tensorrt: most tokens per forward (prompt chunk) [default: half of "
                          "--max-seq-len]."),
        click.option("--max-seq-len", type=int, default=None, metavar="N",
                     help="--provider tensorrt: longest prompt + generated sequence, the generation's context "
                          "[default: 2048, or the model's context when shorter]."),
        click.option("--trt-fp16", is_flag=True, default=None,
                     help="--provider tensorrt: let TensorRT use FP16 kernels on an fp32 bundle (fp16 bundles "
                          "always)."),
        click.option("--verify-files/--no-verify-files", default=True, show_default=True,
                     help="Check every bundle file against the manifest's sha256 (hashed once, then stamped)."),
        click.option("--trt-cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="--provider tensorrt: keep the provider's engine here, built once and reused "
                          "[default: rebuilt every run]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


MODEL_OPTIONS = ("bundle", "backend", "engine_dir", "provider", "device", "threads", "graph", "prefill_chunk",
                 "max_batch", "max_input_len", "max_seq_len", "trt_fp16", "trt_cache_dir", "verify_files")
EP_OPTIONS = {"max_batch": "--max-batch", "max_input_len": "--max-input-len", "max_seq_len": "--max-seq-len",
              "trt_fp16": "--trt-fp16", "trt_cache_dir": "--trt-cache-dir"}


def pop_model_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in MODEL_OPTIONS}


def sampling_options(f: Callable) -> Callable:
    """--max-new-tokens, --greedy and the sampling options: run and chat."""
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Most tokens to generate [default: 128 for run, 1024 per chat turn]."),
        click.option("--greedy", is_flag=True, help="Always take the most likely token (no sampling options)."),
        click.option("--temperature", type=float, default=None, help="Sample; divide logits by T > 0."),
        click.option("--top-k", type=int, default=None, help="Sample from the K most likely tokens (0: all)."),
        click.option("--top-p", type=float, default=None, help="Sample from the smallest set with mass >= P."),
        click.option("--repetition-penalty", type=float, default=None, help="CTRL penalty R > 0 on seen tokens."),
        click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output)."),
        click.option("--stop", multiple=True, callback=text_value,
                     help="Stop when the text contains this string (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# ---------------------------------------------------------------------------------------------------- trt, check

SIZE_HELP = {
    "max_batch": "Most rows per step [default: 1].",
    "max_input_len": "Longest prompt, in tokens [default: half of --max-seq-len].",
    "max_seq_len": "Longest prompt + generated sequence [default: 2048, or the model's context when shorter].",
    "opt_batch": "Batch TensorRT tunes for [default: 1].",
    "opt_seq": "Prompt length TensorRT tunes for (decode: cached tokens) [default: half of --max-input-len].",
}
SIZE_OPTIONS = ("max_batch", "max_input_len", "max_seq_len", "opt_batch", "opt_seq")


def size_options(f: Callable) -> Callable:
    """The engine sizes (--max-batch, --max-input-len, --max-seq-len, --opt-batch, --opt-seq): trt and check."""
    # plain int (not IntRange): out-of-range sizes are refused by ProfileRequest with a one-line message
    for name in reversed(SIZE_OPTIONS):
        flag = "--" + name.replace("_", "-")
        f = click.option(flag, name, type=int, default=None, metavar="N", help=SIZE_HELP[name])(f)
    return f


def pop_sizes(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in SIZE_OPTIONS}


# ---------------------------------------------------------------------------------------------------- onnx, quantize


def int4_form_options(f: Callable) -> Callable:
    """``--block-size`` and ``--int4-symmetric/--int4-asymmetric``: the INT4 form (defaults: calibration/defaults.py,
    where the measurements behind them are)."""
    from calibration.defaults import INT4_BLOCK_SIZE, INT4_SYMMETRIC

    f = click.option("--int4-symmetric/--int4-asymmetric", default=INT4_SYMMETRIC, show_default=True,
                     help="int4: blocks without zero points (symmetric) or with them.")(f)
    return click.option("--block-size", default=INT4_BLOCK_SIZE, show_default=True, type=int,
                        help="int4: weights per quantization block along K.")(f)
