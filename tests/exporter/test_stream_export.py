"""The streaming export and quantization (issue 15): same bundles as the whole-model routes, a layer-streaming
reference equal to the whole model, verification that catches a corrupted layer, the memory plan and its refusal.

Tiny shapes only (bf16 checkpoint of the ``tiny`` size, 0.5 M parameters); each export takes a few seconds.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

CALIB_WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()


def graph_of(bundle):
    """(nodes by name: op, domain, inputs, outputs, attributes; initializers by name: numpy; opsets)."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(os.path.join(bundle, "model.onnx"))
    nodes = {n.name: (n.op_type, n.domain, tuple(n.input), tuple(n.output),
                      tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute)))
             for n in m.graph.node}
    inits = {i.name: numpy_helper.to_array(i, base_dir=bundle) for i in m.graph.initializer}
    io = ([(i.name, i.type.tensor_type.elem_type) for i in m.graph.input],
          [(o.name, o.type.tensor_type.elem_type) for o in m.graph.output])
    return nodes, inits, sorted((o.domain, o.version) for o in m.opset_import), io


def assert_same_graph(a, b):
    na, ia, oa, ioa = graph_of(a)
    nb, ib, ob, iob = graph_of(b)
    assert len(na) == len(nb) and na == nb
    assert oa == ob and ioa == iob
    assert sorted(ia) == sorted(ib)
    for name in ia:  # bit for bit
        assert ia[name].dtype == ib[name].dtype and ia[name].shape == ib[name].shape, name
        assert ia[name].tobytes() == ib[name].tobytes(), name


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("stream")
    ckpt = write_tiny_checkpoint(str(root / "ckpt"), generation="chatglm3", dtype="bfloat16")
    calib = root / "calib.txt"
    rng = np.random.default_rng(0)
    calib.write_text("\n".join(" ".join(rng.choice(CALIB_WORDS, 40)) for _ in range(24)) + "\n")
    return {"root": root, "ckpt": ckpt, "calib": str(calib), "made": {}}


def export(work, precision, streaming=True, **opts):
    from exporter.onnx_export import export_bundle
    from exporter.stream_export import StreamOptions

    key = (precision, streaming, tuple(sorted(opts.items())))
    if key not in work["made"]:
        out = str(work["root"] / f"{precision}-{'s' if streaming else 'm'}-{len(work['made'])}")
        options = StreamOptions(calib_data=work["calib"], calib_samples=16, calib_seq_len=32, **opts)
        work["made"][key] = export_bundle(work["ckpt"], out, precision=precision, streaming=streaming,
                                          stream_options=options)
    return work["made"][key]


def quantize(work, precision, streaming=True, **opts):
    from calibration.pipeline import QuantizeOptions, quantize_bundle

    src = export(work, "fp32").bundle_dir
    out = str(work["root"] / f"q-{precision}-{'s' if streaming else 'm'}-{len(os.listdir(work['root']))}")
    os.makedirs(out)
    q = dict(calib_data=work["calib"], calib_samples=16, calib_seq_len=32, evaluate=False, streaming=streaming)
    q.update(opts)
    return quantize_bundle(src, out, QuantizeOptions(precision=precision, **q))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_streamed_float_export_is_the_whole_model_export(work, precision):
    streamed, whole = export(work, precision), export(work, precision, streaming=False)
    assert_same_graph(streamed.bundle_dir, whole.bundle_dir)
    assert streamed.manifest.verification["against"].startswith("pytorch (layer-streaming")
    assert streamed.manifest.extra["streamed_export"]["memory_plan"]["precision"] == precision


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic", "fp16"])
def test_streamed_quantize_is_the_whole_graph_quantize(work, precision):
    assert_same_graph(quantize(work, precision).bundle_dir, quantize(work, precision, streaming=False).bundle_dir)


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic"])
def test_large_weights_quantized_in_column_blocks_are_the_same(work, monkeypatch, precision):
    """Weights over CHUNK_BYTES go through onnxruntime's quantizer a block of columns at a time (its copies of
    the weight are the peak): the joined tensors equal the whole weight's, byte for byte."""
    import calibration.stream_quant as sq

    # 100 columns of a K = 344 weight (down: 2 blocks, the last one short), 268 of a K = 128 one (gate_up and the
    # LM head: 3 blocks each; qkv: one): several joins, few onnxruntime calls (each one costs a GC pass)
    monkeypatch.setattr(sq, "CHUNK_BYTES", 4 * 344 * 100)
    assert_same_graph(quantize(work, precision).bundle_dir, quantize(work, precision, streaming=False).bundle_dir)


def test_streamed_static_int8_with_the_same_ranges_is_the_whole_graph_quantize(work):
    direct = export(work, "int8")
    ranges = os.path.join(direct.bundle_dir, "calibration_ranges.json")
    a = quantize(work, "int8", ranges=ranges)
    b = quantize(work, "int8", ranges=ranges, streaming=False)
    assert_same_graph(a.bundle_dir, b.bundle_dir)
    assert_same_graph(direct.bundle_dir, a.bundle_dir)  # direct export = export + quantize, same ranges


@pytest.mark.parametrize("precision", ["int4", "int8-dynamic"])
def test_direct_quantized_export_is_export_then_quantize(work, precision):
    direct = export(work, precision)
    assert_same_graph(direct.bundle_dir, quantize(work, precision).bundle_dir)
    weights = direct.manifest.verification["weights"]
    assert weights["checked"] == 9 and 0 < weights["max_rel_rms_error"] <= weights["allowed"]
    assert direct.manifest.extra["quantization"]["streamed"] is True


def test_streamed_calibration_matches_onnxruntime_calibration(work):
    """The layer-streaming reference observes the same activations as onnxruntime's augmented graph."""
    from calibration.pipeline import QuantizeOptions, _data
    from calibration.ranges import calibrate
    from calibration.targets import find_linears
    from calibration.graph_io import load_graph
    from exporter.stream_calibrate import calibrate_streamed
    from exporter.stream_source import BundleTensors
    from runtime.manifest import read_manifest

    bundle = export(work, "fp32").bundle_dir
    spec = read_manifest(bundle).spec
    model = os.path.join(bundle, "model.onnx")
    split, _ = _data(QuantizeOptions(precision="int8", calib_data=work["calib"], calib_samples=8, calib_seq_len=32,
                                     evaluate=False), bundle, spec)
    linears = find_linears(load_graph(model, with_weights=False))
    ort = calibrate(model, spec, split.calibration, [lin.activation for lin in linears], "minmax", batch_size=4,
                    decode_steps=4)
    ours = calibrate_streamed(spec, BundleTensors(model), split.calibration, linears, "minmax", 99.99, 4, 4)
    for lin in linears:
        a, b = ours.tensors[lin.activation], ort.tensors[lin.activation]
        assert a.count == b.count
        np.testing.assert_allclose([a.absmax, a.min, a.max], [b.absmax, b.min, b.max], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layer_streaming_reference_equals_the_whole_model(work, dtype):
    import torch

    from exporter.config import spec_from_checkpoint
    from exporter.model import model_from_weights
    from exporter.stream_reference import StreamingReference
    from exporter.stream_source import CheckpointReader
    from exporter.verify import make_plan, max_diffs, run_torch, step_feeds
    from exporter.weights import load_canonical_weights

    torch_dtype = getattr(torch, dtype)
    spec, info = spec_from_checkpoint(work["ckpt"])
    plan = make_plan(spec)
    whole = run_torch(model_from_weights(spec, load_canonical_weights(work["ckpt"], spec, info.layout, torch_dtype)),
                      spec, plan)
    streamed = StreamingReference(spec, CheckpointReader(work["ckpt"], spec, info.layout), torch_dtype).run(
        [step_feeds(plan)], keep_present=True)[0]
    diffs = max_diffs(plan, streamed, whole)
    assert diffs["present"] == 0.0  # the same layers, the same order: bit-identical caches
    assert max(diffs.values()) <= (1e-5 if dtype == "float32" else 1e-2)  # LM head in row blocks: summation order


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_verification_catches_one_corrupted_layer(work, monkeypatch, precision):
    """A fault in the streamed write path (here: layer 1's MLP down weight scaled by 1.5 as it is read for
    writing) fails the export; the reference reads the checkpoint itself and nothing is left at --out."""
    import calibration.stream_write as sw
    from runtime.errors import VerificationError

    original = sw.read_only_once  # the export wraps the reader's graph_array with it: the write path only

    def corrupting(read):
        return original(lambda name, dtype: read(name, dtype) * (1.5 if name == "layers.1.down.weight_t" else 1))

    monkeypatch.setattr(sw, "read_only_once", corrupting)
    out = str(work["root"] / f"corrupt-{precision}")
    with pytest.raises(VerificationError) as e:
        export_streamed_fresh(work, out, precision)
    assert ("layers.1.down.weight_t" in str(e.value)) == (precision == "int4")  # int4: the weight check names it
    assert not os.path.exists(out)


def export_streamed_fresh(work, out, precision):
    from exporter.stream_export import StreamOptions, export_streamed

    return export_streamed(work["ckpt"], out, precision, options=StreamOptions())


class _Result:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def _cli(*args, env=None):
    """The CLI in this process (click's runner; no second torch import), stdout and stderr apart."""
    from click.testing import CliRunner

    from exporter.cli import main

    return _Result(CliRunner().invoke(main, list(args), env=env))


def test_dry_run_prints_the_plan_and_writes_nothing(work):
    out = str(work["root"] / "dry")
    r = _cli("onnx", "--model", work["ckpt"], "--out", out, "--precision", "int4", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["precision"] == "int4" and plan["peak_bytes"] > plan["output_bytes"] > 0
    assert set(plan["phases"]) == {"trace", "writing", "reference", "verification session"}
    assert not os.path.exists(out)


@pytest.mark.parametrize("how", ["option", "env"])
def test_refused_with_the_numbers_when_memory_is_short(work, how):
    out = str(work["root"] / f"short-{how}")
    args = ["onnx", "--model", work["ckpt"], "--out", out, "--precision", "fp16"]
    if how == "option":
        r = _cli(*args, "--memory-available", "64M")
    else:
        r = _cli(*args, env={"GLM_EXPORT_MEMORY_AVAILABLE": "0.05G"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: not enough memory for fp16: the plan needs about ")
    assert ("--memory-available gives 0.06 GB" if how == "option" else "GLM_EXPORT_MEMORY_AVAILABLE gives 0.05 GB") \
        in lines[0]
    assert not os.path.exists(out)


def test_quantize_refused_when_memory_is_short(work):
    out = str(work["root"] / "short-q")
    r = _cli("quantize", "--model", export(work, "fp32").bundle_dir, "--out", out, "--precision", "int4",
             "--no-eval", "--memory-available", "1M")
    assert r.returncode == 2 and "not enough memory for int4" in r.stderr and not os.path.exists(out)


def test_memory_plan_scales_with_the_model_and_detects_memory():
    from exporter.memory_plan import available_memory, parse_bytes, plan_export
    from exporter.tiny.published import PUBLISHED_CONFIGS
    from runtime.errors import GlmExportError

    found = available_memory()
    assert found["meminfo"] is not None and found["available"] > 0
    assert parse_bytes("1.5G", "x") == int(1.5 * 1024**3) and parse_bytes("800M", "x") == 800 * 1024**2
    with pytest.raises(GlmExportError):
        parse_bytes("lots", "--memory-available")
    import tempfile

    from exporter.config import spec_from_checkpoint

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(PUBLISHED_CONFIGS["chatglm3"], f)
        spec = spec_from_checkpoint(d)[0]
    plans = {p: plan_export(spec, p) for p in ("fp32", "fp16", "int8", "int4")}
    assert plans["fp32"].output_bytes == 4 * spec.num_params
    assert plans["int4"].output_bytes < plans["int8"].output_bytes < plans["fp16"].output_bytes
    assert plans["int4"].peak_bytes < plans["fp16"].peak_bytes and plans["int8"].peak_bytes < plans["fp16"].peak_bytes
    assert plans["fp16"].peak_bytes <= plans["fp32"].peak_bytes  # onnxruntime holds fp16 weights as fp32 on x86
    # quantize --kv-cache int8 opens the new bundle's fused graph once more: for a 6B INT4 bundle that session,
    # not the writing, is the peak
    kv = plan_export(spec, "int4", verify=False, from_bundle=True, kv_calibrate=True)
    plain = plan_export(spec, "int4", verify=False, from_bundle=True)
    assert "kv-cache calibration session" in kv.phases and "kv-cache calibration session" not in plain.phases
    assert kv.phases["kv-cache calibration session"] >= kv.output_bytes
    assert kv.peak_bytes > plain.peak_bytes


def test_byte_progress_logs_bytes_and_eta(caplog):
    import logging

    from runtime.progress import NullProgress

    with caplog.at_level(logging.INFO, logger="glm_export"):
        assert list(NullProgress().iterate_bytes(["a", "b"], [3_000_000, 1_000_000], "writing")) == ["a", "b"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("writing: 1/2 a, 3.0/4.0 MB, ETA ") and lines[1].startswith("writing: 2/2 b, 4.0/4.0")
