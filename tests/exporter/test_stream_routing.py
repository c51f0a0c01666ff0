"""Which export flow a checkpoint takes: plain checkpoints stream (issue 15), the forms the streaming export does
not handle yet take the whole-model flow (exporter.checkpoint_forms.CheckpointForms.streaming_blocker), and a
direct quantized export of such a form is refused with the two-step alternative."""
from __future__ import annotations

import json
import logging
import os

from click.testing import CliRunner

from exporter.cli import main


def test_plain_checkpoint_streams_and_records_its_detection(tiny_models):
    ckpt, bundle = tiny_models.case("glm4-thudm")
    manifest = json.loads(open(os.path.join(bundle, "manifest.json")).read())
    assert "streamed_export" in manifest["extra"]  # the streaming writer made it
    assert manifest["source"]["detection"]["family"] == "glm4"  # the forms' record reached the streamed manifest
    assert manifest["verification"]["max_abs_diff"]


def test_v1_checkpoint_takes_the_whole_model_flow(tiny_models, tmp_path, caplog):
    from exporter.checkpoint_forms import prepare_forms
    from exporter.onnx_export import export_bundle
    from conftest import V1_SHAPE

    ckpt = tiny_models.checkpoint("chatglm1", "chatglm1", "thudm", **V1_SHAPE)
    assert "ChatGLM-6B (v1)" in prepare_forms(ckpt).streaming_blocker()
    out = str(tmp_path / "v1")
    with caplog.at_level(logging.INFO, logger="glm_export"):
        result = export_bundle(ckpt, out)  # streaming=True is the default
    assert any("does not handle a ChatGLM-6B (v1) checkpoint" in r.getMessage() for r in caplog.records)
    assert "streamed_export" not in result.manifest.extra
    assert result.manifest.spec.generation == "chatglm1"
    assert result.max_diffs and result.manifest.verification["against"] == "pytorch"


def test_plain_checkpoint_has_no_blocker(tiny_models):
    from exporter.checkpoint_forms import prepare_forms

    ckpt, _ = tiny_models.case("glm4-thudm")
    assert prepare_forms(ckpt).streaming_blocker() is None


def test_direct_quantized_export_of_a_v1_checkpoint_is_refused(tiny_models, tmp_path):
    from conftest import V1_SHAPE

    ckpt = tiny_models.checkpoint("chatglm1", "chatglm1", "thudm", **V1_SHAPE)
    out = tmp_path / "out" / "v1-int4"
    result = CliRunner().invoke(main, ["onnx", "--model", ckpt, "--out", str(out), "--precision", "int4", "--quiet"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert "ChatGLM-6B (v1)" in result.output and "--precision fp32" in result.output
    assert "glm-export quantize --precision int4" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything was staged
