"""``glm-export trt`` and ``glm-export check``: thin commands over the TensorRT layer.

``trt`` builds a native engine (``exporter.tensorrt.build.engine_from_bundle``) or, with ``--print-trtexec``, prints the
equivalent ``trtexec`` command line (``exporter.tensorrt.trtexec.trtexec_for_bundle``) without TensorRT and without
building. ``check --target tensorrt`` runs the static check (``exporter.tensorrt.check.check_bundle_for_tensorrt``) and
exits 0 when the bundle is clean, 1 when TensorRT would refuse something (a check that fails is not a usage error),
and 2 on bad input (``GlmExportError``, printed on one line by the group). Heavy imports happen inside the commands.
"""
from __future__ import annotations

import json
from typing import Dict, Optional

import click

from exporter.cli.options import json_option, overwrite_option, pop_sizes, quiet_option, size_options

def _manifest_and_request(bundle: str, sizes: Dict[str, Optional[int]]):
    """The bundle's manifest (read once per command, handed to the builders) and the sizes, defaults filled in."""
    from runtime.manifest import read_manifest
    from runtime.tensorrt.profiles import request_with_defaults

    manifest = read_manifest(bundle)
    return manifest, request_with_defaults(manifest.spec.max_position_embeddings, **sizes)


@click.command("trt")
@click.option("--model", "bundle", required=True, type=click.Path(),
              help="Bundle directory written by 'glm-export onnx' (or 'glm-export quantize').")
@click.option("--out", "engine_dir", required=True, type=click.Path(file_okay=False),
              help="Engine directory to write: engine.plan + engine.json.")
@click.option("--fp16", is_flag=True, help="fp32 (or --weakly-typed int8) bundles: let TensorRT use FP16 kernels.")
@click.option("--int8", is_flag=True,
              help="The bundle is INT8 with Q/DQ nodes ('glm-export quantize'); refused for any other bundle.")
@click.option("--weakly-typed", is_flag=True,
              help="Build fp16/int8 bundles weakly typed (TensorRT picks each layer's precision) instead of "
                   "strongly typed; TensorRT 8.x trtexec has no --stronglyTyped.")
@size_options
@click.option("--workspace", type=float, default=None, metavar="GiB",
              help="Builder workspace limit in GiB (fractions allowed) [default: TensorRT's].")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="TensorRT timing cache: read if it exists, written after the build.")
@click.option("--builder-opt-level", type=int, default=None, metavar="N",
              help="Builder optimization level 0..5 [default: TensorRT's, 3].")
@click.option("--no-tf32", is_flag=True, help="Clear TF32: full fp32 matmuls (slower, closer to onnxruntime).")
@click.option("--skip-check", is_flag=True, help="Build even where 'glm-export check' reports problems.")
@overwrite_option
@click.option("--print-trtexec", is_flag=True,
              help="Print the equivalent trtexec command line and exit: no TensorRT needed, nothing built or written.")
@click.option("--trtexec", "trtexec_path", default="trtexec", show_default=True, metavar="PATH",
              help="The trtexec named by --print-trtexec (JetPack: /usr/src/tensorrt/bin/trtexec).")
@json_option()
@quiet_option
def trt(bundle, engine_dir, fp16, int8, weakly_typed, workspace, timing_cache, builder_opt_level, no_tf32,
        skip_check, overwrite, print_trtexec, trtexec_path, as_json, quiet, **kwargs):
    """Build a TensorRT 10 engine (prefill + decode profiles) from a bundle, or print the trtexec command for it."""
    from exporter.tensorrt.build import EngineOptions, workspace_mib_from_gib

    manifest, request = _manifest_and_request(bundle, pop_sizes(kwargs))
    options = EngineOptions(
        profile=request,
        fp16=fp16,
        strongly_typed=False if weakly_typed else None,
        workspace_mib=workspace_mib_from_gib(workspace),
        optimization_level=builder_opt_level,
        tf32=not no_tf32,
        timing_cache=timing_cache,
        overwrite=overwrite,
        skip_check=skip_check,
        int8=int8,
    )
    if print_trtexec:
        from exporter.tensorrt.trtexec import trtexec_for_bundle

        cmd = trtexec_for_bundle(bundle, engine_dir, options, trtexec_path, manifest=manifest)
        if as_json:
            click.echo(json.dumps({"argv": cmd.args, "shell": cmd.shell}))
            return
        click.echo(cmd.shell)
        if not quiet:
            click.echo(f"# trtexec does not create {engine_dir}: mkdir -p it first. It writes no engine.json, so "
                       f"glm-export's TensorRT backend cannot load its engine.", err=True)
        return

    from exporter.tensorrt.build import engine_from_bundle
    from runtime.progress import TqdmProgress

    result = engine_from_bundle(bundle, engine_dir, options, progress=TqdmProgress(enabled=not quiet and not as_json),
                                manifest=manifest)
    click.echo(json.dumps(result.to_dict()) if as_json else result.summary())


@click.command("check")
@click.argument("bundle", type=click.Path())
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True,
              help="What to check the bundle against.")
@size_options
@click.option("--trt-version", default="10.0", show_default=True, metavar="X.Y",
              help="TensorRT 10 release to check for (JetPack 6.1/6.2: 10.3); operators added later are reported.")
@json_option("Print the report as one JSON object (every problem).")
@click.pass_context
def check(ctx, bundle, target, trt_version, as_json, **kwargs):
    """Static check: would TensorRT take this bundle? Exit 0 clean, 1 problems found, 2 bad input.

    Reads model.onnx without its weights and lists, with the node, input or tensor concerned: operators TensorRT's
    ONNX parser lacks, contrib (com.microsoft) nodes, element types TensorRT has no type for (float64, ...), Q/DQ
    TensorRT cannot run, and graph inputs the prefill/decode profiles for the given sizes would not cover.
    """
    from exporter.tensorrt.check import check_bundle_for_tensorrt

    manifest, request = _manifest_and_request(bundle, pop_sizes(kwargs))
    report, profiles = check_bundle_for_tensorrt(bundle, request, trt_version, manifest=manifest)
    if as_json:
        click.echo(json.dumps(dict(
            target=target,
            bundle=bundle,
            sizes={"max_batch": request.max_batch, "max_input_len": request.max_input_len,
                   "max_seq_len": request.max_seq_len},
            profiles=[p.to_dict() for p in profiles],
            **report.to_dict(),
        )))
    else:
        click.echo(f"{bundle}: TensorRT {trt_version} check, profiles for batch <= {request.max_batch}, "
                   f"prompt <= {request.max_input_len}, sequence <= {request.max_seq_len}")
        click.echo(report.text())
    if not report.ok:
        ctx.exit(1)
