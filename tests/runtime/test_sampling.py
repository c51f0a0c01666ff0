"""runtime.sampling: exact masks and values on hand-made logits, seeded reproducibility, empirical frequencies."""
import math

import numpy as np
import pytest

from runtime.errors import GenerationError, SamplingConfigError
from runtime.sampling import (
    GenerationConfig,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    greedy,
    next_tokens,
    process_logits,
    sample,
    softmax,
)


def kept(logits):
    return np.isfinite(logits)


# ----------------------------------------------------------------------------------------------- processors, exact


def test_temperature_divides():
    x = np.array([2.0, -1.0, 0.5], dtype=np.float32)
    np.testing.assert_array_equal(apply_temperature(x, 0.5), np.array([4.0, -2.0, 1.0], dtype=np.float32))
    assert apply_temperature(x, 1.0) is x


def test_top_k_mask_exact():
    x = np.array([[0.1, 3.0, -2.0, 2.5, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    out = apply_top_k(x, 2)
    np.testing.assert_array_equal(kept(out), [[False, True, False, True, False], [True, True, False, False, False]])
    np.testing.assert_array_equal(out[kept(out)], x[kept(out)])  # kept values unchanged
    assert np.all(out[~kept(out)] == -np.inf)
    assert kept(apply_top_k(x, 0)).all() and kept(apply_top_k(x, 5)).all()


def test_top_k_keeps_ties_with_kth():
    x = np.array([1.0, 2.0, 2.0, 0.0])
    np.testing.assert_array_equal(kept(apply_top_k(x, 2)), [False, True, True, False])
    np.testing.assert_array_equal(kept(apply_top_k(x, 1)), [False, True, True, False])


def test_top_p_smallest_set_reaching_mass():
    probs = np.array([0.1, 0.5, 0.15, 0.25])  # sorted: 0.5, 0.25, 0.15, 0.1
    x = np.log(probs)
    # p=0.5: {0.5} already reaches it
    np.testing.assert_array_equal(kept(apply_top_p(x, 0.5)), [False, True, False, False])
    # p=0.6: 0.5 < 0.6 -> add 0.25 (0.75 >= 0.6)
    np.testing.assert_array_equal(kept(apply_top_p(x, 0.6)), [False, True, False, True])
    # p=0.75 exactly reached by two tokens (up to float rounding of the log/exp round trip) -> 2 or 3 kept,
    # so use 0.74 / 0.76 to be unambiguous
    np.testing.assert_array_equal(kept(apply_top_p(x, 0.74)), [False, True, False, True])
    np.testing.assert_array_equal(kept(apply_top_p(x, 0.76)), [False, True, True, True])
    np.testing.assert_array_equal(kept(apply_top_p(x, 0.95)), [True, True, True, True])
    np.testing.assert_array_equal(kept(apply_top_p(x, 1.0)), [True, True, True, True])


def test_top_p_always_keeps_one_and_works_per_row():
    x = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]])
    out = apply_top_p(x, 1e-6)
    np.testing.assert_array_equal(kept(out), [[True, False, False], [False, False, True]])


def test_top_p_after_top_k_renormalises_over_kept():
    # After top-k=2 the kept probabilities are softmax([2, 1]) = (0.731, 0.269): top-p 0.7 keeps only the first.
    x = np.array([2.0, 1.0, 0.5, 0.4])
    cfg = GenerationConfig(do_sample=True, top_k=2, top_p=0.7)
    np.testing.assert_array_equal(kept(process_logits(x, cfg)), [True, False, False, False])
    cfg = GenerationConfig(do_sample=True, top_k=2, top_p=0.75)
    np.testing.assert_array_equal(kept(process_logits(x, cfg)), [True, True, False, False])


def test_repetition_penalty_exact_values():
    x = np.array([2.0, -2.0, 1.0, -0.5, 0.0], dtype=np.float32)
    out = apply_repetition_penalty(x, [0, 1, 1, 4], 2.0)
    np.testing.assert_array_equal(out, np.array([1.0, -4.0, 1.0, -0.5, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(x, [2.0, -2.0, 1.0, -0.5, 0.0])  # input untouched
    batch = np.array([[3.0, -3.0], [3.0, -3.0]])
    out = apply_repetition_penalty(batch, [[0], [1]], 1.5)
    np.testing.assert_allclose(out, [[2.0, -3.0], [3.0, -4.5]])
    # penalty < 1 rewards repetition, with the same rule
    np.testing.assert_allclose(apply_repetition_penalty(np.array([2.0, -2.0]), [0, 1], 0.5), [4.0, -1.0])


def test_repetition_penalty_applies_in_greedy_mode():
    x = np.array([[2.0, 1.9]])
    assert greedy(process_logits(x, GenerationConfig()))[0] == 0
    assert next_tokens(x, GenerationConfig(repetition_penalty=1.2), seen_ids=[[0]])[0] == 1


def test_greedy_ignores_sampling_fields():
    x = np.array([[0.0, 5.0, 1.0]])
    cfg = GenerationConfig(top_k=1, top_p=0.1, temperature=0.3)  # do_sample False
    np.testing.assert_array_equal(process_logits(x, cfg), x.astype(np.float32))
    assert next_tokens(x, cfg)[0] == 1


# ----------------------------------------------------------------------------------------------- sampling


def test_softmax_of_masked_is_zero():
    p = softmax(np.array([0.0, -np.inf, 0.0]))
    np.testing.assert_array_equal(p, [0.5, 0.0, 0.5])


def test_same_seed_same_tokens_and_different_seed_differs():
    rng = np.random.default_rng(123)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    cfg = GenerationConfig(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=7)

    def draw(config):
        r = config.make_rng()
        return np.stack([next_tokens(logits, config, r) for _ in range(40)])

    a, b = draw(cfg), draw(cfg)
    np.testing.assert_array_equal(a, b)
    c = draw(GenerationConfig(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=8))
    assert not np.array_equal(a, c)


def test_sample_never_picks_masked_tokens():
    logits = np.array([[-np.inf, 0.0, -np.inf, 0.0, -np.inf]])
    rng = np.random.default_rng(0)
    picks = {int(sample(logits, rng)[0]) for _ in range(500)}
    assert picks == {1, 3}


def test_sample_1d_returns_scalar():
    assert np.ndim(sample(np.array([0.0, 1.0]), np.random.default_rng(0))) == 0


def test_empirical_frequencies_match_processed_softmax():
    """Pearson chi-square goodness of fit over seeded draws; processed = temperature, top-k, top-p.

    With k categories kept, the statistic is ~ chi2(k-1) under the null. The bound is the chi2(k-1) 0.999
    quantile (Wilson-Hilferty approximation: 20.75 for df=5 against the exact 20.52), so a correct sampler fails
    this test with probability ~1e-3 for a random seed; the seed is fixed, so the outcome is deterministic (the
    statistic is 4.4 here). A sampler that ignored the temperature scores ~880, far over the bound (checked below,
    so the test has power). Tokens outside the kept set must never appear.
    """
    logits = np.array([2.0, 1.5, 1.0, 0.7, 0.5, 0.0, -0.3, -1.0, -2.0, -3.0])
    cfg = GenerationConfig(do_sample=True, temperature=0.8, top_k=8, top_p=0.95, seed=2024)
    processed = process_logits(logits, cfg)
    expected_p = softmax(processed)
    keep = expected_p > 0
    k = int(keep.sum())
    assert 2 <= k < 10  # the filters really removed something and left a distribution to test

    n = 40000
    rng = cfg.make_rng()
    batch = np.tile(logits, (n, 1))  # one vectorised draw per row
    draws = next_tokens(batch, cfg, rng)
    counts = np.bincount(draws, minlength=logits.size)
    assert counts[~keep].sum() == 0

    def chi2(p):
        e = n * p[keep]
        return float((((counts[keep] - e) ** 2) / e).sum())

    df = k - 1
    z999 = 3.090232306167813
    bound = df * (1 - 2 / (9 * df) + z999 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2(expected_p) < bound
    # the same statistic against the unprocessed distribution is far out, so the test has power
    raw = softmax(logits)
    raw_kept = raw * keep / (raw * keep).sum()
    assert chi2(raw_kept) > 10 * bound


# ----------------------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"seed": -3}, "seed"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": (1,)}, "stop"),
        ({"eos_token_ids": (-1,)}, "eos_token_ids"),
        ({"max_length": 1}, "max_length"),
        ({"do_sample": "yes"}, "do_sample"),
    ],
)
def test_invalid_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(SamplingConfigError, match=field) as info:
        GenerationConfig(**kwargs)
    assert isinstance(info.value, GenerationError)  # callers can catch generation problems as one family


def test_config_normalises_lists():
    cfg = GenerationConfig(stop=["a", "b"], eos_token_ids=[1, 2])
    assert cfg.stop == ("a", "b") and cfg.eos_token_ids == (1, 2)
    assert GenerationConfig(stop="x").stop == ("x",)
    assert GenerationConfig(eos_token_ids=()).eos_token_ids == ()
    assert GenerationConfig().greedy and not GenerationConfig(do_sample=True).greedy
