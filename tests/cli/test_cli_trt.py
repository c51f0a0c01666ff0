"""``glm-export check --target tensorrt`` and ``glm-export trt`` on tiny exported bundles, without TensorRT: exit
codes, the problems listed with their node, the exact trtexec command, and one-line refusals that leave nothing
behind."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from exporter.cli import main
from runtime.manifest import MANIFEST_NAME, sha256_of

# sizes for the exact-command tests: B=2, L=16, S=64, opt batch 1, opt seq 8 (tiny model: 2 layers, 2 kv heads, dim 32)
SIZES = ["--max-batch", "2", "--max-input-len", "16", "--max-seq-len", "64", "--opt-batch", "1", "--opt-seq", "8"]
TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def bundles(tiny_models):
    ckpt = tiny_models.checkpoint("cli-trt", "chatglm3", "thudm")
    fp32 = tiny_models.bundle("cli-trt-fp32", ckpt, verify=False)
    fp16 = tiny_models.bundle("cli-trt-fp16", ckpt, verify=False, precision="fp16")
    return {"fp32": fp32, "fp16": fp16}


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in result.output


def _edited_copy(bundle, dest, edit_model=None, edit_manifest=None):
    """A copy of ``bundle`` with its graph and/or manifest changed; the manifest's size/checksum records follow."""
    shutil.copytree(bundle, dest)
    model_path = os.path.join(dest, "model.onnx")
    if edit_model is not None:
        model = onnx.load(model_path)
        edit_model(model)
        onnx.save(model, model_path)
    with open(os.path.join(dest, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    manifest["files"]["model.onnx"] = {"sha256": sha256_of(model_path), "bytes": os.path.getsize(model_path)}
    if edit_manifest is not None:
        edit_manifest(manifest)
    with open(os.path.join(dest, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)
    return str(dest)


# -------------------------------------------------------------------------------------------------------- check


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_passes_our_bundles(bundles, precision):
    result = _run("check", "--target", "tensorrt", bundles[precision])
    assert result.exit_code == 0, result.output
    assert "no problems for TensorRT 10.0" in result.stdout
    assert "profiles for batch <= 1, prompt <= 1024, sequence <= 2048" in result.stdout  # the trt defaults

    as_json = _run("check", "--target", "tensorrt", bundles[precision], *SIZES[:6], "--json")
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["nodes"] > 100
    assert report["sizes"] == {"max_batch": 2, "max_input_len": 16, "max_seq_len": 64}
    assert [p["name"] for p in report["profiles"]] == ["prefill", "decode"]


def _contrib_node(model):
    node = next(n for n in model.graph.node if n.name == "/layers.1/down/MatMul")
    node.domain, node.op_type = "com.microsoft", "FusedMatMul"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def test_check_lists_a_contrib_node_and_exits_1(bundles, tmp_path):
    bundle = _edited_copy(bundles["fp32"], tmp_path / "contrib", edit_model=_contrib_node)
    result = _run("check", "--target", "tensorrt", bundle)
    assert result.exit_code == 1, result.output
    assert "1 problem(s) for TensorRT 10.0" in result.stdout
    assert "node '/layers.1/down/MatMul' (com.microsoft::FusedMatMul): operator of domain 'com.microsoft'" \
        in result.stdout
    assert result.stderr == ""  # a failing check is a result, not an error

    report = json.loads(_run("check", "--target", "tensorrt", bundle, "--json").stdout)
    assert report["ok"] is False
    assert [(p["kind"], p["where"]) for p in report["problems"]] == [
        ("domain", "node '/layers.1/down/MatMul' (com.microsoft::FusedMatMul)")]


def _float64_detour(model):
    """Softmax output -> Cast to double -> Cast back: a valid graph holding a float64 tensor."""
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if n.name == "/layers.0/Softmax")
    src = graph.node[index].output[0]
    for n in graph.node:
        for k, name in enumerate(n.input):
            if name == src:
                n.input[k] = "sm_back"
    graph.node.insert(index + 1, helper.make_node("Cast", [src], ["sm_f64"], to=TensorProto.DOUBLE, name="to_f64"))
    graph.node.insert(index + 2, helper.make_node("Cast", ["sm_f64"], ["sm_back"], to=TensorProto.FLOAT,
                                                  name="from_f64"))
    graph.value_info.append(helper.make_tensor_value_info("sm_f64", TensorProto.DOUBLE, None))
    onnx.checker.check_model(model)


def test_check_lists_a_float64_tensor_and_its_cast_and_exits_1(bundles, tmp_path):
    bundle = _edited_copy(bundles["fp32"], tmp_path / "f64", edit_model=_float64_detour)
    result = _run("check", bundle)
    assert result.exit_code == 1, result.output
    assert "2 problem(s)" in result.stdout
    assert "node 'to_f64' (Cast): casts to float64" in result.stdout
    assert "tensor 'sm_f64': float64" in result.stdout
    report = json.loads(_run("check", bundle, "--json").stdout)
    assert {p["kind"] for p in report["problems"]} == {"dtype"}


def test_check_flags_an_int8_dynamic_bundle(bundles, tmp_path):
    bundle = _edited_copy(bundles["fp32"], tmp_path / "dyn", edit_manifest=lambda m: m.update(precision="int8-dynamic"))
    result = _run("check", bundle)
    assert result.exit_code == 1, result.output
    assert "manifest.json: precision int8-dynamic" in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["check", "MISSING"], ["bundle directory does not exist"]),
    (["check", "BUNDLE", "--max-input-len", "100", "--max-seq-len", "50"],
     ["--max-input-len 100 is larger than --max-seq-len 50"]),
    (["check", "BUNDLE", "--max-seq-len", "4096"], ["--max-seq-len 4096 is longer than the model's context of 2048"]),
    (["check", "BUNDLE", "--trt-version", "8.5"], ["--trt-version '8.5'", "TensorRT 10"]),
])
def test_check_bad_input_exits_2(bundles, tmp_path, args, fragments):
    args = [str(tmp_path / "missing") if a == "MISSING" else bundles["fp32"] if a == "BUNDLE" else a for a in args]
    _one_line_error(_run(*args), *fragments)


# ----------------------------------------------------------------------------------------------- trt --print-trtexec


def _expected_profiles():
    """Shapes worked out by hand from the profile table (B=2, L=16, S=64, opt batch 1, opt seq 8; kv [*, 2, *, 32])."""
    def spec(ids, mask, kv):
        kvs = [f"past_key_values.{i}.{kind}:{kv}" for i in range(2) for kind in ("key", "value")]
        return ",".join([f"input_ids:{ids}", f"attention_mask:{mask}", f"position_ids:{ids}"] + kvs)

    prefill = [spec("1x1", "1x1", "1x2x0x32"), spec("1x8", "1x8", "1x2x0x32"), spec("2x16", "2x64", "2x2x48x32")]
    decode = [spec("1x1", "1x2", "1x2x1x32"), spec("1x1", "1x9", "1x2x8x32"), spec("2x1", "2x64", "2x2x63x32")]
    return prefill, decode


def _printed_profiles(argv):
    """The shape flags of a trtexec argv, per profile, as printed: [{"min"|"opt"|"max": spec}, ...]; the
    ``--profile=N`` indices must run 0, 1, ... with each followed by its three shape flags."""
    profiles = []
    for arg in argv:
        if arg.startswith("--profile="):
            assert int(arg.split("=", 1)[1]) == len(profiles) and (not profiles or len(profiles[-1]) == 3), argv
            profiles.append({})
        for kind in ("min", "opt", "max"):
            if arg.startswith(f"--{kind}Shapes="):
                assert profiles and kind not in profiles[-1], argv
                profiles[-1][kind] = arg.split("=", 1)[1]
    return profiles


def _shapes(spec):
    """``name:2x16,...`` parsed back: {name: (2, 16), ...} in the printed order."""
    out = {}
    for item in spec.split(","):
        name, _, dims = item.rpartition(":")
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def test_print_trtexec_prints_the_exact_command(bundles, tmp_path):
    engine_dir = tmp_path / "engine"
    result = _run("trt", "--model", bundles["fp32"], "--out", engine_dir, *SIZES, "--print-trtexec")
    assert result.exit_code == 0, result.output
    printed = _printed_profiles(shlex.split(result.stdout))
    assert len(printed) == 2 and all(len(p) == 3 for p in printed)
    prefill, decode = printed
    assert prefill["min"].startswith(
        "input_ids:1x1,attention_mask:1x1,position_ids:1x1,past_key_values.0.key:1x2x0x32,")
    assert prefill["max"].startswith(
        "input_ids:2x16,attention_mask:2x64,position_ids:2x16,past_key_values.0.key:2x2x48x32")
    assert decode["opt"].startswith(
        "input_ids:1x1,attention_mask:1x9,position_ids:1x1,past_key_values.0.key:1x2x8x32,")
    assert decode["max"].startswith(
        "input_ids:2x1,attention_mask:2x64,position_ids:2x1,past_key_values.0.key:2x2x63x32")
    # the printed shapes are the profiles 'check --json' reports for the same sizes, min/opt/max not transposed
    report = json.loads(_run("check", bundles["fp32"], *SIZES, "--json").stdout)
    assert [p["name"] for p in report["profiles"]] == ["prefill", "decode"]
    for shown, profile in zip(printed, report["profiles"]):
        for k, kind in enumerate(("min", "opt", "max")):
            assert _shapes(shown[kind]) == {name: tuple(r[k]) for name, r in profile["shapes"].items()}, kind
    # and the profile table: B=2, L=16, S=64, opt batch 1, opt seq 8 (tiny model: 2 layers, 2 kv heads, dim 32)
    top = _shapes(prefill["max"])
    assert (top["input_ids"], top["attention_mask"], top["past_key_values.1.value"]) == \
        ((2, 16), (2, 64), (2, 2, 48, 32))
    assert _shapes(prefill["opt"])["input_ids"] == (1, 8) and _shapes(decode["min"])["attention_mask"] == (1, 2)
    assert _shapes(decode["max"])["past_key_values.1.key"] == (2, 2, 63, 32)

    want_prefill, want_decode = _expected_profiles()
    expected = " ".join(
        ["trtexec", f"--onnx={bundles['fp32']}/model.onnx", f"--saveEngine={engine_dir}/engine.plan", "--profile=0"]
        + [f"--{k}Shapes={s}" for k, s in zip(("min", "opt", "max"), want_prefill)]
        + ["--profile=1"]
        + [f"--{k}Shapes={s}" for k, s in zip(("min", "opt", "max"), want_decode)]
        + ["--skipInference"]
    )
    assert result.stdout == expected + "\n"
    assert "mkdir -p" in result.stderr and "no engine.json" in result.stderr
    assert not engine_dir.exists()  # printing builds and writes nothing


def test_print_trtexec_carries_precision_and_builder_settings(bundles, tmp_path):
    cache = tmp_path / "t.cache"
    args = ["trt", "--model", bundles["fp16"], "--out", tmp_path / "e", *SIZES, "--print-trtexec", "--workspace", "1.5",
            "--timing-cache", cache, "--builder-opt-level", "4", "--trtexec", "/usr/src/tensorrt/bin/trtexec", "--json"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    argv = json.loads(result.stdout)["argv"]
    assert argv[0] == "/usr/src/tensorrt/bin/trtexec" and argv[3] == "--stronglyTyped"  # an fp16 bundle runs as typed
    assert "--fp16" not in argv
    assert argv[-4:] == ["--memPoolSize=workspace:1536", f"--timingCacheFile={cache}", "--builderOptimizationLevel=4",
                         "--skipInference"]
    weak = json.loads(_run(*args[:-1], "--weakly-typed", "--json").stdout)["argv"]  # TensorRT 8.x trtexec: no typing
    assert weak[3:5] == ["--fp16", "--profile=0"] and "--stronglyTyped" not in weak
    fp32 = json.loads(_run("trt", "--model", bundles["fp32"], "--out", tmp_path / "e", "--fp16", "--no-tf32",
                           "--print-trtexec", "--json").stdout)["argv"]
    assert fp32[3:6] == ["--fp16", "--noTF32", "--profile=0"]
    assert not (tmp_path / "e").exists() and not cache.exists()


# ------------------------------------------------------------------------------------------------ trt refusals


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="tensorrt is importable here: the not-installed refusal cannot happen")
def test_trt_without_tensorrt_says_so_on_one_line(bundles, tmp_path):
    engine_dir = tmp_path / "engine"
    result = _run("trt", "--model", bundles["fp32"], "--out", engine_dir, *SIZES)
    _one_line_error(result, "tensorrt package is not installed", "--print-trtexec")
    assert not engine_dir.exists()


@pytest.mark.parametrize("print_trtexec", [False, True])
@pytest.mark.parametrize("bundle, extra, fragments", [
    ("fp32", ["--max-input-len", "100", "--max-seq-len", "50"],
     ["--max-input-len 100 is larger than --max-seq-len 50"]),
    ("fp32", ["--int8"], ["--int8 builds from an INT8 (static Q/DQ) bundle", "manifest says fp32"]),
    ("fp16", ["--int8"], ["manifest says fp16"]),
    ("fp16", ["--fp16"], ["--fp16 applies to fp32 and int8 bundles; this bundle is already fp16"]),
    ("fp32", ["--opt-batch", "3", "--max-batch", "2"], ["--opt-batch 3 is larger than --max-batch 2"]),
    ("fp32", ["--builder-opt-level", "6"], ["--builder-opt-level must be 0..5, got 6"]),
    ("fp32", ["--workspace", "0"], ["--workspace is in GiB"]),
    ("fp32", ["--max-seq-len", "4096"], ["--max-seq-len 4096 is longer than the model's context of 2048"]),
])
def test_bad_trt_options_are_one_line_errors_and_leave_nothing(bundles, tmp_path, bundle, extra, fragments,
                                                               print_trtexec):
    engine_dir = tmp_path / "engine"
    args = ["trt", "--model", bundles[bundle], "--out", engine_dir, *extra] + (["--print-trtexec"] if print_trtexec
                                                                                else [])
    _one_line_error(_run(*args), *fragments)
    assert not engine_dir.exists()
    assert os.listdir(tmp_path) == []


def test_trt_refuses_a_missing_bundle_and_a_full_out_dir(bundles, tmp_path):
    missing = _run("trt", "--model", tmp_path / "nope", "--out", tmp_path / "e")
    _one_line_error(missing, "bundle directory does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _one_line_error(_run("trt", "--model", bundles["fp32"], "--out", full), "exists and is not empty")
    assert os.listdir(full) == ["keep.txt"]
