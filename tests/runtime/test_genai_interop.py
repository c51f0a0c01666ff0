"""onnxruntime-genai runs our bundles: ``og.Model(bundle)`` (genai_config.json + model.genai.onnx over the fused
graph, shared-buffer cache) generates the runtime's greedy ids, fp32 and quantized, for each generation."""
from __future__ import annotations

import json
import os

import pytest

from genai_greedy import genai_greedy
from runtime import GenerationConfig, GlmModel

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the 'test' and 'bench' extras' peer")


def _genai_greedy(bundle, prompt, new_tokens):
    return genai_greedy(og, bundle, prompt, new_tokens)


def _ours(bundle, prompt, new_tokens):
    with GlmModel.load(bundle, threads=1) as model:
        cfg = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
        return model.generate(prompt, cfg).generated_ids


@pytest.mark.parametrize("case", ["chatglm3-thudm-hd32", "glm4_0414-hf", "chatglm2_32k-thudm-interp", "glm4-hf"])
def test_genai_generates_our_greedy_ids(tiny_models, case):
    _, bundle = tiny_models.case(case)
    with open(os.path.join(bundle, "genai_config.json")) as f:
        cfg = json.load(f)
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["decoder"]["filename"] == "model.genai.onnx"
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    assert _genai_greedy(bundle, prompt, 24) == _ours(bundle, prompt, 24)


def test_genai_runs_a_quantized_bundle(tiny_models, tmp_path):
    from calibration.pipeline import QuantizeOptions, quantize_bundle

    _, src = tiny_models.case("glm4-thudm")
    out = str(tmp_path / "int4")
    os.makedirs(out)
    quantize_bundle(src, out, QuantizeOptions(precision="int4", evaluate=False))
    prompt = [3, 4, 5, 6, 7]
    assert _genai_greedy(out, prompt, 16) == _ours(out, prompt, 16)
