"""Quantization arithmetic as small pure numpy functions (each has exact-value tests in tests/test_quant_math.py).

Where it stands: ``calibration.ranges`` turns activation statistics into ranges with the histogram and threshold
functions here; onnxruntime's quantizer turns ranges into scales as ``symmetric_scale`` does, and the tests check
what it wrote with ``quantize_symmetric`` / ``per_channel_scales``.

Convention: symmetric INT8 uses [-127, 127] with zero point 0 (what TensorRT's explicit quantization and
onnxruntime's symmetric mode use).
"""
from __future__ import annotations

import numpy as np

INT8_QMAX = 127


# ------------------------------------------------------------------------------------------------ scales


def symmetric_scale(amax: float, qmax: int = INT8_QMAX) -> float:
    """Scale mapping [-amax, amax] onto [-qmax, qmax]; 1.0 for an all-zero tensor (any scale represents 0)."""
    amax = float(amax)
    if not np.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and >= 0, got {amax}")
    return amax / qmax if amax > 0 else 1.0


def quantize_symmetric(x: np.ndarray, scale, qmax: int = INT8_QMAX) -> np.ndarray:
    """round(x / scale) clipped to [-qmax, qmax], as int8 (round half to even, like ONNX QuantizeLinear).
    ``scale`` is a scalar or broadcasts against x (per-channel)."""
    return np.clip(np.rint(np.asarray(x, np.float32) / np.asarray(scale, np.float32)), -qmax, qmax).astype(np.int8)


def dequantize(q: np.ndarray, scale, zero_point=0) -> np.ndarray:
    """(q - zero_point) * scale as float32."""
    return ((np.asarray(q, np.int32) - np.asarray(zero_point, np.int32)) * np.asarray(scale, np.float32)).astype(
        np.float32
    )


def per_channel_scales(w: np.ndarray, axis: int, qmax: int = INT8_QMAX) -> np.ndarray:
    """Symmetric scale per slice along ``axis``: max |w| over the other axes / qmax (1.0 for all-zero slices).

    For our (K, N) MatMul weights the channel axis is 1: one scale per output column.
    """
    w = np.asarray(w, np.float32)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    amax = np.abs(w).max(axis=other)
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ histograms


class AbsHistogram:
    """Histogram of |x| over [0, bins * width), fed batch by batch with arrays of any shape.

    Why our own (not onnxruntime's HistogramCollector): that collector stacks each batch's outputs into one array,
    which fails when calibration batches differ in shape (prefill chunks vs single-token decode steps, different
    sequence lengths). Here each batch is flattened and merged on its own. When a batch exceeds the range, the bin
    width doubles (adjacent bins merged, exactly) until it fits, so no count is ever interpolated.
    """

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.counts = np.zeros(bins, dtype=np.int64)
        self.width = 0.0  # 0 until the first non-zero value arrives
        self.amax = 0.0  # exact max |x| seen
        self.total = 0

    @property
    def bins(self) -> int:
        return len(self.counts)

    def add(self, values: np.ndarray) -> None:
        a = np.abs(np.asarray(values, dtype=np.float32).ravel())
        if a.size == 0:
            return
        if not np.all(np.isfinite(a)):
            raise ValueError("non-finite activation value during calibration")
        batch_max = float(a.max())
        if batch_max > 0 and self.width == 0.0:
            self.width = batch_max / self.bins  # the first batch fills the range
        while batch_max > self.width * self.bins and self.width > 0:
            self.counts = merge_pairs(self.counts)
            self.width *= 2
        if self.width > 0:
            idx = np.minimum((a / self.width).astype(np.int64), self.bins - 1)  # the range's top edge: last bin
            self.counts += np.bincount(idx, minlength=self.bins)
        else:  # all zeros so far
            self.counts[0] += a.size
        self.amax = max(self.amax, batch_max)
        self.total += a.size


def merge_pairs(counts: np.ndarray) -> np.ndarray:
    """Counts of a histogram with twice the bin width and the same number of bins: [a, b, c, d] -> [a+b, c+d, 0, 0]."""
    half = counts.reshape(-1, 2).sum(axis=1)
    return np.concatenate([half, np.zeros(len(counts) - len(half), dtype=counts.dtype)])


# ------------------------------------------------------------------------------------------------ thresholds


def percentile_amax(counts: np.ndarray, width: float, percentile: float) -> float:
    """The upper edge of the first bin at which the cumulative share of |x| reaches ``percentile`` percent."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    total = counts.sum()
    if total == 0 or width == 0:
        return 0.0
    cdf = np.cumsum(counts) / total
    i = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12))
    return float(min(i + 1, len(counts)) * width)


def smooth_distribution(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """p with every empty bin given mass ``eps``, renormalised to sum 1 (so a KL divergence against it is finite)."""
    out = np.where(np.asarray(p, np.float64) > 0, p, eps)
    return out / out.sum()


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) in nats over the bins where p > 0; p and q are normalised here."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def quantized_candidate(counts: np.ndarray, levels: int) -> np.ndarray:
    """The histogram ``counts`` as ``levels`` quantization bins would see it: the bins are split into ``levels``
    consecutive groups (the last takes the remainder) and each group's mass is spread evenly over its non-empty
    bins; empty bins stay empty."""
    n = len(counts)
    per = n // levels
    starts = np.arange(levels) * per
    group_mass = np.add.reduceat(counts.astype(np.float64), starts)
    group_nonzero = np.add.reduceat((counts > 0).astype(np.float64), starts)
    group_of_bin = np.minimum(np.arange(n) // per, levels - 1)
    share = np.divide(group_mass, group_nonzero, out=np.zeros(levels), where=group_nonzero > 0)
    return np.where(counts > 0, share[group_of_bin], 0.0)


def entropy_amax(counts: np.ndarray, width: float, levels: int = INT8_QMAX + 1, stride: int = 1) -> float:
    """TensorRT's entropy calibration on a histogram of |x|: the clipping threshold whose INT8 view of the
    distribution (``levels`` bins) loses the least information, measured as KL(reference || quantized).

    For each candidate i (a bin edge, from ``levels`` bins up to all of them), the reference is counts[:i] with every
    count beyond i folded into bin i-1 (clipped values), and the candidate is counts[:i] squeezed into ``levels``
    bins and expanded back. Returns the edge i * width with the smallest divergence.
    """
    counts = np.asarray(counts, np.int64)
    n = len(counts)
    if counts.sum() == 0 or width == 0:
        return 0.0
    last = int(np.nonzero(counts)[0][-1]) + 1  # no candidate beyond the last non-empty bin is needed
    if last <= levels:
        return float(last * width)
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = counts[i:].sum()
    best_kl, best_i = np.inf, last
    for i in range(levels, last + 1, stride):
        reference = counts[:i].astype(np.float64)
        if i < n:
            reference[i - 1] += tail[i]
        candidate = quantized_candidate(counts[:i], levels)
        p = smooth_distribution(reference / reference.sum())
        q = smooth_distribution(candidate / candidate.sum()) if candidate.sum() > 0 else np.full(i, 1.0 / i)
        kl = kl_divergence(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(best_i * width)
