"""Exported ONNX vs transformers (independent reference): prefill and cached decode steps, batch 1 and batch 2 with
left padding, greedy decoding; and THUDM vs transformers layout of the same weights."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import CASES
from onnx_steps import OnnxStepper, left_padded_batch, reference_greedy, reference_logits
from reference import transformers_model
from runtime.steps import extend_mask
from runtime.tolerances import allowed_diff

TOL = allowed_diff("onnx_vs_transformers", "fp32")


def _reference_for(ckpt, stepper):
    spec = stepper.spec
    interp = spec.rope_position_scale if spec.rope_scaling == "interpolation" else 1.0
    return transformers_model(ckpt, rope_interpolation=interp)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lengths", [(9,), (9, 5)], ids=["batch1", "batch2-leftpad"])
def test_prefill_and_cached_decode_match_transformers(tiny_models, case, lengths):
    ckpt, bundle = tiny_models.case(case)
    stepper = OnnxStepper(bundle)
    ref = _reference_for(ckpt, stepper)
    vocab = stepper.spec.vocab_size
    ids, mask = left_padded_batch(vocab, lengths, seed=1)
    got = stepper.start(ids, mask)
    want = reference_logits(ref, ids, mask)
    real = mask > 0
    assert np.abs(got - want)[real].max() <= TOL
    rng = np.random.default_rng(2)
    for step in range(4):
        tok = rng.integers(0, vocab, len(lengths))
        got_step = stepper.step(tok)
        ids = np.concatenate([ids, tok[:, None]], 1)
        mask = extend_mask(mask)
        want_step = reference_logits(ref, ids, mask)[:, -1]
        diff = np.abs(got_step - want_step).max()
        assert diff <= TOL, f"decode step {step + 1}: max diff {diff}"


@pytest.mark.parametrize("case", ["chatglm3-thudm-hd32", "glm4_0414-hf", "glm4-thudm"])
@pytest.mark.parametrize("lengths", [(6,), (6, 3)], ids=["batch1", "batch2-leftpad"])
def test_greedy_32_tokens_equal_transformers_generate(tiny_models, case, lengths):
    ckpt, bundle = tiny_models.case(case)
    stepper = OnnxStepper(bundle)
    ref = _reference_for(ckpt, stepper)
    ids, mask = left_padded_batch(stepper.spec.vocab_size, lengths, seed=3)
    eos = stepper.spec.eos_token_ids
    got = stepper.greedy(ids, mask, 32, eos)
    want = reference_greedy(ref, ids, mask, 32, eos)
    assert got == want
    assert max(len(g) for g in got) > 1


def test_thudm_and_glm_layouts_export_identical_logits(tiny_models):
    shape = dict(head_dim=32, vocab_size=1009)
    thudm = tiny_models.checkpoint("same-thudm", "glm4", "thudm", seed=7, **shape)
    hf = tiny_models.checkpoint("same-hf", "glm4", "hf", seed=7, **shape)
    a = OnnxStepper(tiny_models.bundle("same-thudm", thudm))
    b = OnnxStepper(tiny_models.bundle("same-hf", hf))
    assert a.manifest.source["layout"] == "thudm" and b.manifest.source["layout"] == "glm"
    ids, mask = left_padded_batch(1009, (8, 4), seed=5)
    la, lb = a.start(ids, mask), b.start(ids, mask)
    tol = allowed_diff("layout_vs_layout", "fp32")
    assert np.abs(la - lb)[mask > 0].max() <= tol
    tok = np.array([3, 4])
    assert np.abs(a.step(tok) - b.step(tok)).max() <= tol


@pytest.mark.parametrize("weight_format", ["sharded", "bin"])
def test_weight_formats_export_the_same_model(tiny_models, weight_format):
    base_ckpt, base_bundle = tiny_models.case("chatglm3-thudm-hd32")
    gen, layout, shape, _ = CASES["chatglm3-thudm-hd32"]
    ckpt = tiny_models.checkpoint("fmt-" + weight_format, gen, layout, weight_format=weight_format, **shape)
    bundle = tiny_models.bundle("fmt-" + weight_format, ckpt)
    ids, mask = left_padded_batch(1001, (5,), seed=0)
    same = np.array_equal(OnnxStepper(bundle).start(ids, mask), OnnxStepper(base_bundle).start(ids, mask))
    assert same
    with open(os.path.join(bundle, "manifest.json")) as f:
        files = json.load(f)["source"]["weight_files"]
    assert files == (["pytorch_model.bin"] if weight_format == "bin"
                     else ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])


def test_rope_ratio_meanings_differ_and_follow_the_family(tiny_models):
    """ChatGLM2-32k divides positions by rope_ratio; ChatGLM3-32k multiplies the base."""
    s2 = OnnxStepper(tiny_models.case("chatglm2_32k-thudm-interp")[1]).spec
    s3 = OnnxStepper(tiny_models.case("chatglm3_32k-thudm-hd64")[1]).spec
    assert (s2.rope_scaling, s2.rope_position_scale, s2.rope_theta) == ("interpolation", 16.0, 10000.0)
    assert (s3.rope_scaling, s3.rope_position_scale, s3.rope_theta) == ("base", 1.0, 500000.0)
