"""Element by element: how far one array is from its reference, as plain numpy.

An element passes when |onnx - reference| <= atol + rtol * |reference|. NaN or Inf pass only
where both sides hold the same value (NaN with NaN, +Inf with +Inf).
"""

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
