"""Compare ONNX Runtime outputs with eager PyTorch outputs, as plain data.

An element passes when |onnx - eager| <= atol + rtol * |eager|. NaN or Inf pass only where both
sides hold the same value (NaN with NaN, +Inf with +Inf).
"""

from dataclasses import asdict, dataclass

import numpy as np

# Measured on this project's graphs with the shipped weights (README, "Parity tolerances"): on
# fp32 CPU the worst element of any output used at most 48% of this tolerance (logits).
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-5


@dataclass(frozen=True)
class OutputComparison:
    """How one output of one graph compares, over every batch seen."""

    graph: str
    output: str
    elements: int
    mismatches: int  # elements outside atol + rtol * |eager|
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    max_tolerance_used: float  # max of error / (atol + rtol * |eager|): above 1 fails
    argmax_rows: int = 0  # logits only: rows compared by argmax
    argmax_agreements: int = 0

    @property
    def passed(self) -> bool:
        return self.mismatches == 0

    @property
    def argmax_agreement(self) -> float | None:
        return self.argmax_agreements / self.argmax_rows if self.argmax_rows else None

    def merged(self, other: "OutputComparison") -> "OutputComparison":
        """This comparison and `other` (a later batch of the same output) taken together."""
        return OutputComparison(
            self.graph,
            self.output,
            self.elements + other.elements,
            self.mismatches + other.mismatches,
            max(self.max_abs_error, other.max_abs_error),
            max(self.max_rel_error, other.max_rel_error),
            self.atol,
            self.rtol,
            max(self.max_tolerance_used, other.max_tolerance_used),
            self.argmax_rows + other.argmax_rows,
            self.argmax_agreements + other.argmax_agreements,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "argmax_agreement": self.argmax_agreement}


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


def compare(
    graph: str,
    output: str,
    onnx_value: np.ndarray,
    eager_value: np.ndarray,
    atol: float,
    rtol: float,
) -> OutputComparison:
    """Compare one output; logits (rank 2) are also compared by argmax per row."""
    got = np.asarray(onnx_value, dtype=np.float64)
    want = np.asarray(eager_value, dtype=np.float64)
    if got.shape != want.shape:
        return OutputComparison(
            graph, output, want.size, max(want.size, 1), np.inf, np.inf, atol, rtol, np.inf
        )
    errors = element_errors(got, want, atol, rtol)
    rows = agreements = 0
    if got.ndim == 2:
        rows = got.shape[0]
        agreements = int(np.count_nonzero(got.argmax(axis=1) == want.argmax(axis=1)))
    return OutputComparison(
        graph,
        output,
        int(want.size),
        int(np.count_nonzero(errors.failed)),
        float(errors.error.max(initial=0.0)),
        float(errors.relative.max(initial=0.0)),
        atol,
        rtol,
        float(errors.used.max(initial=0.0)),
        rows,
        agreements,
    )


@dataclass(frozen=True)
class ParityReport:
    """Every output of every graph compared; passed when all are within tolerance."""

    comparisons: tuple[OutputComparison, ...]
    images: int

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[OutputComparison]:
        return [c for c in self.comparisons if not c.passed]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "images": self.images,
            "comparisons": [c.to_dict() for c in self.comparisons],
        }


def merge_into(
    table: dict[tuple[str, str], OutputComparison], comparison: OutputComparison
) -> None:
    """Accumulate a batch's comparison into `table`, keyed by (graph, output)."""
    key = (comparison.graph, comparison.output)
    table[key] = table[key].merged(comparison) if key in table else comparison
