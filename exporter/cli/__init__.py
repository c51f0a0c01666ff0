"""The ``glm-export`` command line: a thin layer; each command parses, calls one library function, prints.

User mistakes (every ``GlmExportError``) print one line and exit 2, without a traceback.
"""
from __future__ import annotations

import logging

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


def _register_commands() -> None:
    """Each command lives in the module of its concern; they are registered here, explicitly."""
    from exporter.cli.export import onnx, tiny
    from exporter.cli.precision import eval_, quantize
    from exporter.cli.run import bench, chat, run
    from exporter.cli.serve import serve, triton
    from exporter.cli.tensorrt import check, trt

    for name, cmd in (("tiny", tiny), ("onnx", onnx), ("run", run), ("chat", chat), ("bench", bench),
                      ("quantize", quantize), ("eval", eval_), ("trt", trt), ("check", check),
                      ("serve", serve), ("triton", triton)):
        main.add_command(cmd, name)


_register_commands()
