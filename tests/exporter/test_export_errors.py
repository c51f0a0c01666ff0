"""Bad input to `glm-export onnx`: each a one-line error naming what is wrong, exit 2, no traceback, nothing left
behind at --out (nor a temporary directory beside it)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from exporter.cli import main


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("good") / "ckpt"), generation="chatglm3", seed=1)


@pytest.fixture
def ckpt(good_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, path)
    return path


def _export(tmp_path, model_dir, *extra):
    out = tmp_path / "out" / "bundle"
    result = CliRunner().invoke(main, ["onnx", "--model", str(model_dir), "--out", str(out), "--quiet", *extra])
    return result, out


def _assert_clean_failure(result, out, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not os.path.exists(out)
    parent = os.path.dirname(out)
    if os.path.isdir(parent):
        assert [n for n in os.listdir(parent) if ".tmp-" in n] == []


def _edit_config(ckpt, **changes):
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(ckpt, edit):
    from safetensors.torch import load_file, save_file

    path = str(ckpt / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_directory_without_config(tmp_path, ckpt):
    os.remove(ckpt / "config.json")
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, "config.json", "missing")


def test_unknown_model_type(tmp_path, ckpt):
    _edit_config(ckpt, model_type="llama")
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, "model_type", "llama")


# pre_seq_len (P-tuning v2) and quantization_bit 4/8 are read now: tests/exporter/test_checkpoint_forms.py
@pytest.mark.parametrize("field,value", [("quantization_bit", 2), ("add_bias_linear", True)])
def test_unsupported_field(tmp_path, ckpt, field, value):
    _edit_config(ckpt, **{field: value})
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, f"'{field}'", "not supported")


def test_missing_weight(tmp_path, ckpt):
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    _edit_weights(ckpt, lambda t: t.pop(key))
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, key, "missing")


def test_unexpected_extra_weight(tmp_path, ckpt):
    import torch

    key = "transformer.encoder.layers.9.mlp.dense_4h_to_h.weight"
    _edit_weights(ckpt, lambda t: t.__setitem__(key, torch.zeros(2, 2)))
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, key, "unexpected")


def test_weight_of_wrong_shape_names_key_and_both_shapes(tmp_path, ckpt):
    key = "transformer.encoder.layers.0.self_attention.dense.weight"

    def shrink(t):
        t[key] = t[key][:, :-1].contiguous()

    _edit_weights(ckpt, shrink)
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, key, "(128, 127)", "(128, 128)")


def test_truncated_safetensors(tmp_path, ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, "model.safetensors")


def test_out_not_writable(tmp_path, ckpt):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "bundle"
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--out" in result.output and "cannot write" in result.output
    assert blocker.read_text() == "not a directory"


def test_existing_bundle_needs_overwrite(tmp_path, ckpt):
    out = tmp_path / "out" / "bundle"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a directory of ours (a bundle's manifest, a checkpoint stamp): not this one
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", "--overwrite"])
    assert result.exit_code == 2 and "not written by glm-export" in result.output, result.output
    assert sorted(os.listdir(out)) == ["keep.txt"]
    (out / "manifest.json").write_text("{}")  # a previous bundle
    result = CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "model.onnx", "config.json", "tokenizer.model",
                                              "tokenizer_config.json", "model.fused.onnx", "model.genai.onnx",
                                              "genai_config.json", "checkpoint_config.json",
                                              "generation_config.json"])
    assert [n for n in os.listdir(out.parent) if n != "bundle"] == []


def test_verification_failure_is_an_error_listing_each_output(tmp_path, ckpt, monkeypatch):
    """A graph that disagrees with PyTorch fails the export (exit 2) and lists every output's max difference."""
    import calibration.stream_write as sw

    real = sw.read_only_once  # the streaming export's write path (the reference reads the checkpoint itself)

    def corrupt(read):  # the written graph now differs from the reference run
        return real(lambda name, dtype: read(name, dtype) * (1.5 if name == "final_norm.weight" else 1))

    monkeypatch.setattr(sw, "read_only_once", corrupt)
    result, out = _export(tmp_path, ckpt)
    _assert_clean_failure(result, out, "differs from PyTorch", "logits.prefill", "logits.decode3", "present")


def test_in_memory_verification_failure_is_an_error_listing_each_output(tmp_path, ckpt, monkeypatch):
    """The whole-model flow (--in-memory; also every checkpoint form the streaming export routes there) fails the
    same way when its traced graph disagrees with the PyTorch reference run."""
    import exporter.onnx_export as oe

    real = oe.trace_to_onnx

    def corrupt(model, out_dir, opset=17, **kwargs):
        with __import__("torch").no_grad():
            model.final_norm.weight.mul_(1.5)  # the traced graph now differs from the reference run
        real(model, out_dir, opset, **kwargs)

    monkeypatch.setattr(oe, "trace_to_onnx", corrupt)
    result, out = _export(tmp_path, ckpt, "--in-memory")
    _assert_clean_failure(result, out, "differs from PyTorch", "logits.prefill", "logits.decode3", "present")


def test_no_verify_skips_the_comparison(tmp_path, ckpt):
    result, out = _export(tmp_path, ckpt, "--no-verify", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["max_abs_diff"] == {}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"] == {}
