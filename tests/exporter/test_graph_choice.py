"""exporter/graph_choice.py: the one rule deciding whether a bundle gets the fused onnxruntime graph. The published
ChatGLM2+ configs fit it; each form the fused builder cannot express (fp16, kept THUDM quantization, a P-tuning
prefix, ChatGLM-6B's 2D positions / prefix-LM mask / LayerNorm+GELU block) is refused with its reason. The exports
of those forms (test_ptuning.py, test_thudm_quantized.py, runtime/test_chatglm1_runtime.py) check that the
manifest records the fallback and the runtime runs the portable graph."""
from __future__ import annotations

import dataclasses
import json

import pytest

from exporter.config import spec_from_checkpoint
from exporter.graph_choice import fused_graph_refusal
from exporter.tiny.published import PUBLISHED_CONFIGS, PUBLISHED_HF_CONFIGS
from runtime.spec import ACT_GELU_TANH, ATTENTION_PREFIX_LM, NORM_LAYER, POSITIONS_2D_BLOCK


def _spec(tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return spec_from_checkpoint(str(tmp_path))[0]


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_chatglm2_and_later_fit_the_fused_graph(tmp_path, name):
    assert fused_graph_refusal(_spec(tmp_path, PUBLISHED_CONFIGS[name]), "fp32", False) is None


def test_glm4_0414_sandwich_norms_fit_the_fused_graph(tmp_path):
    assert fused_graph_refusal(_spec(tmp_path, PUBLISHED_HF_CONFIGS["glm4-0414"]), "fp32", False) is None


@pytest.mark.parametrize("precision", ["fp32", "int8", "int8-dynamic", "int4"])
def test_quantized_precisions_take_the_fused_graph(tmp_path, precision):
    """The streamed export's direct precisions (and quantize of a bundle with a fused graph) carry it; the rule
    is runtime.manifest.PRECISION_TABLE's, which calibration/fused.py reads too."""
    from runtime.manifest import PRECISION_TABLE

    assert fused_graph_refusal(_spec(tmp_path, PUBLISHED_CONFIGS["chatglm3"]), precision, False) is None
    assert PRECISION_TABLE[precision].fused_graph and not PRECISION_TABLE["fp16"].fused_graph


@pytest.mark.parametrize("change,precision,kept,reason", [
    ({}, "fp16", False, "precision fp16"),
    ({}, "fp32", True, "kept THUDM checkpoint quantization"),
    ({"prefix_len": 16}, "fp32", False, "P-tuning v2 prefix of 16"),
    ({"position_kind": POSITIONS_2D_BLOCK}, "fp32", False, "position_kind 2d_block"),
    ({"attention_kind": ATTENTION_PREFIX_LM}, "fp32", False, "attention_kind prefix_lm"),
    ({"norm_kind": NORM_LAYER, "activation": ACT_GELU_TANH}, "fp32", False, "norm_kind layernorm, activation"),
])
def test_forms_the_fused_builder_cannot_express_are_refused(tmp_path, change, precision, kept, reason):
    spec = dataclasses.replace(_spec(tmp_path, PUBLISHED_CONFIGS["chatglm3"]), **change)
    refusal = fused_graph_refusal(spec, precision, kept)
    assert refusal is not None and reason in refusal
