"""``glm-export run``, ``chat`` and ``bench``: thin commands over ``runtime.api``.

Each command parses its options, calls the runtime, prints. Typed errors (``GlmExportError``) propagate to the
group, which prints them on one line and exits 2; pure option mistakes are ``click.UsageError``. The runtime is
imported inside the command bodies so ``glm-export --help`` stays instant.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Optional

import click

from exporter.cli.options import EP_OPTIONS, json_option, model_options, pop_model_options, sampling_options
from exporter.cli.user_values import flush_stdout, require_stdout, stdin_lines, text_value

# the CLI's spelling of GlmModel.load's parameters, for the runtime's one backend/option rule
CLI_SPELLING_FLAGS = {"backend": "--backend", "engine_dir": "--engine", "provider": "--provider",
                      "device": "--device", "threads": "--threads", "graph": "--graph"}

FP16_ON_CPU = ("note: onnxruntime's CPU provider upcasts fp16 MatMuls on x86 (this fp16 bundle runs at fp32 speed "
               "with fp32-sized weights in memory); int8 (or int4) is the CPU choice, fp16 the GPU/Jetson one")


def load_kwargs(opts: Dict[str, Any], io_binding: bool = True) -> Dict[str, Any]:
    """``GlmModel.load`` keyword arguments from the shared model options (``MODEL_OPTIONS``). Options that do not
    apply to the chosen backend or provider are refused by the runtime's rule
    (``runtime.backend_options.check_backend_options``), named by their flags, rather than ignored."""
    from runtime.backend_options import Spelling, check_backend_options

    backend = opts.get("backend") or ("tensorrt" if opts.get("engine_dir") else "onnxruntime")
    given = {param: [flag] for param, flag in CLI_SPELLING_FLAGS.items()
             if param != "backend" and opts.get(param) is not None}
    given["trt_options"] = [flag for key, flag in EP_OPTIONS.items() if opts.get(key) not in (None, False)]
    if not io_binding:
        given["io_binding"] = ["--no-io-binding"]
    check_backend_options(backend, given, opts.get("provider"), Spelling(CLI_SPELLING_FLAGS))
    kwargs: Dict[str, Any] = {"backend": backend}
    if opts.get("verify_files") is False:  # --no-verify-files
        kwargs["verify_files"] = False
    if opts.get("prefill_chunk") is not None:
        kwargs["prefill_chunk"] = opts["prefill_chunk"]
    if backend == "tensorrt":
        kwargs["engine_dir"] = opts["engine_dir"]
        kwargs["device"] = opts.get("device") or 0
        return kwargs
    provider = opts.get("provider") or "cpu"
    if opts.get("device") is not None:
        provider = f"{provider}:{opts['device']}"
    kwargs.update(provider=provider, threads=opts.get("threads"), io_binding=io_binding)
    if opts.get("graph"):
        kwargs["graph"] = opts["graph"]
    if provider.startswith("tensorrt"):
        from runtime.tensorrt.ep_options import TrtProviderOptions

        kwargs["trt_options"] = TrtProviderOptions(
            max_batch=opts.get("max_batch"), max_input_len=opts.get("max_input_len"),
            max_seq_len=opts.get("max_seq_len"), fp16=bool(opts.get("trt_fp16")), cache_dir=opts.get("trt_cache_dir"),
        )
    return kwargs


def config_from_options(opts: Dict[str, Any], sample_by_default: bool, default_max_new: int,
                        chat_defaults: Optional[Dict[str, float]] = None):
    """A GenerationConfig from the shared sampling options. Any sampling option turns sampling on; --greedy with
    one of them is a usage error. Values are validated by GenerationConfig (SamplingConfigError names the field)."""
    from runtime.sampling import GenerationConfig

    names = ("temperature", "top_k", "top_p", "seed")
    given = [n for n in names if opts.get(n) is not None]
    if opts.get("greedy") and given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(f"--greedy cannot be combined with {flags}")
    do_sample = bool(given) or (sample_by_default and not opts.get("greedy"))
    kwargs: Dict[str, Any] = dict(chat_defaults or {}) if do_sample else {}
    kwargs.update({n: opts[n] for n in given})
    if opts.get("repetition_penalty") is not None:
        kwargs["repetition_penalty"] = opts["repetition_penalty"]
    return GenerationConfig(
        max_new_tokens=opts.get("max_new_tokens") or default_max_new,
        do_sample=do_sample,
        stop=tuple(opts.get("stop") or ()),
        **kwargs,
    )


def _load(opts: Dict[str, Any], io_binding: bool = True):
    from runtime.api import GlmModel

    return GlmModel.load(opts["bundle"], **load_kwargs(opts, io_binding))


def _parse_ids(text: str) -> List[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 1,2,3", param_hint="--prompt-ids") from None
    if not ids:
        raise click.BadParameter("no ids given", param_hint="--prompt-ids")
    return ids


def _status_line(result) -> str:
    t = result.timings
    return (f"[{result.finish_reason}: {len(result.generated_ids)} tokens, prefill {t['prefill_ms']:.1f} ms, "
            f"decode {t['decode_tokens_per_s']:.1f} tokens/s]")


# ---------------------------------------------------------------------------------------------------- run


@click.command()
@model_options
@click.option("--prompt", default=None, callback=text_value,
              help="Prompt text (encoded with the bundle's tokenizer and prompt prefix).")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids, used as given.")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap --prompt in the model's chat format.")
@click.option("--system", default=None, callback=text_value, help="System message (with --chat).")
@sampling_options
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@json_option("Print one JSON object: prompt_ids, generated_ids, text, finish_reason, timings.")
def run(prompt, prompt_ids, as_chat, system, stream, as_json, **sampling):
    """Generate a continuation (or a chat reply) for one prompt."""
    model_opts = pop_model_options(sampling)
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    if as_chat and prompt is None:
        raise click.UsageError("--chat needs --prompt text")
    if system is not None and not as_chat:
        raise click.UsageError("--system needs --chat")
    if stream and as_json:
        raise click.UsageError("--stream and --json cannot be combined")
    ids = _parse_ids(prompt_ids) if prompt_ids is not None else None
    config = config_from_options(sampling, sample_by_default=False, default_max_new=128)
    require_stdout()

    with _load(model_opts) as model:
        if as_chat:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            messages.append({"role": "user", "content": prompt})
            source = model.chat_stream(messages, config)
        else:
            source = model.stream(ids if ids is not None else prompt, config)
        if stream:
            for piece in source:
                if piece.text:
                    click.echo(piece.text, nl=False)
                    flush_stdout()
            click.echo()
        else:
            for _ in source:
                pass
        result = source.result

    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    if not stream:
        click.echo(result.text if result.text is not None else ",".join(str(i) for i in result.generated_ids))
    click.echo(_status_line(result), err=True)


# ---------------------------------------------------------------------------------------------------- chat

CHAT_SAMPLING = {"temperature": 0.8, "top_p": 0.8}  # ChatGLM's own chat defaults


@click.command()
@model_options
@click.option("--system", default=None, callback=text_value,
              help="System message kept at the start of the conversation.")
@sampling_options
def chat(system, **sampling):
    """Talk to the model: one line per turn on stdin; /clear forgets the history, /quit (or end of input) leaves.

    Samples with temperature 0.8 and top-p 0.8 unless --greedy or other sampling options are given.
    """
    from runtime.errors import GenerationError

    model_opts = pop_model_options(sampling)
    config = config_from_options(sampling, sample_by_default=True, default_max_new=1024, chat_defaults=CHAT_SAMPLING)
    start = [{"role": "system", "content": system}] if system is not None else []
    history = list(start)
    require_stdout()
    lines = stdin_lines()
    if sys.stdin is None:
        next(lines)  # raises: stdin is closed
    interactive = sys.stdin.isatty()
    with _load(model_opts) as model:
        model.require_chat()
        while True:
            if interactive:
                click.echo("user> ", nl=False)
            got = next(lines, None)
            if got is None:  # end of input
                break
            text = got[1]
            command = text.strip()
            if not command:
                continue
            if command == "/quit":
                break
            if command == "/clear":
                history = list(start)
                click.echo("(history cleared)")
                continue
            history.append({"role": "user", "content": text})
            click.echo("assistant> ", nl=False)
            try:
                stream = model.chat_stream(history, config)
                for piece in stream:
                    if piece.text:
                        click.echo(piece.text, nl=False)
                        flush_stdout()
            except GenerationError as e:
                history.pop()
                click.echo()
                click.echo(f"error: {e} (/clear starts over)", err=True)
                continue
            click.echo()
            result = stream.result
            history.append({"role": "assistant", "content": result.text or ""})
            if result.finish_reason == "context":
                click.echo("(the context is full; /clear to start over)", err=True)


# ---------------------------------------------------------------------------------------------------- bench


@click.command()
@model_options
@click.option("--prompt-len", "prompt_lens", type=click.IntRange(min=1), multiple=True,
              help="Prompt length in tokens (repeatable) [default: 32].")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Tokens generated per run (eos ignored).")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True,
              help="Batch size (repeatable) [default: 1].")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Measured runs (median).")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Unmeasured runs first.")
@click.option("--io-binding/--no-io-binding", default=True, show_default=True,
              help="Keep the KV cache in onnxruntime between steps (off: plain session.run, for comparison).")
@json_option("Print one JSON object.")
def bench(prompt_lens, new_tokens, batches, runs, warmup, io_binding, as_json, **kwargs):
    """Measure prefill latency, decode tokens/s, per-token latency p50/p90 and peak RSS on random prompts."""
    from runtime.bench import bench_model, peak_rss_mib

    opts = pop_model_options(kwargs)
    require_stdout()
    with _load(opts, io_binding) as model:
        rows = [
            bench_model(model, p, b, new_tokens, runs, warmup)
            for p in (prompt_lens or (32,))
            for b in (batches or (1,))
        ]
        backend = model.backend_name
        provider = getattr(model.backend, "provider", None)
        prefill_chunk = model.prefill_chunk
        graph = getattr(model.backend, "graph_flavour", "portable") if backend == "onnxruntime" else None
        kv_dtype = getattr(model.backend, "kv_dtype", None)
        kv_cache = str(kv_dtype) if kv_dtype is not None else None  # float32, float16 or int8 (--kv-cache int8)
        fp16_on_cpu = model.manifest.precision == "fp16" and backend == "onnxruntime" and provider == "cpu"
    rss = peak_rss_mib()
    if as_json:
        click.echo(json.dumps({"model": opts["bundle"], "backend": backend, "engine": opts["engine_dir"],
                               "provider": provider, "threads": opts["threads"],
                               "io_binding": io_binding if backend == "onnxruntime" else None,
                               "prefill_chunk": prefill_chunk, "results": rows, "peak_rss_mib": rss,
                               "graph": graph, "kv_cache": kv_cache, "note": FP16_ON_CPU if fp16_on_cpu else None}))
        return
    if fp16_on_cpu:
        click.echo(FP16_ON_CPU)
    click.echo(f"{'prompt':>6} {'batch':>5} {'prefill ms':>10} {'tok/s/seq':>9} {'tok/s':>8} "
               f"{'p50 ms':>7} {'p90 ms':>7}")
    for r in rows:
        click.echo(f"{r['prompt_len']:>6} {r['batch']:>5} {r['prefill_ms']:>10.2f} {r['decode_tokens_per_s']:>9.1f} "
                   f"{r['batch_tokens_per_s']:>8.1f} {r['token_latency_p50_ms']:>7.2f} "
                   f"{r['token_latency_p90_ms']:>7.2f}")
    if rss is not None:
        click.echo(f"peak RSS {rss:.0f} MiB")
