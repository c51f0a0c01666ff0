"""One-pass checkpoint detection: ChatGLM2's original config (no model_type), a THUDM GLM-4 directory without
tokenizer files, the published vocab sizes, conflicting signals (one-line error naming them, --generation
overrides), and the manifest's record of the deciding signal."""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from exporter.cli import main
from exporter.config import spec_from_checkpoint
from exporter.tiny.published import PUBLISHED_CONFIGS, PUBLISHED_HF_CONFIGS
from runtime.errors import ConfigError

# ChatGLM2-6B's config.json as first published: no model_type; auto_map names the remote code
CHATGLM2_ORIGINAL_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
}


def _dir_with(tmp_path, cfg, **files):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name, text in files.items():
        (tmp_path / name.replace("__", ".")).write_text(text)
    return str(tmp_path)


def _without(cfg, *keys):
    return {k: v for k, v in cfg.items() if k not in keys}


def test_chatglm2_original_config_without_model_type(tmp_path):
    cfg = dict(_without(PUBLISHED_CONFIGS["chatglm2"], "model_type"), auto_map=CHATGLM2_ORIGINAL_AUTO_MAP)
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg))
    assert (info.layout, spec.generation, spec.chat_format) == ("thudm", "chatglm2", "chatglm2")
    assert "_name_or_path" in info.detection.family_decided_by
    assert info.detection.layout_decided_by.startswith("config.json architectures")


def test_auto_map_alone_says_thudm(tmp_path):
    cfg = dict(_without(PUBLISHED_CONFIGS["chatglm3"], "model_type", "architectures", "_name_or_path"),
               auto_map=CHATGLM2_ORIGINAL_AUTO_MAP)
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg))
    assert info.layout == "thudm" and info.detection.layout_decided_by == "config.json auto_map names modeling_chatglm"
    assert spec.generation == "chatglm3" and info.detection.family_decided_by.startswith("default")


def test_glm4_thudm_config_without_tokenizer_is_glm4(tmp_path):
    cfg = _without(PUBLISHED_CONFIGS["glm4"], "_name_or_path")  # only the vocab and eos ids say GLM-4
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg))
    assert (spec.generation, spec.chat_format, spec.tokenizer_kind) == ("glm4", "glm4", "none")
    assert info.detection.family_decided_by == "config.json padded_vocab_size 151552"


def test_remote_tokenizer_code_is_read_as_text(tmp_path):
    cfg = _without(PUBLISHED_CONFIGS["chatglm3"], "_name_or_path", "padded_vocab_size")
    cfg["padded_vocab_size"] = 1000
    code = "import tiktoken\nclass ChatGLM4Tokenizer:\n    raise SystemExit('never run')\n"
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg, tokenization_chatglm__py=code))
    assert spec.generation == "glm4" and "tokenization_chatglm.py" in info.detection.family_decided_by


def test_chatglm1_detected_from_its_own_signals(tmp_path):
    """ChatGLM-6B (v1) is told apart by its vocabulary and its own config fields, without a name or tokenizer."""
    from exporter.tiny.published import PUBLISHED_V1_CONFIGS

    cfg = _without(PUBLISHED_V1_CONFIGS["chatglm1"], "_name_or_path")
    spec, info = spec_from_checkpoint(_dir_with(tmp_path, cfg))
    assert spec.generation == "chatglm1" and info.layout == "thudm-v1"
    decided = info.detection.family_decided_by
    assert "vocab_size 130528" in decided or "position_encoding_2d" in decided


def test_chatglm1_fields_on_a_chatglm3_name_conflict(tmp_path):
    cfg = dict(PUBLISHED_CONFIGS["chatglm3"], position_encoding_2d=True)  # name says chatglm3, field says v1
    with pytest.raises(ConfigError, match="disagree"):
        spec_from_checkpoint(_dir_with(tmp_path, cfg))


def test_conflicting_signals_name_both_and_the_override(tmp_path):
    cfg = dict(PUBLISHED_CONFIGS["chatglm3"], padded_vocab_size=151552)  # name says chatglm3, vocab says GLM-4
    d = _dir_with(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        spec_from_checkpoint(d)
    msg = str(e.value)
    assert "padded_vocab_size 151552" in msg and "_name_or_path 'THUDM/chatglm3-6b'" in msg
    assert "--generation" in msg
    spec, info = spec_from_checkpoint(d, generation="glm4")
    assert spec.generation == "glm4" and info.detection.overridden


def test_layout_conflict_between_model_type_and_architectures(tmp_path):
    cfg = dict(PUBLISHED_HF_CONFIGS["glm4"], architectures=["ChatGLMModel"])
    with pytest.raises(ConfigError, match="layout.*model_type 'glm'.*architectures"):
        spec_from_checkpoint(_dir_with(tmp_path, cfg))


def test_config_with_no_model_signal_is_refused(tmp_path):
    cfg = _without(PUBLISHED_CONFIGS["chatglm3"], "model_type", "architectures")
    with pytest.raises(ConfigError, match="no 'model_type'"):
        spec_from_checkpoint(_dir_with(tmp_path, cfg))


def _export(ckpt, out, *extra):
    return CliRunner().invoke(main, ["onnx", "--model", str(ckpt), "--out", str(out), "--quiet", *extra])


def test_conflict_is_one_line_and_writes_nothing(tmp_path):
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), generation="glm4", seed=3)  # tiktoken tokenizer
    cfg = json.loads(open(os.path.join(ckpt, "config.json")).read())
    cfg["_name_or_path"] = "THUDM/chatglm2-6b"
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(cfg))
    out = tmp_path / "out" / "bundle"
    result = _export(ckpt, out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tokenizer.model tiktoken" in lines[0] and "chatglm2-6b" in lines[0], lines
    assert not os.path.exists(out) and not os.path.exists(out.parent)


def test_exports_of_old_chatglm2_and_tokenizerless_glm4(tmp_path):
    """Exported end to end: the manifest records the decision and the chat format."""
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    old = write_tiny_checkpoint(str(tmp_path / "chatglm2"), generation="chatglm2", seed=4)
    cfg = json.loads(open(os.path.join(old, "config.json")).read())
    cfg = dict(_without(cfg, "model_type"), auto_map=CHATGLM2_ORIGINAL_AUTO_MAP)
    open(os.path.join(old, "config.json"), "w").write(json.dumps(cfg))
    glm4 = write_tiny_checkpoint(str(tmp_path / "glm4"), generation="glm4", seed=4, tokenizer=False)
    assert not any(n.startswith("tokeniz") for n in os.listdir(glm4))
    for ckpt, generation, chat in ((old, "chatglm2", "chatglm2"), (glm4, "glm4", "glm4")):
        out = tmp_path / ("bundle-" + generation)
        result = _export(ckpt, out)
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert (manifest["spec"]["generation"], manifest["spec"]["chat_format"]) == (generation, chat)
        detection = manifest["source"]["detection"]
        assert detection["family"] == generation and detection["family_decided_by"]
        assert detection["signals"]


@pytest.mark.parametrize("generation,layout", [("glm4", "thudm"), ("glm4", "hf"), ("chatglm3", "thudm")])
def test_tiny_checkpoints_of_fixed_vocab_shapes_are_detected_as_written(tmp_path, generation, layout):
    """The benchmark shapes use ChatGLM3's 65024 rows; a GLM-4 written in such a shape must not carry ChatGLM3's
    vocabulary signal (detection would refuse our own checkpoint). Written at the tiny width to stay cheap."""
    from exporter.config import spec_from_checkpoint
    from exporter.tiny.checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(str(tmp_path / "c"), generation=generation, layout=layout, vocab_size=65024)
    spec, _ = spec_from_checkpoint(ckpt)
    assert spec.generation.startswith(generation)
    assert spec.vocab_size == (65024 if generation == "chatglm3" else 65000)
