import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossx.compare.engine import OutputAccumulator, compare_arrays
from lossx.compare.inputs import InputSet
from lossx.compare.tolerances import Tolerance
from lossx.runtime.graphs import ToleranceRule


def compare(onnx, eager, atol, rtol, rule=ToleranceRule.ELEMENTWISE):
    return compare_arrays(onnx, eager, Tolerance(atol, rtol), rule)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@given(
    values=hnp.arrays(np.float32, st.integers(1, 40), elements=finite),
    noise=hnp.arrays(np.float32, 40, elements=st.floats(-(2**-10), 2**-10, width=32)),
    atol=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]),
    rtol=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]),
)
def test_an_element_passes_exactly_when_within_atol_plus_rtol(values, noise, atol, rtol):
    eager = values
    onnx = (values + noise[: len(values)]).astype(np.float32)
    result = compare(onnx, eager, atol, rtol)
    error = np.abs(onnx.astype(np.float64) - eager.astype(np.float64))
    assert result.mismatches == int(np.sum(error > atol + rtol * np.abs(eager.astype(np.float64))))
    assert result.max_abs_error == error.max()
    assert result.passed == (result.mismatches == 0)


def test_identical_values_pass_with_zero_tolerance():
    x = np.array([[1.0, -2.0, 0.0]], np.float32)
    result = compare(x, x.copy(), 0.0, 0.0, ToleranceRule.TASK)
    assert result.passed and result.max_abs_error == 0 and result.argmax_agreement == 1.0


@pytest.mark.parametrize(
    ("onnx", "eager", "passed"),
    [
        ([np.nan, 1.0], [np.nan, 1.0], True),
        ([np.inf, 1.0], [np.inf, 1.0], True),
        ([np.nan, 1.0], [0.0, 1.0], False),
        ([0.0, 1.0], [np.nan, 1.0], False),
        ([np.inf, 1.0], [-np.inf, 1.0], False),
        ([np.inf, 1.0], [1e30, 1.0], False),
    ],
)
def test_nan_and_inf_pass_only_where_both_sides_agree(onnx, eager, passed):
    result = compare(np.array(onnx), np.array(eager), 1e-5, 1e-5)
    assert result.passed is passed
    if not passed:
        assert result.max_abs_error == np.inf


def test_shape_mismatch_fails():
    result = compare(np.zeros(3), np.zeros(4), 1.0, 1.0)
    assert not result.passed


def test_argmax_agreement_counts_rows():
    eager = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.1]])
    onnx = np.array([[0.0, 1.0], [0.0, 1.0], [0.2, 0.1]])
    result = compare(onnx, eager, 1e-5, 1e-5, ToleranceRule.TASK)
    assert result.argmax_agreement == pytest.approx(2 / 3)


def test_batches_of_one_output_add_counts_and_keep_maxima():
    accumulator = OutputAccumulator("g", "y", Tolerance(0.1, 0.0), ToleranceRule.ELEMENTWISE)
    accumulator.add(InputSet("first"), np.array([1.0, 2.0]), np.array([1.0, 2.5]))
    accumulator.add(InputSet("second"), np.array([3.0]), np.array([3.2]))
    merged = accumulator.report()
    assert (merged.elements, merged.mismatches) == (3, 2)
    assert merged.max_abs_error == pytest.approx(0.5)
    assert merged.worst.inputs == "first"


def test_tolerance_used_is_the_worst_error_over_its_bound():
    result = compare(np.array([1.5, 10.2]), np.array([1.0, 10.0]), 0.5, 0.1)
    assert result.max_tolerance_used == pytest.approx(max(0.5 / 0.6, 0.2 / 1.5))
    assert result.passed
