"""``glm-export serve`` and ``glm-export triton``: thin commands over ``runtime.serve``.

The runtime (and the serve extra) is imported inside the command bodies so ``glm-export --help`` stays instant.
"""
from __future__ import annotations

import os

import click

from exporter.cli.options import PROVIDER_CHOICES, threads_option


@click.command()
@click.option("--model", "bundle", required=True, type=click.Path(),
              help="Bundle directory written by 'glm-export onnx'.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most requests decoded together (rows of the running batch).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Most requests waiting for a row; more are answered 429 with Retry-After.")
@click.option("--api-key", envvar="GLM_EXPORT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics [env: GLM_EXPORT_API_KEY].")
@click.option("--model-name", default=None, help="The model id clients send [default: the bundle directory's name].")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@threads_option()
@click.option("--no-truncate", is_flag=True,
              help="Refuse (400) a conversation longer than the context instead of dropping its oldest turns.")
@click.option("--prefix-cache-mb", type=click.IntRange(min=0), default=256, show_default=True,
              help="Bytes of KV cache kept for prefix reuse across turns, in MiB (0: off).")
@click.option("--shutdown-after", type=click.FloatRange(min=0), default=None, hidden=True,
              help="Stop by itself after this many seconds (tests).")
def serve(bundle, host, port, max_batch, max_queue, api_key, model_name, provider, threads, no_truncate,
          prefix_cache_mb, shutdown_after):
    """Serve a bundle over an OpenAI-compatible HTTP API with continuous batching."""
    from runtime.api import GlmModel
    from runtime.serve.app import ServeOptions, run_server
    from runtime.serve.scheduler import Scheduler

    name = model_name or os.path.basename(os.path.normpath(os.path.abspath(bundle)))
    # the scheduler joins rows into a Concat KV cache: the portable graph (runtime/serve/scheduler.py)
    with GlmModel.load(bundle, provider=provider, threads=threads, graph="portable") as model:
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            click.echo(f"warning: listening on {host} without --api-key: anyone who reaches the port can use it",
                       err=True)
        if model.tokenizer is None:
            click.echo("note: the bundle has no tokenizer; only /v1/completions with token-id prompts works", err=True)
        scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue,
                              prefix_cache_bytes=prefix_cache_mb * 2**20)
        options = ServeOptions(model_name=name, api_key=api_key or None, truncate=not no_truncate)
        run_server(model, scheduler, options, host=host, port=port, shutdown_after_s=shutdown_after,
                   on_ready=lambda: click.echo(f"serving {name} on http://{host}:{port} (max batch {max_batch})",
                                               err=True))


@click.command()
@click.option("--model", "bundle", required=True, type=click.Path(),
              help="Bundle directory written by 'glm-export onnx'.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Model repository directory to write.")
@click.option("--name", default="glm", show_default=True, help="Model name in the repository.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Rows of the running batch inside the model.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (each loads the bundle and batches on its own).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def triton(bundle, out_dir, name, max_batch, instances, overwrite):
    """Write a Triton Inference Server model repository serving the bundle (Python backend, decoupled)."""
    from exporter.staging import staged_directory
    from runtime.serve.triton.repository import write_repository

    with staged_directory(out_dir, overwrite, inputs=(("--model", bundle),)) as tmp:
        written = write_repository(bundle, tmp, name=name, max_batch=max_batch, instances=instances)
    click.echo(f"wrote {out_dir}: {', '.join(written)}", err=True)
