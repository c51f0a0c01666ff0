"""Checkpoint directory -> verified ONNX bundle (``glm-export onnx``).

Flow: config -> spec; weights streamed into GlmForExport; reference outputs computed; graph traced to ONNX
(opset 17, standard operators only, dynamic batch/seq/past); the PyTorch model freed; weights moved to external
data when the graph is over 2 GB; onnxruntime runs prefill + cached decode steps and must match the reference
within the tolerance table; manifest written; the staged directory renamed into place.
"""
from __future__ import annotations

import gc as _gc
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from calibration.genai_files import write_genai_files
from calibration.stream_write import inline_if_small
from runtime import __version__
from runtime import graph_contract as gc
from runtime.errors import ConfigError, ExportError, VerificationError
from runtime.manifest import (
    DATA_FILE,
    FUSED_MODEL_FILE,
    GRAPH_FUSED,
    KV_DTYPE_OF_PRECISION,
    MODEL_FILE,
    Manifest,
    copy_side_files,
    record_files,
    write_manifest,
)
from runtime.progress import NullProgress
from runtime.spec import TOKENIZER_TIKTOKEN
from runtime.tolerances import allowed_diff, tolerance

from exporter.staging import staged_directory
from exporter.checkpoint_forms import prepare_forms
from exporter.fused_graph import fused_graph_record, run_fused, write_fused_graph
from exporter.graph_choice import fused_graph_refusal
from exporter.optimum_files import write_optimum_configs
from exporter.tokenizer_json import write_tokenizer_json
from exporter.model import GlmForExport, model_from_weights
from exporter.resources import check_checkpoint_fits
from exporter.weights import find_weight_files

log = logging.getLogger("glm_export")

OPSET = 17
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 2
# precisions a checkpoint exports to directly; the traced model's torch dtype is its KV dtype
# (runtime.manifest.KV_DTYPE_OF_PRECISION): float32 or float16 throughout
DIRECT_PRECISIONS = ("fp32", "fp16")


@dataclass
class ExportResult:
    bundle_dir: str
    manifest: Manifest
    num_params: int
    file_bytes: Dict[str, int]
    max_diffs: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        total = sum(self.file_bytes.values())
        worst = max(self.max_diffs.values()) if self.max_diffs else None
        diff = f"max diff {worst:.2e}" if worst is not None else "not verified"
        return (
            f"{self.bundle_dir}: {self.manifest.spec.generation} {self.num_params / 1e6:.1f}M params, "
            f"{self.manifest.precision}, {total / 1e6:.1f} MB ({len(self.file_bytes)} files), {diff}, "
            f"{self.seconds:.1f}s"
        )


def dynamic_axes(spec) -> Dict[str, Dict[int, str]]:
    axes: Dict[str, Dict[int, str]] = {}
    for t in gc.graph_inputs(spec) + gc.graph_outputs(spec):
        axes[t.name] = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
    return axes


def trace_to_onnx(model: GlmForExport, out_dir: str, opset: int = OPSET, rewrite=None, attach: bool = True):
    """Trace ``model`` into ``out_dir/model.onnx`` with its weights in ``out_dir/model.onnx.data``.

    The TorchScript exporter (deterministic, dynamic axes, standard operators only) traces the graph without
    parameters; the weights are then streamed tensor by tensor into one external data file. Serialising a whole
    ModelProto instead would hold the weights two more times (peak about 4.3x the fp32 weight bytes, measured on
    the 288M model) and cannot exceed protobuf's 2 GB limit. ``rewrite(proto, tensors)``, when given, may replace
    weight inputs and their tensors before they are written (``exporter.thudm_quant`` keeps a checkpoint's integers).
    ``attach=False`` returns the traced ModelProto (parameters still graph inputs) instead.
    """
    import warnings

    import onnx
    import torch

    spec = model.spec
    b, s, p = _TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST
    dtype = next(model.parameters()).dtype
    ids = torch.zeros((b, s), dtype=torch.int64)
    mask = torch.ones((b, p + s), dtype=torch.int64)
    pos = torch.arange(p, p + s, dtype=torch.int64).expand(b, s).contiguous()
    if len(gc.position_ids_shape(spec)) == 3:  # ChatGLM-6B: (position, block position) rows
        pos = torch.stack((pos, pos - p + 1), dim=1).contiguous()  # (B, 2, S)
    past = [torch.zeros((b, spec.num_kv_heads, p, spec.head_dim), dtype=dtype) for _ in range(2 * spec.num_layers)]
    inputs = [t.name for t in gc.graph_inputs(spec)]
    outputs = [t.name for t in gc.graph_outputs(spec)]
    graph_path = os.path.join(out_dir, MODEL_FILE)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived constants are expected here
        torch.onnx.export(
            model,
            (ids, mask, pos, *past),
            graph_path,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes(spec),
            opset_version=opset,
            dynamo=False,
            do_constant_folding=False,  # folding would need the parameters, which are not exported here
            export_params=False,
            keep_initializers_as_inputs=True,  # parameters appear as named graph inputs; moved to initializers below
        )
    proto = onnx.load(graph_path)
    if not attach:  # the streaming export (exporter.stream_weights) writes the weights itself
        return proto
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    if rewrite is not None:
        rewrite(proto, tensors)
    attach_external_weights(proto, tensors, out_dir, set(inputs))
    onnx.save_model(proto, graph_path)
    return None


def attach_external_weights(proto, tensors, out_dir: str, contract) -> None:
    """Turn each parameter graph input of ``proto`` into an initializer stored in ``out_dir/model.onnx.data``."""
    import numpy as np
    from onnx import TensorProto, helper

    keep = []
    offset = 0
    with open(os.path.join(out_dir, DATA_FILE), "wb") as data:
        for value in proto.graph.input:
            if value.name in contract:
                keep.append(value)
                continue
            if value.name not in tensors:
                raise ExportError(f"traced graph input {value.name!r} is neither a contract input nor a weight")
            array = tensors[value.name].detach().contiguous().numpy()
            pad = (-offset) % 64  # align each tensor for memory-mapped readers
            data.write(b"\0" * pad)
            offset += pad
            data.write(memoryview(array).cast("B"))
            init = TensorProto(name=value.name, dims=list(array.shape),
                               data_type=helper.np_dtype_to_tensor_dtype(np.dtype(array.dtype)))
            init.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(array.nbytes))):
                init.external_data.add(key=k, value=v)
            proto.graph.initializer.append(init)
            offset += array.nbytes
    del proto.graph.input[:]
    proto.graph.input.extend(keep)


def export_bundle(
    ckpt_dir: str,
    out_dir: str,
    verify: bool = True,
    overwrite: bool = False,
    rope_scaling: Optional[str] = None,
    opset: int = OPSET,
    progress=None,
    precision: str = "fp32",
    generation: Optional[str] = None,
    prefix_dir: Optional[str] = None,
    lora: Sequence[str] = (),
    lora_scale: float = 1.0,
    keep_checkpoint_quantization: bool = False,
    fused: bool = True,
    streaming: bool = True,
    stream_options=None,
) -> ExportResult:
    """Export ``ckpt_dir`` to a self-contained bundle at ``out_dir``; see the module docstring for the flow.

    ``precision`` "fp16" traces the model in float16: weights and past/present in fp16, while norm reductions,
    softmax, rotary tables and the logits stay fp32 (see exporter/model.py). ``generation`` overrides the detected
    family; ``prefix_dir`` is a P-tuning v2 output directory (prefix encoder only); ``lora`` are PEFT adapter
    directories merged with ``lora_scale``; ``keep_checkpoint_quantization`` writes a THUDM int4/int8 checkpoint's
    own integers and scales into the graph (see exporter/thudm_quant.py). ``streaming`` (the default) writes the
    bundle one weight at a time and verifies against a layer-streaming reference (exporter.stream_export, every
    precision, ``stream_options`` its settings); False, or a checkpoint form the streaming export does not handle
    (``CheckpointForms.streaming_blocker``), runs the whole-model flow below (fp32 / fp16).

    ``fused``: also write the fused onnxruntime graph ``model.fused.onnx`` over the same weights
    (exporter/fused_graph.py), verified like the portable one, when exporter/graph_choice.py says the model fits it
    (the manifest's ``extra.graphs_decided`` records the decision); the onnxruntime runtime prefers it. Both the
    streamed and the whole-model flow write it.
    """
    forms = prepare_forms(ckpt_dir, rope_scaling, generation, prefix_dir, lora, lora_scale,
                          keep_checkpoint_quantization, precision)
    inputs = (("--model", ckpt_dir), ("--prefix", prefix_dir)) + tuple(("--lora", a) for a in lora)
    if stream_options is not None and stream_options.calib_data:
        inputs += (("--calib-data", stream_options.calib_data),)
    blocker = forms.streaming_blocker()
    if blocker is not None and precision not in DIRECT_PRECISIONS:
        raise ConfigError(f"--precision {precision}: {blocker} exports directly to fp32 or fp16 only; export it with "
                          f"--precision fp32, then run 'glm-export quantize --precision {precision}' on that bundle")
    if streaming and blocker is None:
        from exporter.resources import check_layers_held
        from exporter.stream_export import export_streamed

        check_layers_held(ckpt_dir, forms.spec, find_weight_files(ckpt_dir))
        return export_streamed(ckpt_dir, out_dir, precision, verify=verify, overwrite=overwrite,
                               rope_scaling=rope_scaling, opset=opset, progress=progress, options=stream_options,
                               forms=forms, inputs=inputs, fused=fused)
    if streaming:
        log.info("exporting in memory (the whole model loaded): the streaming export does not handle %s yet", blocker)
    kv_dtype = _kv_dtype_of(precision)
    progress = progress or NullProgress()
    start = time.perf_counter()
    spec, info = forms.spec, forms.info
    weight_files = find_weight_files(ckpt_dir)
    check_checkpoint_fits(ckpt_dir, spec, weight_files, info.layout, 2 if kv_dtype == "float16" else 4)
    with staged_directory(out_dir, overwrite, inputs=inputs) as tmp:
        reference, plan = _trace_model(forms, tmp, kv_dtype, opset, verify, progress)
        progress.stage("writing the bundle")
        refusal = fused_graph_refusal(spec, forms.precision, forms.rewrite is not None) if fused else None
        fused = fused and refusal is None
        inline_if_small(tmp, fused)
        copied = copy_interop_side_files(ckpt_dir, tmp, spec, info.tokenizer_files)
        genai_files = []
        if fused:
            progress.stage("writing the fused onnxruntime graph over the same weights")
            write_fused_graph(tmp, spec)
            genai_files = write_genai_files(tmp, spec, FUSED_MODEL_FILE)  # onnxruntime_genai.Model(bundle) runs it
        elif refusal is not None:
            log.info("portable graph only: %s", refusal)
        verification: Dict = {}
        diffs: Dict[str, float] = {}
        if verify:
            progress.stage("verifying with onnxruntime: prefill + 3 cached decode steps, batch 2, left padding")
            diffs, verification = _verify_graph(tmp, spec, plan, reference, forms.verify_precision, kv_dtype, fused)
        graph_files = [MODEL_FILE] + ([DATA_FILE] if os.path.exists(os.path.join(tmp, DATA_FILE)) else [])
        graph_files += [FUSED_MODEL_FILE] + genai_files if fused else []
        manifest = Manifest(
            spec=spec,
            precision=forms.bundle_precision,
            inputs=gc.graph_inputs(spec, kv_dtype),
            outputs=gc.graph_outputs(spec, kv_dtype),
            model_file=MODEL_FILE,
            opset=opset,
            tool_version=__version__,
            source=_source_record(info, weight_files, forms),
            files=record_files(tmp, graph_files + copied),
            tokenizer_files=[f for f in copied if f != "config.json"],
            verification=verification,
            graphs={GRAPH_FUSED: fused_graph_record()} if fused else {},
            extra={"graphs_decided": {"fused": "written" if fused else (refusal or "not asked (export_bundle fused=False)")}},
        )
        write_manifest(tmp, manifest)
    file_bytes = {name: rec["bytes"] for name, rec in manifest.files.items()}
    return ExportResult(
        bundle_dir=os.path.abspath(out_dir),
        manifest=manifest,
        num_params=spec.num_params,
        file_bytes=file_bytes,
        max_diffs=diffs,
        seconds=time.perf_counter() - start,
    )


def copy_interop_side_files(ckpt_dir: str, tmp: str, spec, tokenizer_files) -> List[str]:
    """The checkpoint's config and tokenizer files, plus what other tools need to load the bundle: a
    ``tokenizer.json`` for GLM-4's tiktoken ranks (onnxruntime-genai reads only that) and the config.json /
    generation_config.json optimum loads (the checkpoint's config kept as checkpoint_config.json). Returns the
    file names written (both export flows call it)."""
    copied = copy_side_files(ckpt_dir, tmp, tokenizer_files)
    if spec.tokenizer_kind == TOKENIZER_TIKTOKEN and "tokenizer.json" not in copied:
        write_tokenizer_json(os.path.join(tmp, "tokenizer.model"), os.path.join(tmp, "tokenizer.json"))
        copied.append("tokenizer.json")
    copied += [n for n in write_optimum_configs(tmp, spec) if n not in copied]
    return copied


def _kv_dtype_of(precision: str) -> str:
    """The KV (and traced torch) dtype of a precision a checkpoint exports to directly; ConfigError otherwise."""
    if precision not in DIRECT_PRECISIONS:
        raise ConfigError(f"--precision: a checkpoint exports directly to {' or '.join(DIRECT_PRECISIONS)}, "
                          f"got {precision!r} (use 'glm-export quantize' for the others)")
    return KV_DTYPE_OF_PRECISION[precision]


def _trace_model(forms, tmp: str, kv_dtype: str, opset: int, verify: bool, progress):
    """Load the checkpoint's weights (in its form: dequantized, adapters merged, prefix set) into the export model,
    run the reference steps (when verifying), trace ``tmp/model.onnx`` and free the model. Returns (reference
    outputs or None, the verification plan or None)."""
    import torch

    from exporter.verify import make_plan, run_torch

    spec, info = forms.spec, forms.info
    progress.stage(f"loading {info.layout} checkpoint {forms.ckpt_dir} ({spec.num_params / 1e6:.1f}M params)")
    # the loaded dict is not kept: the model owns the tensors, so the weights are held once
    model = model_from_weights(spec, forms.weights(getattr(torch, kv_dtype), progress))
    forms.finish_model(model)
    plan = make_plan(spec) if verify else None
    reference = run_torch(model, spec, plan) if verify else None
    progress.stage("tracing to ONNX")
    trace_to_onnx(model, tmp, opset, rewrite=forms.rewrite)
    del model
    _gc.collect()
    return reference, plan


def _verify_graph(tmp: str, spec, plan, reference, precision: str, kv_dtype: str, fused: bool = False):
    """Run the traced graph (and the fused one, ``fused``) through the plan's steps and compare with ``reference``:
    (max diffs, the manifest's verification record); VerificationError listing each output's max difference beyond
    the tolerance."""
    import numpy as np

    from exporter.verify import max_diffs, run_onnx
    from runtime.backends.onnxruntime import new_session

    session = new_session(os.path.join(tmp, MODEL_FILE))
    got = run_onnx(session, spec, plan, kv_dtype=np.dtype(kv_dtype))
    del session
    diffs = max_diffs(plan, got, reference)
    if fused:
        got = run_fused(os.path.join(tmp, FUSED_MODEL_FILE), spec, plan)
        # logits only: a left-padded row's cached keys are rotated at buffer positions (see fused_graph.py)
        diffs.update({f"fused.{k}": v for k, v in max_diffs(plan, got, reference).items() if k != "present"})
    scale = max(float(abs(r[gc.LOGITS]).max()) for r in reference)
    tol = allowed_diff("onnx_vs_torch", precision, scale)
    if not all(v <= tol for v in diffs.values()):
        listing = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
        raise VerificationError(f"exported ONNX differs from PyTorch beyond {tol:.3g}: {listing}", diffs)
    return diffs, {
        "against": "pytorch",
        "tolerance": tolerance("onnx_vs_torch", precision),
        "allowed_max_abs_diff": tol,
        "max_abs_diff": diffs,
        "steps": "prefill + 3 decode, batch 2, left padding",
    }


def _source_record(info, weight_files, forms) -> Dict:
    """The manifest's ``source``: where the bundle came from, how its model and rope scaling were decided, and its
    form (P-tuning prefix, LoRA adapters, kept checkpoint quantization)."""
    return {
        "checkpoint": info.path,
        "layout": info.layout,
        "model_type": info.model_type,
        "weight_files": [os.path.basename(f) for f in weight_files.files],
        "rope_scaling_decided_by": info.rope_scaling_source,
        **forms.source_records(),
    }
