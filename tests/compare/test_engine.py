"""The parity engine: element rules, accumulation over batches, and the run-and-compare loop."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossx.compare.engine import OutputAccumulator, compare_arrays, compare_runners
from lossx.compare.inputs import InputSet, random_input_sets, real_input_sets
from lossx.compare.tolerances import Tolerance, resolve_tolerances
from lossx.errors import ParityError, SpecError
from lossx.runtime import load_packaged_sample
from lossx.runtime.graphs import ToleranceRule, loss_graph, model_graph
from lossx.runtime.loss_specs import parse_loss_spec


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


# --- compare_runners: the one loop, with runners that compute in numpy ----------------------


class NumpyRunner:
    """The model as a fixed linear map of the images, and mse as numpy computes it."""

    def __init__(self, name="numpy", shift=0.0, broken=False):
        self.name, self.shift, self.broken = name, shift, broken
        self.weights = np.random.default_rng(0).standard_normal((3 * 32 * 32, 10)) * 1e-2
        self.calls = []

    def run(self, graph, feed):
        self.calls.append(graph.stem)
        if self.broken:
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad dims\nmore")
        if graph.stem == "model":
            images = feed["images"].reshape(len(feed["images"]), -1)
            logits = (images @ self.weights).astype(np.float32) + np.float32(self.shift)
            return {"logits": logits}
        diff = feed["input"] - feed["target"]
        return {"loss": np.float32((diff * diff).mean())}


GRAPHS = [model_graph(), loss_graph(parse_loss_spec("mse"))]


def test_two_runners_that_agree_pass_on_real_and_random_inputs():
    data = load_packaged_sample().head(20)
    inputs = [*real_input_sets(data, 8, odd_batches=True), *random_input_sets(0)]
    subject, reference = NumpyRunner("a"), NumpyRunner("b")
    report = compare_runners(subject, reference, GRAPHS, inputs, resolve_tolerances())
    assert report.passed and report.exit_code == 0
    assert (report.artifact, report.reference) == ("a", "b")
    assert report.inputs[:3] == ["images 0-7", "images 8-15", "images 16-19"]
    logits = next(o for o in report.outputs if o.name == "model/logits")
    assert logits.argmax_agreement == 1.0 and logits.accuracy_onnx == logits.accuracy_reference
    # the reference ran the model once per real batch: for the loss graph's logits and itself
    assert reference.calls.count("model") == subject.calls.count("model")


def test_a_difference_fails_names_the_worst_output_and_saves_the_case(tmp_path):
    data = load_packaged_sample().head(16)
    report = compare_runners(
        NumpyRunner(shift=1e-3),
        NumpyRunner(),
        GRAPHS,
        real_input_sets(data, 16),
        resolve_tolerances(),
        repro=tmp_path / "case.npz",
    )
    assert report.exit_code == 1
    assert [o.name for o in report.failures] == ["model/logits"]
    line = report.failure_line()
    assert line.startswith("parity failed for 1 of 2 outputs, worst model/logits")
    assert "on images 0-15" in line and str(tmp_path / "case.npz") in line
    with np.load(tmp_path / "case.npz") as case:
        assert {"input.images", "onnx.logits", "reference.logits", "about"} <= set(case.files)
    with pytest.raises(ParityError, match=r"^context: parity failed"):
        report.raise_if_failed("context: ")


def test_nothing_is_saved_when_every_output_passes(tmp_path):
    compare_runners(
        NumpyRunner(),
        NumpyRunner(),
        GRAPHS,
        random_input_sets(0),
        resolve_tolerances(),
        repro=tmp_path / "case.npz",
    )
    assert not (tmp_path / "case.npz").exists()


def test_a_runner_that_fails_is_a_one_line_parity_error():
    with pytest.raises(ParityError) as raised:
        compare_runners(
            NumpyRunner("broken", broken=True),
            NumpyRunner(),
            GRAPHS,
            random_input_sets(0),
            resolve_tolerances(),
        )
    message = str(raised.value)
    assert message.startswith("broken failed to run model.onnx on random N=1 seed 0: ")
    assert "\n" not in message


def test_a_comparison_of_no_inputs_is_refused_not_passed():
    with pytest.raises(SpecError, match="no inputs or no graphs to compare"):
        compare_runners(NumpyRunner(), NumpyRunner(), GRAPHS, [], resolve_tolerances())
    with pytest.raises(SpecError, match="no inputs or no graphs to compare"):
        compare_runners(
            NumpyRunner(), NumpyRunner(), [], random_input_sets(0), resolve_tolerances()
        )
