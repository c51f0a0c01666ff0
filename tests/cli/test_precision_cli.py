"""``glm-export quantize`` and ``glm-export eval`` from the command line: the default held-out evaluation, JSON
output, and one-line errors for bad input with nothing left at --out."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime.manifest import read_manifest


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_quantize_evaluates_on_held_out_calibration_text_by_default(tmp_path, trained):
    out = tmp_path / "int8"
    res = _run(["quantize", "--model", trained.bundle("fp32"), "--out", str(out), "--precision", "int8",
                "--calib-data", trained.calib_file, "--calib-samples", "64", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["precision"] == "int8" and got["accuracy"]["sequences"] == 64  # min(--eval-samples, a quarter)
    m = read_manifest(str(out), verify_checksums=True)
    assert m.extra["accuracy"]["heldout"] == "held out from calibration data"
    calib = m.extra["quantization"]["calibration"]
    assert calib["samples"] == 64 and calib["decode_steps"] == 8 and calib["steps"] > 16
    assert sorted(os.listdir(tmp_path)) == ["int8"]  # no staging leftovers
    assert "calibration_ranges.json" in m.files


def test_eval_command(trained):
    q = trained.quantized("int8-dynamic", precision="int8-dynamic")
    res = _run(["eval", "--model", q.bundle_dir, "--reference", trained.bundle("fp32"), "--data", trained.eval_file,
                "--samples", "50", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output.strip().splitlines()[-1])
    assert got["sequences"] == 50 and 0.9 < got["top1_agreement"] <= 1.0 and got["ppl"] > 1.0
    assert set(got) >= {"ppl", "ppl_reference", "top1_agreement", "mean_kl", "max_abs_logit_diff"}
    res = _run(["eval", "--model", trained.bundle("fp32"), "--reference", trained.bundle("fp32"), "--data",
                trained.eval_file, "--samples", "5", "--quiet"])
    assert res.exit_code == 0 and "top-1 agreement 100.00%" in res.output and "(+0.00%)" in res.output


def _error(args, out):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    text = res.stderr.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    assert not os.path.exists(out)
    return text


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "short.txt").write_text("only one sample line\n")
    return tmp_path


@pytest.mark.parametrize("extra,message", [
    (["--calib-data", "{d}/missing.txt"], "missing.txt: calibration file not found"),
    (["--calib-data", "{d}/empty.txt"], "empty.txt: no samples"),
    (["--calib-data", "{d}/latin1.txt"], "latin1.txt: not UTF-8 text"),
    (["--calib-data", "{d}/short.txt"], "short.txt: too short"),
    (["--calib-data", "{calib}", "--calib-samples", "0"], "--calib-samples must be at least 1, got 0"),
    (["--calib-data", "{calib}", "--method", "kl"], "--method must be one of minmax, entropy, percentile"),
    (["--calib-data", "{calib}", "--keep-float", "layers.7.*"], "--keep-float 'layers.7.*' matches no linear layer"),
    ([], "--precision int8 calibrates on your text: give --calib-data FILE"),
])
def test_bad_int8_input_is_one_line_and_leaves_nothing(trained, bad_files, extra, message):
    out = str(bad_files / "out")
    args = [a.format(d=bad_files, calib=trained.calib_file) for a in extra]
    text = _error(["quantize", "--model", trained.bundle("fp32"), "--out", out, "--precision", "int8"] + args, out)
    assert message in text


def test_unknown_precision_and_stacked_quantization(tmp_path, trained):
    out = str(tmp_path / "out")
    text = _error(["quantize", "--model", trained.bundle("fp32"), "--out", out, "--precision", "int3",
                   "--calib-data", trained.calib_file], out)
    assert "--precision must be one of fp16, int8, int8-dynamic, int4, got 'int3'" in text
    q = trained.quantized("int4", precision="int4")
    text = _error(["quantize", "--model", q.bundle_dir, "--out", out, "--precision", "int8",
                   "--calib-data", trained.calib_file], out)
    assert "already quantized (precision int4)" in text
    text = _error(["quantize", "--model", trained.bundle("fp32"), "--out", out, "--precision", "int4"], out)
    assert "give --calib-data FILE or --eval-data FILE (or --no-eval" in text


@pytest.mark.parametrize("extra,message", [
    (["--precision", "int4", "--no-eval"], "--kv-cache int8 calibrates the cache scales on your text: give --calib-data"),
    (["--precision", "fp16", "--calib-data", "{calib}"], "a --precision fp16 bundle has none"),
    (["--precision", "int4", "--calib-data", "{calib}", "--kv-cache", "fp8"], None),
])
def test_bad_kv_cache_option_is_one_line_and_leaves_nothing(tmp_path, trained, extra, message):
    out = str(tmp_path / "out")
    kv = [] if "--kv-cache" in extra else ["--kv-cache", "int8"]
    args = [a.format(calib=trained.calib_file) for a in extra]
    text = _error(["quantize", "--model", trained.bundle("fp32"), "--out", out] + kv + args, out)
    assert (message or "--kv-cache must be one of float32, int8, got 'fp8'") in text


def test_failure_after_staging_leaves_nothing(tmp_path, trained):
    """A ranges file calibrated for another graph is found only inside the staged directory: it must vanish."""
    src = os.path.join(trained.quantized("int8", precision="int8").bundle_dir, "calibration_ranges.json")
    data = json.load(open(src, encoding="utf-8"))
    data["model_sha256"] = "0" * 64
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(data))
    work = tmp_path / "work"
    work.mkdir()
    out = str(work / "out")
    text = _error(["quantize", "--model", trained.bundle("fp32"), "--out", out, "--precision", "int8",
                   "--ranges", str(foreign), "--no-eval"], out)
    assert "calibrated for another graph" in text
    assert os.listdir(work) == []


def test_quantize_refuses_a_bundle_that_breaks_an_accuracy_bound(tmp_path, trained, monkeypatch):
    """A bound tightened in the tolerance table past what fp16 can reach: an error naming the figure and the bound,
    nothing at --out and no staging leftovers; --accept-accuracy-loss writes the bundle and the manifest says so."""
    from runtime import tolerances

    monkeypatch.setitem(tolerances.ACCURACY_BOUNDS, "fp16", {"min_top1": 1.01})  # top-1 agreement cannot exceed 1
    work = tmp_path / "work"
    work.mkdir()
    out = str(work / "fp16")
    args = ["quantize", "--model", trained.bundle("fp32"), "--out", out, "--precision", "fp16",
            "--eval-data", trained.eval_file, "--eval-samples", "8", "--quiet"]
    text = _error(args, out)
    assert "--precision fp16: measured accuracy breaks runtime/tolerances.py ACCURACY_BOUNDS" in text
    assert "top-1 agreement" in text and "< 1.01" in text and "--accept-accuracy-loss" in text
    assert os.listdir(work) == []

    res = _run(args + ["--accept-accuracy-loss"])
    assert res.exit_code == 0, res.output
    bounds = read_manifest(out, verify_checksums=True).extra["accuracy"]["bounds"]
    assert bounds["limits"] == {"min_top1": 1.01} and bounds["accepted"] == "--accept-accuracy-loss"
    assert len(bounds["broken"]) == 1 and bounds["broken"][0].startswith("top-1 agreement ")
    assert os.listdir(work) == ["fp16"]


def test_quantize_within_bounds_records_them(trained):
    bounds = read_manifest(trained.quantized("int4", precision="int4").bundle_dir).extra["accuracy"]["bounds"]
    assert bounds == {"limits": {"max_ppl_ratio": 1.10}, "broken": []}


def test_existing_out_needs_overwrite(tmp_path, trained):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["quantize", "--model", trained.bundle("fp32"), "--out", str(out),
                                    "--precision", "fp16", "--no-eval"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert os.listdir(out) == ["keep.txt"]
    # --overwrite replaces only what glm-export wrote: a directory without our marker stays as it is
    res = CliRunner().invoke(main, ["quantize", "--model", trained.bundle("fp32"), "--out", str(out),
                                    "--precision", "fp16", "--no-eval", "--overwrite", "--quiet"])
    assert res.exit_code == 2 and "not written by glm-export" in res.output
    assert os.listdir(out) == ["keep.txt"]
    ours = tmp_path / "ours"
    for _ in range(2):  # the second run replaces the first run's bundle
        res = CliRunner().invoke(main, ["quantize", "--model", trained.bundle("fp32"), "--out", str(ours),
                                        "--precision", "fp16", "--no-eval", "--overwrite", "--quiet"])
        assert res.exit_code == 0, res.output
    assert read_manifest(str(ours)).precision == "fp16"


def test_train_tiny_example_is_deterministic(tmp_path):
    """examples/train_tiny.py runs (a few steps here) and the same settings give the same weights, byte for byte."""
    import subprocess
    import sys

    from runtime.manifest import sha256_of

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name / "ckpt"
        res = subprocess.run([sys.executable, os.path.join(root, "examples", "train_tiny.py"), "--out", str(out),
                              "--steps", "3", "--write-data"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "held-out next-token accuracy" in res.stdout
        report = json.load(open(out / "train_report.json", encoding="utf-8"))
        assert report["settings"]["steps"] == 3 and 0 <= report["heldout_next_token_accuracy"] <= 1
        assert sum(1 for _ in open(tmp_path / name / "eval.jsonl", encoding="utf-8")) == 500
        digests.append(sha256_of(str(out / "model.safetensors")))
    assert digests[0] == digests[1]
