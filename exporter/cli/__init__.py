"""The ``glm-export`` command line: a thin layer; each command parses, calls one library function, prints.

One error path: user mistakes (every ``GlmExportError``) print one line and exit 2 (``check``: 1), without a
traceback; Ctrl-C exits 130, SIGTERM/SIGHUP 128 + the signal (staged output is cleaned up first); a closed stdout
(``| head``) ends quietly; click's usage errors are one line as well. Anything else is a bug: its traceback is shown, with a line asking to report it.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from runtime.errors import GlmExportError

BUG_EXIT = 70  # EX_SOFTWARE


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GlmExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", None)
            click.echo("terminated" if signum else "interrupted", err=True)
            ctx.exit(128 + signum if signum else 130)
        except BrokenPipeError:
            _quiet_stdout()
            ctx.exit(1)
        except click.exceptions.UsageError as e:  # one line too: what was wrong, and where the help is
            sub = e.ctx.command_path if e.ctx is not None else "glm-export"
            click.echo(f"error: {e.format_message()} (see '{sub} --help')", err=True)
            ctx.exit(e.exit_code)
        except click.exceptions.ClickException:
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception:  # a bug, not a user mistake: show it, and say so
            traceback.print_exc()
            click.echo("error: this is a bug in glm-export; please report it with the command line and the "
                       "traceback above", err=True)
            ctx.exit(BUG_EXIT)


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
