"""The ``glm-export`` command line: a thin layer; each command parses, calls one library function, prints.

User mistakes (every ``GlmExportError``) print one line and exit 2, without a traceback.
"""
from __future__ import annotations

import json
import logging
import sys

import click

from runtime.errors import GlmExportError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GlmExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log details to stderr.")
@click.version_option(package_name="glm-export")
def main(verbose: bool) -> None:
    """Export ChatGLM checkpoints to ONNX / TensorRT and run them with a lightweight runtime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
@click.option("--generation", default="chatglm3", show_default=True,
              type=click.Choice(["chatglm2", "chatglm3", "chatglm3-32k", "glm4", "glm4-0414"]))
@click.option("--layout", default="thudm", show_default=True, type=click.Choice(["thudm", "hf"]),
              help="thudm: transformer.encoder.layers.N names; hf: transformers' glm / glm4 names.")
@click.option("--size", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "mid"]))
@click.option("--weights-format", default="safetensors", show_default=True,
              type=click.Choice(["safetensors", "sharded", "bin"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
def tiny(out_dir, generation, layout, size, weights_format, seed, overwrite):
    """Write a small random ChatGLM checkpoint (published config shape, real tokenizer) to try the tool."""
    from exporter.bundle_dir import staged_directory
    from exporter.tiny import write_tiny_checkpoint

    with staged_directory(out_dir, overwrite) as tmp:
        write_tiny_checkpoint(tmp, generation=generation, layout=layout, size=size, seed=seed,
                              weight_format=weights_format)
    click.echo(f"wrote {generation} ({layout} layout, {size}) checkpoint to {out_dir}")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Checkpoint directory (config.json + weights).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run prefill + 3 cached decode steps in onnxruntime and compare with PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out.")
@click.option("--rope-scaling", type=click.Choice(["interpolation", "base"]), default=None,
              help="How THUDM's rope_ratio applies (default: detected; ChatGLM2-32k interpolates, ChatGLM3-32k/GLM-4 scale the base).")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 21))
@click.option("--fp16", is_flag=True, help="FP16 weights and KV cache; norms, softmax, rotary and logits stay fp32.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def onnx(model_dir, out_dir, verify, overwrite, rope_scaling, opset, fp16, as_json, quiet):
    """Export a ChatGLM checkpoint to a verified ONNX bundle with a KV cache."""
    from exporter.onnx_export import export_bundle
    from runtime.progress import TqdmProgress

    result = export_bundle(model_dir, out_dir, verify=verify, overwrite=overwrite, rope_scaling=rope_scaling,
                           opset=opset, progress=TqdmProgress(enabled=not quiet and not as_json),
                           precision="fp16" if fp16 else "fp32")
    if as_json:
        click.echo(json.dumps({
            "bundle": result.bundle_dir,
            "generation": result.manifest.spec.generation,
            "params": result.num_params,
            "file_bytes": result.file_bytes,
            "max_abs_diff": result.max_diffs,
            "seconds": round(result.seconds, 3),
        }))
    else:
        click.echo(result.summary())


def _register_optional_commands() -> None:
    """Commands defined in other modules of the CLI (runtime, precision, TensorRT)."""
    import importlib

    for module, names in (
        ("exporter.cli_runtime", ("run", "chat", "bench")),
        ("exporter.cli_precision", ("quantize", "eval")),
        ("exporter.cli_trt", ("trt", "check")),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            if e.name != module:
                raise
            continue
        for name in names:
            cmd = getattr(mod, name, None)
            if cmd is not None:
                main.add_command(cmd, name)


_register_optional_commands()


if __name__ == "__main__":
    sys.exit(main())
