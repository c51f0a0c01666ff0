"""Exact values of the quantization and accuracy arithmetic (calibration.qmath, calibration.accuracy), the fp16
colouring's union-find, and the keep-float selection. No model, no onnxruntime session: fast."""
from __future__ import annotations

import math

import numpy as np
import pytest

from calibration import qmath
from calibration.accuracy import Accumulator, check_bounds, kl_rows, log_softmax, token_nll
from calibration.errors import QuantizationError
from calibration.fp16 import ParityUnionFind
from calibration.targets import Linear, select


# ------------------------------------------------------------------------------------------------ scales


def test_symmetric_scale():
    assert qmath.symmetric_scale(127.0) == 1.0
    assert qmath.symmetric_scale(2.54) == pytest.approx(0.02, rel=1e-12)
    assert qmath.symmetric_scale(0.0) == 1.0  # an all-zero tensor: any scale represents it
    with pytest.raises(ValueError):
        qmath.symmetric_scale(-1.0)
    with pytest.raises(ValueError):
        qmath.symmetric_scale(float("inf"))


def test_quantize_symmetric_rounds_half_to_even_and_clips():
    q = qmath.quantize_symmetric(np.array([0.5, 1.5, 2.5, -2.5, 126.6, 300.0, -300.0]), 1.0)
    assert q.dtype == np.int8
    assert q.tolist() == [0, 2, 2, -2, 127, 127, -127]
    assert qmath.quantize_symmetric(np.array([0.26, -0.74]), 0.5).tolist() == [1, -1]


def test_dequantize():
    assert qmath.dequantize(np.array([1, -2, 127], np.int8), 0.5).tolist() == [0.5, -1.0, 63.5]
    assert qmath.dequantize(np.array([0, 64, 255], np.uint8), 0.25, 64).tolist() == [-16.0, 0.0, 47.75]


def test_per_channel_scales_are_per_output_column():
    w = np.array([[1.0, -4.0, 0.0], [2.0, 3.0, 0.0]], np.float32)  # (K=2, N=3)
    s = qmath.per_channel_scales(w, axis=1)
    np.testing.assert_array_equal(s, np.array([2 / 127, 4 / 127, 1.0], np.float32))
    np.testing.assert_array_equal(qmath.per_channel_scales(w, axis=0), np.array([4 / 127, 3 / 127], np.float32))


def fake_quant_per_channel(w: np.ndarray, axis: int, qmax: int = qmath.INT8_QMAX) -> np.ndarray:
    """w quantized per channel and dequantized again with the package's steps: what the INT8 graph computes with."""
    scales = qmath.per_channel_scales(w, axis, qmax)
    shape = [1] * np.ndim(w)
    shape[axis] = -1
    s = scales.reshape(shape)
    return qmath.dequantize(qmath.quantize_symmetric(w, s, qmax), s)


def test_fake_quant_per_channel_exact():
    w = np.array([[1.0, -4.0], [2.0, 3.0], [0.5, 0.01]], np.float32)
    got = fake_quant_per_channel(w, axis=1)
    s = np.array([2 / 127, 4 / 127], np.float32)
    q = np.clip(np.rint(w / s), -127, 127)
    np.testing.assert_array_equal(got, (q * s).astype(np.float32))
    assert got[1, 0] == pytest.approx(2.0, abs=1e-6)  # the channel's max is exact
    assert got[0, 0] == pytest.approx(64 * 2 / 127, abs=1e-6)  # 1 / (2/127) = 63.5 rounds half to even: 64
    assert got[2, 1] == 0.0  # 0.01 / (4/127) = 0.32 rounds to 0


# ------------------------------------------------------------------------------------------------ histograms


def test_abs_histogram_grows_by_merging_bins():
    h = qmath.AbsHistogram(bins=4)
    h.add(np.array([[0.5, 1.0], [-3.0, 0.0]]))  # width 3/4: bins [0, .75) [.75, 1.5) [1.5, 2.25) [2.25, 3]
    assert h.width == 0.75
    assert h.counts.tolist() == [2, 1, 0, 1]
    h.add(np.array([6.0]))  # beyond 3: width doubles once (range 6), pairs merge
    assert h.width == 1.5
    assert h.counts.tolist() == [3, 1, 0, 1]
    assert (h.amax, h.total) == (6.0, 5)
    h.add(np.zeros((2, 0)))  # an empty batch changes nothing
    assert h.total == 5


def test_abs_histogram_accepts_mixed_shapes_and_zeros():
    h = qmath.AbsHistogram(bins=8)
    h.add(np.zeros((1, 3)))
    assert h.counts[0] == 3 and h.width == 0.0
    for shape in [(2, 5, 4), (2, 1, 4), (3, 7)]:
        h.add(np.full(shape, -2.0))
    assert h.total == 3 + 40 + 8 + 21
    assert h.amax == 2.0 and h.counts[-1] == 69 and h.counts[0] == 3
    with pytest.raises(ValueError):
        h.add(np.array([np.nan]))
    with pytest.raises(ValueError):
        qmath.AbsHistogram(bins=6)


def test_merge_pairs():
    assert qmath.merge_pairs(np.array([1, 2, 3, 4])).tolist() == [3, 7, 0, 0]


def test_percentile_amax_is_an_upper_bin_edge():
    counts = np.array([5, 3, 2])
    assert qmath.percentile_amax(counts, 1.0, 50) == 1.0
    assert qmath.percentile_amax(counts, 1.0, 80) == 2.0
    assert qmath.percentile_amax(counts, 1.0, 80.01) == 3.0
    assert qmath.percentile_amax(counts, 0.5, 100) == 1.5
    assert qmath.percentile_amax(np.zeros(3), 1.0, 99) == 0.0
    with pytest.raises(ValueError):
        qmath.percentile_amax(counts, 1.0, 0)


def test_smooth_and_kl():
    np.testing.assert_allclose(qmath.smooth_distribution(np.array([0.5, 0.0, 0.5]), eps=0.1),
                               np.array([0.5, 0.1, 0.5]) / 1.1)
    assert qmath.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert qmath.kl_divergence([1, 3], [2, 6]) == pytest.approx(0.0, abs=1e-15)  # normalised first


def test_quantized_candidate_spreads_group_mass_over_nonempty_bins():
    np.testing.assert_array_equal(qmath.quantized_candidate(np.array([4, 2, 1, 1]), 2), [3.0, 3.0, 1.0, 1.0])
    np.testing.assert_array_equal(qmath.quantized_candidate(np.array([4, 2, 1]), 2), [4.0, 1.5, 1.5])
    np.testing.assert_array_equal(qmath.quantized_candidate(np.array([6, 0, 2, 0]), 2), [6.0, 0.0, 2.0, 0.0])


def test_entropy_amax_clips_where_kl_is_smallest():
    # levels=2 on counts [4, 2, 1, 1]: KL for cutting at bin edges 2, 3, 4 (by hand):
    kl2 = 0.5 * math.log(0.5 / (4 / 6)) + 0.5 * math.log(0.5 / (2 / 6))  # reference [4, 4], candidate [4, 2]
    kl3 = 0.5 * math.log(0.5 / (4 / 7)) + 2 * 0.25 * math.log(0.25 / (1.5 / 7))  # [4, 2, 2] vs [4, 1.5, 1.5]
    kl4 = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)  # [4, 2, 1, 1] vs [3, 3, 1, 1]
    assert kl3 < kl4 < kl2
    assert qmath.entropy_amax(np.array([4, 2, 1, 1]), 1.0, levels=2) == 3.0
    assert qmath.entropy_amax(np.array([4, 2, 1, 1]), 0.25, levels=2) == 0.75


def test_entropy_amax_keeps_an_outlier_it_can_represent():
    # [10, 10, 0, 1]: cutting at 4 reproduces the histogram exactly (KL 0)
    assert qmath.entropy_amax(np.array([10, 10, 0, 1]), 1.0, levels=2) == 4.0
    assert qmath.entropy_amax(np.array([3, 1, 0, 0]), 1.0, levels=8) == 2.0  # fewer bins than levels: no search
    assert qmath.entropy_amax(np.zeros(4, np.int64), 1.0) == 0.0


# ------------------------------------------------------------------------------------------------ accuracy math


def test_log_softmax_nll_kl_exact():
    logits = np.array([[0.0, math.log(3.0)], [1.0, 1.0]])
    lp = log_softmax(logits)
    np.testing.assert_allclose(lp, [[math.log(0.25), math.log(0.75)], [math.log(0.5), math.log(0.5)]], atol=1e-15)
    np.testing.assert_allclose(token_nll(lp, np.array([1, 0])), [-math.log(0.75), math.log(2.0)], atol=1e-15)
    kl = kl_rows(lp, log_softmax(np.array([[0.0, 0.0], [1.0, 1.0]])))
    np.testing.assert_allclose(kl, [0.25 * math.log(0.5) + 0.75 * math.log(1.5), 0.0], atol=1e-15)


def test_accumulator_figures():
    ref = np.array([[0.0, math.log(3.0)], [2.0, 0.0]])  # argmax 1, 0
    model = np.array([[0.0, 0.0], [0.0, 5.0]])  # argmax 0 (tie broken low), 1
    acc = Accumulator()
    acc.add(model, ref, np.array([1, 1]))
    r = acc.report()
    assert r.tokens == 2 and r.sequences == 1
    assert r.top1_agreement == 0.0
    assert r.accuracy == 0.5 and r.accuracy_reference == 0.5
    nll_ref = (-math.log(0.75) + math.log(math.exp(2) + 1)) / 2
    assert r.ppl_reference == pytest.approx(math.exp(nll_ref))
    nll = (math.log(2) + math.log(1 + math.exp(5)) - 5) / 2
    assert r.ppl == pytest.approx(math.exp(nll))
    assert r.max_abs_logit_diff == pytest.approx(5.0)
    assert r.nonfinite_logits == 0


def test_accumulator_counts_nonfinite_logits():
    acc = Accumulator()
    acc.add(np.array([[np.nan, 0.0], [np.inf, 1.0]]), np.zeros((2, 2)), np.array([0, 1]))
    r = acc.report()
    assert r.nonfinite_logits == 2
    assert check_bounds("fp16", r) and "non-finite" in check_bounds("fp16", r)[0]


def test_check_bounds():
    acc = Accumulator()
    acc.add(np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]]), np.array([1]))
    r = acc.report()
    assert check_bounds("int8", r) == [] and check_bounds("int4", r) == []
    r.top1_agreement, r.ppl_ratio = 0.96, 1.031
    assert len(check_bounds("int8", r)) == 2 and len(check_bounds("int4", r)) == 0


# ------------------------------------------------------------------------------------------------ fp16 colouring


def test_parity_union_find():
    uf = ParityUnionFind()
    assert uf.union("a", "b", 1) and uf.union("b", "c", 1)  # a != b != c, so a == c
    assert uf.value("a") is None
    assert uf.fix("c", 1)
    assert (uf.value("a"), uf.value("b"), uf.value("c")) == (1, 0, 1)
    assert not uf.union("a", "b", 0)  # contradiction: refused, nothing changes
    assert uf.value("b") == 0
    assert not uf.fix("b", 1)
    assert uf.union("d", "e", 0) and uf.fix("e", 0) and uf.union("d", "a", 1)
    assert uf.value("d") == 0


# ------------------------------------------------------------------------------------------------ keep-float


def _linears(layers=3):
    out = []
    for i in range(layers):
        for kind in ("qkv", "attn_out", "gate_up", "down"):
            out.append(Linear(f"layers.{i}.{kind}", f"/layers.{i}/{kind}/MatMul", f"x{i}{kind}", f"w{i}{kind}", (8, 8)))
    return out + [Linear("lm_head", "/lm_head/MatMul", "xh", "wh", (8, 16))]


def test_keep_float_aliases_and_patterns():
    lin = _linears()
    q, keep = select(lin, [], 3)
    assert len(q) == 13 and keep == []
    q, keep = select(lin, ["lm_head", "first"], 3)
    assert [k.name for k in keep] == ["layers.0.qkv", "layers.0.attn_out", "layers.0.gate_up", "layers.0.down",
                                      "lm_head"]
    _, keep = select(lin, ["last", "mlp_down"], 3)
    assert [k.name for k in keep] == ["layers.0.down", "layers.1.down", "layers.2.qkv", "layers.2.attn_out",
                                      "layers.2.gate_up", "layers.2.down"]
    _, keep = select(lin, ["layers.1.*"], 3)
    assert [k.layer for k in keep] == [1, 1, 1, 1]
    assert lin[-1].layer == -1


def test_keep_float_refuses_a_pattern_that_matches_nothing():
    with pytest.raises(QuantizationError, match="matches no linear layer"):
        select(_linears(), ["layers.9.*"], 3)
    with pytest.raises(QuantizationError, match="nothing would be quantized"):
        select(_linears(), ["*"], 3)


# ------------------------------------------------------------------------------------------------ option checks


def test_int4_settings_are_refused_before_any_work():
    """check_options (run by the CLI before --out is created) refuses INT4 settings MatMulNBits has no form for;
    other precisions ignore them."""
    from calibration.pipeline import QuantizeOptions, check_options

    with pytest.raises(QuantizationError, match="--block-size must be one of 16, 32, 64, 128, 256, got 48"):
        check_options(QuantizeOptions(precision="int4", block_size=48, evaluate=False))
    with pytest.raises(QuantizationError, match="--int4-accuracy-level must be 0..4, got 5"):
        check_options(QuantizeOptions(precision="int4", int4_accuracy_level=5, evaluate=False))
    check_options(QuantizeOptions(precision="int4", block_size=128, int4_accuracy_level=0, evaluate=False))
    check_options(QuantizeOptions(precision="int8", block_size=48, calib_data="calib.txt", evaluate=False))


# ------------------------------------------------------------------------------------------------ ranges checksums


def test_ranges_name_both_graph_files_and_refuse_another_graph(tmp_path):
    """The ranges file records the checksums of model.onnx and model.onnx.data; a difference in either is another
    graph; the data file's checksum comes from the manifest's record when there is one."""
    from calibration.ranges import CalibrationRanges, GraphChecksums, graph_checksums, read_ranges, write_ranges
    from runtime.manifest import sha256_of

    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    inline = graph_checksums(str(model))
    assert inline == GraphChecksums(model=sha256_of(str(model)), data="")
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    external = graph_checksums(str(model))
    assert external.model == inline.model and external.data == sha256_of(str(tmp_path / "model.onnx.data"))
    assert graph_checksums(str(model), {"model.onnx.data": {"sha256": "ab" * 32}}).data == "ab" * 32

    ranges = CalibrationRanges(method="minmax", tensors={}, model_sha256=external.model, data_sha256=external.data)
    back = read_ranges(write_ranges(str(tmp_path / "ranges.json"), ranges))
    assert (back.model_sha256, back.data_sha256) == (external.model, external.data)
    assert not back.for_another_graph(external)
    assert back.for_another_graph(GraphChecksums(external.model, "cd" * 32))  # same graph file, other weights
    assert back.for_another_graph(GraphChecksums("cd" * 32, external.data))
    assert back.for_another_graph(inline)  # the weights moved inline: not the graph calibrated
    older = CalibrationRanges(method="minmax", tensors={}, model_sha256=external.model)  # no data checksum recorded
    assert not older.for_another_graph(external) and older.for_another_graph(GraphChecksums("cd" * 32, external.data))
    assert not CalibrationRanges(method="minmax", tensors={}).for_another_graph(external)  # no checksums at all
