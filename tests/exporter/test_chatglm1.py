"""ChatGLM-6B (v1): the independent numpy reference checked by hand on one layer; the exported ONNX against it on a
prefill and 4 cached decode steps (batch 1, batch 2 left-padded); each v1 trap shown to move the logits far beyond
the tolerance when done the ChatGLM2 way; config detection, weights and refusals."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import reference_chatglm1 as ref
from onnx_steps import OnnxStepper
from runtime.steps import left_pad
from runtime.tolerances import allowed_diff

TOL = allowed_diff("onnx_vs_numpy_v1", "fp32")


# ------------------------------------------------------------------------------------------------ the reference


def _hand_layer(h, w, config):
    """One v1 layer on a 2-token [gMASK] <sop> sequence, one head of 4 dims, written out scalar by scalar.

    Token 0 ([gMASK]) has position 0, block 0; token 1 (<sop>) position 0 (the gMASK's), block 1. Each rotary half
    has 2 dims and one frequency, 1.0 (fp16-exact). Token 0 sees only itself (<sop> is not context); token 1 sees
    both. alpha = sqrt(2 * 1 layer); layer-scaling coefficient 1."""
    alpha = math.sqrt(2.0)

    def ln(x, g, b):
        m = sum(x) / 4
        v = sum((xi - m) ** 2 for xi in x) / 4
        return [(xi - m) / math.sqrt(v + 1e-5) * gi + bi for xi, gi, bi in zip(x, g, b)]

    def linear(x, weight, bias):
        return [sum(weight[o][i] * x[i] for i in range(len(x))) + bias[o] for o in range(len(weight))]

    def rot(vec, angle_first, angle_second):  # rotate-half within each 2-dim half
        a, b, c, d = vec
        return [a * math.cos(angle_first) - b * math.sin(angle_first), b * math.cos(angle_first) + a * math.sin(angle_first),
                c * math.cos(angle_second) - d * math.sin(angle_second), d * math.cos(angle_second) + c * math.sin(angle_second)]

    x = [ln(t, w["in_w"], w["in_b"]) for t in h]
    mixed = [linear(t, w["qkv_w"], w["qkv_b"]) for t in x]
    angles = [(0.0, 0.0), (0.0, 1.0)]  # (position, block position) x inv_freq 1.0
    q = [rot(m[0:4], *a) for m, a in zip(mixed, angles)]
    k = [rot(m[4:8], *a) for m, a in zip(mixed, angles)]
    v = [m[8:12] for m in mixed]
    visible = [[0], [0, 1]]
    out = []
    for i in range(2):
        scores = [sum(q[i][c] * k[j][c] for c in range(4)) / 2.0 for j in visible[i]]  # sqrt(4) = 2
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        probs = [x_ / sum(e) for x_ in e]
        ctx = [sum(p * v[j][c] for p, j in zip(probs, visible[i])) for c in range(4)]
        attn = linear(ctx, w["dense_w"], w["dense_b"])
        h1 = [xi * alpha + ai for xi, ai in zip(x[i], attn)]
        x2 = ln(h1, w["post_w"], w["post_b"])
        up = linear(x2, w["up_w"], w["up_b"])
        act = [0.5 * u * (1 + math.tanh(0.7978845608028654 * (u + 0.044715 * u ** 3))) for u in up]
        down = linear(act, w["down_w"], w["down_b"])
        out.append([xi * alpha + di for xi, di in zip(x2, down)])
    return out


def test_reference_layer_matches_a_hand_computation():
    rng = np.random.default_rng(7)
    w = {"in_w": [1.0, 0.5, 2.0, 1.5], "in_b": [0.1, -0.2, 0.0, 0.3], "post_w": [0.8, 1.2, 1.0, 0.9],
         "post_b": [0.0, 0.1, -0.1, 0.2]}
    for name, shape in (("qkv", (12, 4)), ("dense", (4, 4)), ("up", (6, 4)), ("down", (4, 6))):
        w[name + "_w"] = rng.normal(size=shape).round(2).tolist()
        w[name + "_b"] = rng.normal(size=shape[0]).round(2).tolist()
    h = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0]]
    config = {"hidden_size": 4, "num_attention_heads": 1, "num_layers": 1, "layernorm_epsilon": 1e-5,
              "mask_token_id": 5, "gmask_token_id": 6, "bos_token_id": 7}
    p = "transformer.layers.0."
    sd = {p + "input_layernorm.weight": np.array(w["in_w"]), p + "input_layernorm.bias": np.array(w["in_b"]),
          p + "post_attention_layernorm.weight": np.array(w["post_w"]),
          p + "post_attention_layernorm.bias": np.array(w["post_b"])}
    for ours, theirs in (("qkv", "attention.query_key_value"), ("dense", "attention.dense"),
                         ("up", "mlp.dense_h_to_4h"), ("down", "mlp.dense_4h_to_h")):
        sd[p + theirs + ".weight"] = np.array(w[ours + "_w"])
        sd[p + theirs + ".bias"] = np.array(w[ours + "_b"])
    ids = [6, 7]
    positions = ref.thudm_positions(ids, config)
    assert positions.tolist() == [[0, 0], [0, 1]]
    mask = ref.thudm_mask(ids, config)
    assert mask.tolist() == [[False, True], [False, False]]  # [gMASK] does not see <sop>
    # two values anyone can check: LayerNorm of 1, 2, 3, 4 is (x - 2.5) / sqrt(1.25 + eps)
    assert ref.layer_norm(np.array([1.0, 2.0, 3.0, 4.0]), 1.0, 0.0, 1e-5)[0] == pytest.approx(-1.5 / math.sqrt(1.25001))
    got = ref.layer(np.array(h), sd, 0, config, positions, mask)
    assert np.allclose(got, _hand_layer(h, w, config), atol=1e-9, rtol=0)


def test_reference_positions_follow_thudm():
    config = {"mask_token_id": 100, "gmask_token_id": 101, "bos_token_id": 104}
    # context a b c [gMASK], then <sop> and two generated tokens
    assert ref.thudm_positions([1, 2, 3, 101, 104, 9, 9], config).tolist() == [
        [0, 1, 2, 3, 3, 3, 3], [0, 0, 0, 0, 1, 2, 3]]
    # a [MASK] in the middle: what follows <sop> takes the MASK's position
    assert ref.thudm_positions([1, 100, 3, 101, 104, 9], config).tolist()[0] == [0, 1, 2, 3, 1, 1]


# ------------------------------------------------------------------------------------------------ ONNX vs reference


def _prompts(config, lengths, seed=1):
    rng = np.random.default_rng(seed)
    text = (20010, config["vocab_size"] - 8)  # ordinary text ids of the tiny ice_text vocabulary
    return [list(map(int, rng.integers(*text, n))) + [config["gmask_token_id"], config["bos_token_id"]]
            for n in lengths]


def _run_onnx(bundle, prompts, decode):
    stepper = OnnxStepper(bundle)
    ids, mask, _ = left_pad(prompts, stepper.spec.pad_token_id)
    prefill = stepper.start(ids, mask)
    steps = [stepper.step(tok) for tok in decode]  # (B, V) each
    return ids, mask, prefill, steps


@pytest.fixture(scope="module")
def v1(chatglm1_model):
    ckpt, bundle = chatglm1_model
    config, sd = ref.load_checkpoint(ckpt)
    return ckpt, bundle, config, sd


@pytest.fixture(scope="module", params=["tied", "untied"])
def v1_both(request):
    """The published (tied lm_head) and the untied tiny ChatGLM-6B."""
    ckpt, bundle = request.getfixturevalue("chatglm1_model" if request.param == "tied" else "chatglm1_untied")
    config, sd = ref.load_checkpoint(ckpt)
    return ckpt, bundle, config, sd


@pytest.mark.parametrize("lengths", [(11,), (11, 5)], ids=["batch1", "batch2-leftpad"])
def test_onnx_matches_reference_prefill_and_4_cached_decode_steps(v1_both, lengths):
    _, bundle, config, sd = v1_both
    prompts = _prompts(config, lengths)
    decode = np.random.default_rng(3).integers(20010, config["vocab_size"] - 8, size=(4, len(lengths)))
    ids, mask, prefill, steps = _run_onnx(bundle, prompts, decode)
    for r, prompt in enumerate(prompts):
        want = ref.logits(prompt + decode[:, r].tolist(), config, sd)  # full recompute, no cache
        n = len(prompt)
        assert np.abs(prefill[r][mask[r] > 0] - want[:n]).max() <= TOL
        for k, got in enumerate(steps):
            assert np.abs(got[r] - want[n + k]).max() <= TOL, f"row {r} decode step {k + 1}"


@pytest.mark.parametrize("variant", ref.VARIANTS)
def test_each_v1_trap_done_the_chatglm2_way_moves_logits_beyond_tolerance(v1, variant):
    """The ONNX graph matches the reference (test above); the reference with one detail done the ChatGLM2 way
    (grouped QKV, block positions ignored, 1D positions, plain residual, no LayerNorm bias, exact fp32 rotary
    frequencies, erf GELU, causal attention) is far from the graph, so an export with that mistake would fail."""
    _, bundle, config, sd = v1
    prompts = _prompts(config, (11,))
    decode = np.random.default_rng(3).integers(20010, config["vocab_size"] - 8, size=(4, 1))
    _, _, prefill, steps = _run_onnx(bundle, prompts, decode)
    got = np.concatenate([prefill[0], np.stack([s[0] for s in steps])])
    wrong = ref.logits(prompts[0] + decode[:, 0].tolist(), config, sd, variant)
    assert np.abs(got - wrong).max() > 5 * TOL


def test_block_positions_matter_in_decode(v1):
    """Decode steps with the block position held at 1 (as if every generated token were <sop>) give other logits:
    the graph reads row 1 of position_ids."""
    from runtime import graph_contract as gc
    from runtime.steps import decode_feeds

    _, bundle, config, sd = v1
    prompt = _prompts(config, (6,))[0]
    stepper = OnnxStepper(bundle)
    ids, mask, _ = left_pad([prompt], 3)
    stepper.start(ids, mask)
    right = stepper.step(np.array([20050]))
    stepper.start(ids, mask)
    feeds = decode_feeds(np.array([20050]), stepper.mask)
    feeds[gc.POSITION_IDS] = np.array([[[6], [1]]])  # right: [[6], [2]] (mask position 6, block 2)
    wrong = stepper._run(feeds)[:, -1]
    want = ref.logits(prompt + [20050], config, sd)[-1]
    assert np.abs(right[0] - want).max() <= TOL
    assert np.abs(wrong[0] - want).max() > 5 * TOL


def test_bundle_records_the_2d_position_contract(v1):
    _, bundle, config, _ = v1
    with open(os.path.join(bundle, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    pos = next(t for t in manifest["inputs"] if t["name"] == "position_ids")
    assert pos["shape"] == ["batch", 2, "seq"]
    spec = manifest["spec"]
    assert (spec["generation"], spec["position_kind"], spec["attention_kind"], spec["qkv_layout"]) == (
        "chatglm1", "2d_block", "prefix_lm", "per_head")
    assert spec["residual_alpha"] == pytest.approx(math.sqrt(2 * config["num_layers"]))
    assert spec["special_tokens"]["<sop>"] == config["bos_token_id"]
    assert spec["eos_token_ids"] == [config["eos_token_id"]]
    assert manifest["verification"]["max_abs_diff"]["logits.prefill"] <= TOL
