"""The comparator: element rules, accumulation over batches, and the run-and-compare loop."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lossx.compare.comparator import OutputAccumulator, compare_arrays, compare_runners
from lossx.compare.inputs import InputSet, random_input_sets, real_input_sets, reference_logits
from lossx.compare.runners import RunOnce
from lossx.compare.tolerances import (
    GRADIENT_TOLERANCE,
    PROFILES,
    Tolerance,
    agreement_upper_bound,
    drop_lower_bound,
    resolve_tolerances,
)
from lossx.errors import ModelError, ParityError, SpecError
from lossx.runtime import load_packaged_sample
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.graphs import ToleranceRule, loss_graph, model_graph
from lossx.runtime.loss_specs import parse_loss_spec

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)


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


GRAPHS = [MODEL, loss_graph(parse_loss_spec("mse"))]


def test_two_runners_that_agree_pass_on_real_and_random_inputs():
    data = load_packaged_sample().head(20)
    inputs = [*real_input_sets(data, 8, CONTRACT, odd_batches=True), *random_input_sets(0)]
    subject, reference = NumpyRunner("a"), RunOnce(NumpyRunner("b"))
    report = compare_runners(
        subject, reference, GRAPHS, inputs, resolve_tolerances(),
        loss_inputs=reference_logits(reference, MODEL),
    )  # fmt: skip
    assert report.passed and report.exit_code == 0
    assert (report.artifact, report.reference) == ("a", "b")
    assert report.inputs[:3] == ["images 0-7", "images 8-15", "images 16-19"]
    logits = next(o for o in report.outputs if o.name == "model/logits")
    assert logits.argmax_agreement == 1.0 and logits.accuracy_onnx == logits.accuracy_reference
    # the reference ran the model once per real batch: for the loss graph's logits and itself
    assert reference.calls.count("model") == subject.calls.count("model")


def test_a_difference_fails_names_the_worst_output_and_saves_the_case(tmp_path):
    data = load_packaged_sample().head(16)
    reference = NumpyRunner()
    report = compare_runners(
        NumpyRunner(shift=1e-3),
        reference,
        GRAPHS,
        real_input_sets(data, 16, CONTRACT),
        resolve_tolerances(),
        loss_inputs=reference_logits(reference, MODEL),
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


def test_loss_graphs_on_real_batches_score_what_the_caller_gives():
    """The comparator knows no model: what a standalone loss scores on a real batch is the
    caller's (loss_inputs), and without it a comparison of loss graphs on real batches is
    refused rather than fed something made up."""
    data = load_packaged_sample().head(8)
    with pytest.raises(SpecError, match=r"loss_mse\.onnx on real batches needs loss_inputs"):
        compare_runners(
            NumpyRunner(),
            NumpyRunner(),
            GRAPHS,
            real_input_sets(data, 8, CONTRACT),
            resolve_tolerances(),
        )
    given = np.full((8, 10), 0.1, np.float32)
    seen = []

    class Recording(NumpyRunner):
        def run(self, graph, feed):
            if graph.stem == "loss_mse":
                seen.append(feed["input"])
            return super().run(graph, feed)

    compare_runners(Recording(), NumpyRunner(), GRAPHS, real_input_sets(data, 8, CONTRACT),
                    resolve_tolerances(), loss_inputs=lambda inputs: given)  # fmt: skip
    assert len(seen) == 1 and np.allclose(seen[0], np.full((8, 10), 0.1))


def test_run_once_reruns_only_for_other_arrays():
    runner = RunOnce(NumpyRunner())
    images = np.zeros((2, 3, 32, 32), np.float32)
    first = runner.run(MODEL, {"images": images})
    assert runner.run(MODEL, {"images": images}) is first
    assert runner.run(MODEL, {"images": images.copy()}) is not first
    assert runner.calls == ["model", "model"] and runner.name == "numpy"
    assert not hasattr(runner, "run_float64")


# --- a reference that computes NaN where numbers belong -----------------------------------


def test_a_reference_computing_nan_logits_is_a_broken_model_not_a_parity_failure():
    class NaNRunner(NumpyRunner):
        def run(self, graph, feed):
            outputs = super().run(graph, feed)
            if graph.stem == "model":
                outputs["logits"][0, 0] = np.nan
            return outputs

    report = compare_runners(NaNRunner(), NaNRunner(), GRAPHS, random_input_sets(0),
                             resolve_tolerances())  # fmt: skip
    logits = next(o for o in report.outputs if o.name == "model/logits")
    assert logits.invalid_reference == 3 and logits.invalid_reference_inputs == "random N=1 seed 0"
    assert logits.nonfinite.disagreeing == 0  # both sides agree: it is the model that is broken
    assert not report.passed and report.exit_code == 2
    assert "model/logits: the reference (numpy) computes NaN or Inf" in report.failure_line()
    with pytest.raises(ModelError, match="the model itself is broken"):
        report.raise_if_failed()


# --- gradients that miss the fp32 rule are judged by float64 -------------------------------


def _gradient_accumulator():
    return OutputAccumulator("train", "grad.w", GRADIENT_TOLERANCE, ToleranceRule.GRADIENT)


@pytest.mark.parametrize(
    ("subject_error", "cleared"),
    [
        (1e-7, True),  # the subject is right and the fp32 reference is not: cleared
        (-5e-3, True),  # as far from float64 as the reference, on the other side: cleared
        (-9e-3, True),  # within FP32_SPREAD (2) times the reference's distance: cleared
        (-1.1e-2, False),  # beyond it: stays a mismatch
    ],
)
def test_float64_decides_which_engine_erred_where_fp32_cannot(subject_error, cleared):
    exact = np.linspace(-0.5, 0.5, 100)  # 0.1% of 100 elements: no mismatch allowed
    reference = exact.copy()
    reference[7] += 5e-3  # the fp32 reference's own error (a cancelling batch norm backward)
    subject = exact.copy()
    subject[7] += subject_error
    accumulator = _gradient_accumulator()
    failed = accumulator.add(InputSet("batch"), subject, reference)
    assert failed == 1
    pending = accumulator.judge_by_float64(InputSet("batch"), subject, [reference], exact, failed)
    if pending is not None:  # no routing to judge by: settled as it stands
        accumulator.settle(failed, pending[1])
    report = accumulator.report()
    assert report.mismatches == 1  # the fp32 comparison is reported as it was
    assert report.float64.inputs == ["batch"]
    assert report.float64.reference_max_abs_error == pytest.approx(5e-3)
    assert report.float64.onnx_max_abs_error == pytest.approx(abs(subject_error))
    assert report.float64.cleared == (1 if cleared else 0)
    within_rule = abs(subject_error) < 1e-3  # then the spread is not needed
    spread = None if within_rule else pytest.approx(abs(subject_error) / 1e-2)
    assert report.float64.max_spread_used == spread
    assert report.passed is cleared


@pytest.mark.parametrize(("subject_error", "cleared"), [(1.9e-2, True), (2.1e-2, False)])
def test_the_further_of_the_references_fp32_runs_is_the_yardstick(subject_error, cleared):
    """Torch's oneDNN and native kernels are both correct fp32; a subject no further from
    float64 than twice the further of them is as right as fp32 can tell."""
    exact = np.linspace(-0.5, 0.5, 100)
    onednn, native, subject = exact.copy(), exact.copy(), exact.copy()
    onednn[7] += 5e-3
    native[7] -= 1e-2
    subject[7] += subject_error
    accumulator = _gradient_accumulator()
    failed = accumulator.add(InputSet("batch"), subject, onednn)
    pending = accumulator.judge_by_float64(InputSet("batch"), subject, [onednn, native], exact,
                                           failed)  # fmt: skip
    assert pending == (pytest.approx(1e-2), pytest.approx(subject_error / 2e-2))  # beyond it
    accumulator.settle(failed, pending[1])  # no routing to judge by: settled as it stands
    assert (accumulator.report().float64.cleared == 1) is cleared
    assert accumulator.report().float64.reference_max_abs_error == pytest.approx(1e-2)


def test_the_engine_asks_the_reference_for_float64_only_where_a_gradient_fails():
    spec = _train_spec()

    class Gradients:
        def __init__(self, name, error=0.0):
            self.name, self.error, self.float64_calls = name, error, 0

        def run(self, graph, feed):
            grad = np.linspace(-1, 1, 10, dtype=np.float32)
            grad[3] += self.error
            return {"loss": np.float32(1), "logits": feed["logits_in"], "grad.w": grad}

        def run_float64(self, graph, feed):
            self.float64_calls += 1
            return {"loss": 1.0, "logits": feed["logits_in"].astype(np.float64),
                    "grad.w": np.linspace(-1, 1, 10)}  # fmt: skip

    subject, reference = Gradients("onnx"), Gradients("fp32 torch", error=0.01)
    inputs = [InputSet("a", sizes={"N": 2}, seed=0), InputSet("b", sizes={"N": 3}, seed=1)]
    report = compare_runners(subject, reference, [spec], inputs, resolve_tolerances())
    grad = next(o for o in report.outputs if o.output == "grad.w")
    assert reference.float64_calls == 2 and grad.float64.cleared == 2 and report.passed
    quiet = Gradients("fp32 torch")
    compare_runners(subject, quiet, [spec], inputs, resolve_tolerances())
    assert quiet.float64_calls == 0  # nothing failed: nothing recomputed


@pytest.mark.parametrize(("wrong", "cleared"), [(0.0, True), (0.01, False)])
def test_a_gradient_float64_cannot_clear_is_judged_along_the_subjects_own_routing(wrong, cleared):
    """The subject's forward fell on the other side of a near-tie (one ReLU decided otherwise):
    its gradient is float64's along that routing, cleared; a gradient off by more than the
    rule along its own routing is not."""
    spec = _train_spec()
    exact = np.linspace(-1, 1, 10)
    other_side = exact.copy()
    other_side[3] += 0.5  # the path the other decision opens
    routes = [("relu", np.array([1.0, -1e-7]))]

    class Subject:
        name = "onnx"

        def run(self, graph, feed):
            return {"loss": np.float32(1), "logits": feed["logits_in"],
                    "grad.w": (other_side + wrong).astype(np.float32)}  # fmt: skip

        def run_exposing_routes(self, graph, feed):
            return self.run(graph, feed), routes

    class Reference:
        name = "fp32 torch"

        def run(self, graph, feed):
            return {"loss": np.float32(1), "logits": feed["logits_in"],
                    "grad.w": exact.astype(np.float32)}  # fmt: skip

        def run_float64(self, graph, feed):
            return {"loss": 1.0, "logits": feed["logits_in"].astype(np.float64), "grad.w": exact}

        def run_float64_routed(self, graph, feed, given):
            assert given is routes
            return {**self.run_float64(graph, feed), "grad.w": other_side}

    inputs = [InputSet("a", sizes={"N": 2}, seed=0)]
    report = compare_runners(Subject(), Reference(), [spec], inputs, resolve_tolerances())
    grad = next(o for o in report.outputs if o.output == "grad.w")
    assert grad.mismatches >= 1 and grad.float64.onnx_max_abs_error >= 0.5
    assert grad.float64.routed_inputs == ["a"]
    assert grad.float64.routed_max_abs_error == pytest.approx(wrong, abs=1e-7)
    # cleared by the rule along its routing, or far beyond the spread (fp32 torch is right)
    assert (grad.float64.max_spread_used is None) if cleared else grad.float64.max_spread_used > 1
    assert grad.passed is cleared and report.passed is cleared


def _train_spec():
    from lossx.runtime.graphs import GraphKind, GraphSpec, Role, TensorSpec

    logits_in = TensorSpec("logits_in", "float32", ("N", 10), "real", Role.IMAGES)
    outputs = (
        TensorSpec("loss", "float32", (), "real", Role.LOSS),
        TensorSpec("logits", "float32", ("N", 10), "real", Role.LOGITS),
        TensorSpec("grad.w", "float32", (10,), "real", Role.GRADIENT, "w"),
    )
    return GraphSpec("train", GraphKind.TRAIN, parse_loss_spec("ce"), (logits_in,), outputs)


# --- the task-level checks judge a sample by its confidence bounds -------------------------


@pytest.mark.parametrize(
    ("agreeing", "rows", "passed"),
    [
        (69, 72, True),  # 95.83% of 72 rows: the 96% limit may well hold (upper bound 98.6%)
        (955, 1000, True),  # 95.5% of 1,000: upper bound 96.6%, not yet shown to miss 96%
        (940, 1000, False),  # 94.0% of 1,000: upper bound 95.3%, a miss beyond chance
        (1000, 1000, True),
    ],
)
def test_argmax_agreement_fails_only_when_its_upper_bound_misses_the_limit(agreeing, rows,
                                                                           passed):  # fmt: skip
    bound = agreement_upper_bound(agreeing, rows)
    assert bound >= agreeing / rows
    logits = np.zeros((rows, 2), np.float32)
    logits[:, 0] = 1
    other = logits.copy()
    other[agreeing:] = logits[agreeing:, ::-1]
    tolerance = replace(PROFILES["int8"], atol=10.0, real_images_only=False)
    report = compare_arrays(other, logits, tolerance, ToleranceRule.TASK)
    assert report.argmax_rows == rows
    assert report.argmax_agreement_upper_bound == pytest.approx(bound)
    assert report.passed is (bound >= tolerance.min_argmax_agreement)


def test_the_wilson_bound_matches_its_closed_form():
    # 69 of 72: centre 0.9351, half-width 0.0507 (z = 1.96), from the formula by hand
    assert agreement_upper_bound(69, 72) == pytest.approx(0.98575, abs=2e-4)
    assert agreement_upper_bound(10, 10) == 1.0
    assert agreement_upper_bound(0, 10) == pytest.approx(0.2775, abs=1e-3)


def test_an_accuracy_drop_fails_only_when_its_lower_bound_exceeds_the_limit():
    # one image of 64 lost: a 1.6-point drop, yet within what chance gives
    assert drop_lower_bound(1, 0, 64) < 0.01
    # 40 of 1,000 lost, none gained: a drop of 4 points beyond doubt
    assert drop_lower_bound(40, 0, 1000) > 0.02
    # as many gained as lost: no drop
    assert drop_lower_bound(20, 20, 1000) < 0
