"""``glm-export run``, ``chat`` and ``bench``: thin commands over ``runtime.api``.

Each command parses its options, calls the runtime, prints. Typed errors (``GlmExportError``) propagate to the
group, which prints them on one line and exits 2; pure option mistakes are ``click.UsageError``. The runtime is
imported inside the command bodies so ``glm-export --help`` stays instant.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Dict, List, Optional

import click

PROVIDER_CHOICES = ("cpu", "cuda", "tensorrt")
BACKEND_CHOICES = ("onnxruntime", "tensorrt")


# ---------------------------------------------------------------------------------------------------- shared options


def _model_options(f: Callable) -> Callable:
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
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="onnxruntime intra-op threads (default: onnxruntime's choice)."),
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
        click.option("--trt-cache-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="--provider tensorrt: keep the provider's engine here, built once and reused "
                          "[default: rebuilt every run]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


MODEL_OPTIONS = ("bundle", "backend", "engine_dir", "provider", "device", "threads", "graph", "prefill_chunk",
                 "max_batch", "max_input_len", "max_seq_len", "trt_fp16", "trt_cache_dir")
FP16_ON_CPU = ("note: onnxruntime's CPU provider upcasts fp16 MatMuls on x86 (this fp16 bundle runs at fp32 speed "
               "with fp32-sized weights in memory); int8 (or int4) is the CPU choice, fp16 the GPU/Jetson one")
EP_OPTIONS = {"max_batch": "--max-batch", "max_input_len": "--max-input-len", "max_seq_len": "--max-seq-len",
              "trt_fp16": "--trt-fp16", "trt_cache_dir": "--trt-cache-dir"}


def _pop_model_options(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: kwargs.pop(k) for k in MODEL_OPTIONS}


def load_kwargs(opts: Dict[str, Any], io_binding: bool = True) -> Dict[str, Any]:
    """``GlmModel.load`` keyword arguments from the shared model options (``MODEL_OPTIONS``). Options that do not
    apply to the chosen backend or provider are refused with a one-line BackendError rather than ignored."""
    from runtime.errors import BackendError

    backend = opts.get("backend") or ("tensorrt" if opts.get("engine_dir") else "onnxruntime")
    ep_given = [flag for key, flag in EP_OPTIONS.items() if opts.get(key) not in (None, False)]
    kwargs: Dict[str, Any] = {"backend": backend}
    if opts.get("prefill_chunk") is not None:
        kwargs["prefill_chunk"] = opts["prefill_chunk"]
    if backend == "tensorrt":
        if not opts.get("engine_dir"):
            raise BackendError("--backend tensorrt needs --engine ENGINE_DIR, an engine built from the bundle with "
                               "'glm-export trt --model BUNDLE_DIR --out ENGINE_DIR'")
        onnxruntime_only = ep_given + [flag for key, flag in (("provider", "--provider"), ("threads", "--threads"),
                                                              ("graph", "--graph"))
                                       if opts.get(key) is not None]
        if not io_binding:
            onnxruntime_only.append("--no-io-binding")
        if onnxruntime_only:
            raise BackendError(f"{', '.join(onnxruntime_only)}: onnxruntime options, not used by --backend tensorrt "
                               f"(an engine's sizes are fixed when 'glm-export trt' builds it)")
        kwargs["engine_dir"] = opts["engine_dir"]
        kwargs["device"] = opts.get("device") or 0
        return kwargs
    if opts.get("engine_dir"):
        raise BackendError("--engine is for --backend tensorrt; --backend onnxruntime runs the bundle's model.onnx")
    provider = opts.get("provider") or "cpu"
    if ep_given and provider != "tensorrt":
        raise BackendError(f"{', '.join(ep_given)}: options of onnxruntime's TensorRT execution provider; add "
                           f"--provider tensorrt (or use --backend tensorrt --engine ENGINE_DIR)")
    if opts.get("device") is not None:
        if provider == "cpu":
            raise BackendError("--device selects a CUDA device: use it with --provider cuda/tensorrt or --backend "
                               "tensorrt")
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


def _sampling_options(f: Callable) -> Callable:
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Most tokens to generate [default: 128 for run, 1024 per chat turn]."),
        click.option("--greedy", is_flag=True, help="Always take the most likely token (no sampling options)."),
        click.option("--temperature", type=float, default=None, help="Sample; divide logits by T > 0."),
        click.option("--top-k", type=int, default=None, help="Sample from the K most likely tokens (0: all)."),
        click.option("--top-p", type=float, default=None, help="Sample from the smallest set with mass >= P."),
        click.option("--repetition-penalty", type=float, default=None, help="CTRL penalty R > 0 on seen tokens."),
        click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output)."),
        click.option("--stop", multiple=True, help="Stop when the text contains this string (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


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
@_model_options
@click.option("--prompt", default=None, help="Prompt text (encoded with the bundle's tokenizer and prompt prefix).")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids, used as given.")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap --prompt in the model's chat format.")
@click.option("--system", default=None, help="System message (with --chat).")
@_sampling_options
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: prompt_ids, generated_ids, text, finish_reason, timings.")
def run(prompt, prompt_ids, as_chat, system, stream, as_json, **sampling):
    """Generate a continuation (or a chat reply) for one prompt."""
    model_opts = _pop_model_options(sampling)
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
                    sys.stdout.flush()
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
@_model_options
@click.option("--system", default=None, help="System message kept at the start of the conversation.")
@_sampling_options
def chat(system, **sampling):
    """Talk to the model: one line per turn on stdin; /clear forgets the history, /quit (or end of input) leaves.

    Samples with temperature 0.8 and top-p 0.8 unless --greedy or other sampling options are given.
    """
    from runtime.errors import GenerationError

    model_opts = _pop_model_options(sampling)
    config = config_from_options(sampling, sample_by_default=True, default_max_new=1024, chat_defaults=CHAT_SAMPLING)
    start = [{"role": "system", "content": system}] if system is not None else []
    history = list(start)
    interactive = sys.stdin.isatty()
    with _load(model_opts) as model:
        model.require_chat()
        while True:
            if interactive:
                click.echo("user> ", nl=False)
            line = sys.stdin.readline()
            if not line:  # end of input
                break
            text = line.rstrip("\r\n")
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
                        sys.stdout.flush()
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


def _percentile(values: List[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


def _peak_rss_mib() -> Optional[float]:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def bench_model(model, prompt_len: int, batch: int, new_tokens: int, runs: int, warmup: int,
                seed: int = 0) -> Dict[str, Any]:
    """Prefill latency, decode speed and per-token latency for random prompts; exactly ``new_tokens`` each."""
    import statistics

    import numpy as np

    from runtime.errors import GenerationError
    from runtime.sampling import GenerationConfig

    spec = model.spec
    if prompt_len + new_tokens > model.context_length:
        raise GenerationError(
            f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the context of "
            f"{model.context_length} tokens"
        )
    rng = np.random.default_rng(seed)
    forbidden = set(spec.eos_token_ids) | set(spec.special_tokens.values())
    pool = np.array([i for i in range(spec.vocab_size) if i not in forbidden], dtype=np.int64)
    prompts = [rng.choice(pool, size=prompt_len).tolist() for _ in range(batch)]
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())  # greedy, never stops early
    prefill, speed, steps = [], [], []
    for i in range(warmup + runs):
        gen = model.start(prompts, config)
        for _ in gen:
            pass
        if i >= warmup:
            t = gen.timings
            prefill.append(t["prefill_ms"])
            speed.append(t["decode_tokens_per_s"])
            steps.extend(gen.step_ms)
    per_seq = statistics.median(speed) if speed else 0.0
    return {
        "prompt_len": prompt_len,
        "batch": batch,
        "new_tokens": new_tokens,
        "runs": runs,
        "prefill_ms": statistics.median(prefill),
        "decode_tokens_per_s": per_seq,  # per sequence
        "batch_tokens_per_s": per_seq * batch,
        "token_latency_p50_ms": _percentile(steps, 50),
        "token_latency_p90_ms": _percentile(steps, 90),
    }


@click.command()
@_model_options
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(prompt_lens, new_tokens, batches, runs, warmup, io_binding, as_json, **kwargs):
    """Measure prefill latency, decode tokens/s, per-token latency p50/p90 and peak RSS on random prompts."""
    opts = _pop_model_options(kwargs)
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
        fp16_on_cpu = model.manifest.precision == "fp16" and backend == "onnxruntime" and provider == "cpu"
    rss = _peak_rss_mib()
    if as_json:
        click.echo(json.dumps({"model": opts["bundle"], "backend": backend, "engine": opts["engine_dir"],
                               "provider": provider, "threads": opts["threads"],
                               "io_binding": io_binding if backend == "onnxruntime" else None,
                               "prefill_chunk": prefill_chunk, "results": rows, "peak_rss_mib": rss,
                               "graph": graph, "note": FP16_ON_CPU if fp16_on_cpu else None}))
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
