"""Element by element: how far one array is from its reference, as plain numpy.

An element passes when |onnx - reference| <= atol + rtol * |reference|. NaN or Inf pass only
where both sides hold the same value (NaN with NaN, +Inf with +Inf).
"""

import math
from dataclasses import dataclass

import numpy as np

from lossx.compare.report import HISTOGRAM_BINS


@dataclass(frozen=True)
class ElementErrors:
    """Per-element comparison of two same-shaped arrays (float64)."""

    error: np.ndarray  # |onnx - reference|; 0 where both hold the same NaN/Inf, inf if one does
    relative: np.ndarray  # error / |reference| (0 where error is 0)
    used: np.ndarray  # error / (atol + rtol * |reference|): above 1 fails
    failed: np.ndarray  # bool: outside tolerance, or non-finite on one side only


def element_errors(
    onnx_value: np.ndarray, reference: np.ndarray, atol: float, rtol: float
) -> ElementErrors:
    got = np.asarray(onnx_value, dtype=np.float64)
    want = np.asarray(reference, dtype=np.float64)
    same_special = (np.isnan(got) & np.isnan(want)) | (np.isinf(got) & (got == want))
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.where(same_special, 0.0, np.abs(got - want))
    error = np.where(np.isnan(error), np.inf, error)  # NaN on one side only
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.nan_to_num(np.where(error == 0, 0.0, error / np.abs(want)), nan=np.inf)
    one_sided_special = ~same_special & ~(np.isfinite(got) & np.isfinite(want))
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = atol + rtol * np.abs(want)
        outside = error > bound
        used = np.where(error == 0, 0.0, error / bound)
    used = np.where(one_sided_special, np.inf, np.nan_to_num(used, nan=np.inf))
    return ElementErrors(error, relative, used, outside | one_sided_special)


def error_histogram(errors: np.ndarray) -> dict[str, int]:
    """Absolute errors counted by decade (HISTOGRAM_BINS); non-finite errors count as >=1."""
    counts = dict.fromkeys(HISTOGRAM_BINS, 0)
    counts["0"] = int(np.count_nonzero(errors == 0))
    nonzero = errors[errors != 0]
    counts[">=1"] = int(np.count_nonzero(nonzero >= 1))
    small = nonzero[nonzero < 1]
    counts["<1e-12"] = int(np.count_nonzero(small < 1e-12))
    for k in range(12, 0, -1):
        counts[f"1e-{k}"] = int(np.count_nonzero((small >= 10.0**-k) & (small < 10.0 ** (1 - k))))
    return counts


class Percentiles:
    """Non-negative values (element errors) counted by 1/64 of a decade between 1e-40 and
    1e40, exact zeros and values past either end in bins of their own: a percentile over every
    element of many input sets (a training graph's gradients hold every parameter) is read
    from 5,122 counts instead of every value, to within 1.8% (half a bin; below 1e-40 read
    as 1e-40, from 1e40 up as Inf)."""

    PER_DECADE, LOW, HIGH = 64, -40, 40

    def __init__(self) -> None:
        self.zeros = 0
        # [0]: below 1e-40; [1..n]: the bins; [n+1]: 1e40 and beyond, Inf included
        self.counts = np.zeros((self.HIGH - self.LOW) * self.PER_DECADE + 2, np.int64)

    def add(self, values: np.ndarray) -> None:
        positive = values[values > 0]
        self.zeros += values.size - positive.size
        with np.errstate(over="ignore"):
            bins = np.floor((np.log10(positive) - self.LOW) * self.PER_DECADE)
        bins = np.clip(np.nan_to_num(bins, posinf=np.inf), -1, len(self.counts) - 2) + 1
        self.counts += np.bincount(bins.astype(np.int64), minlength=len(self.counts))

    def percentile(self, q: float) -> float:
        """The smallest value with at least `q`% of the values at or below it (numpy's
        "inverted_cdf" percentile), 0 where there are none."""
        total = self.zeros + int(self.counts.sum())
        rank = max(1, math.ceil(q / 100 * total))  # that value's place, counted from 1
        if total == 0 or rank <= self.zeros:
            return 0.0
        at = int(np.searchsorted(self.zeros + np.cumsum(self.counts), rank, side="left"))
        if at == len(self.counts) - 1:
            return float("inf")
        return 10.0 ** (self.LOW + (max(at, 1) - 0.5) / self.PER_DECADE)
