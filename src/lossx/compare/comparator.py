"""The comparator: two runners, the same feeds, every output compared into one ParityReport.

The export self-check, `lossx eval --compare-eager` and `lossx check` all call
`compare_runners`; what differs between them is only the runners, the input sets and the
tolerances they pass.
"""

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from lossx.compare.elementwise import Percentiles, element_errors, error_histogram
from lossx.compare.inputs import TRAIN_BATCH, InputSet
from lossx.compare.report import (
    HISTOGRAM_BINS,
    Float64Check,
    NonFinite,
    OutputReport,
    ParityReport,
    WorstElement,
)
from lossx.compare.runners import Runner, Unjudgeable
from lossx.compare.tolerances import (
    FP32_SPREAD,
    Tolerance,
    Tolerances,
    agreement_upper_bound,
    drop_lower_bound,
)
from lossx.errors import LossxError, ParityError, SpecError, first_line
from lossx.files import write_atomically
from lossx.runtime.graphs import GraphKind, GraphSpec, Role, ToleranceRule

T = TypeVar("T")


@dataclass(frozen=True)
class WorstCase:
    """The feed on which an output came closest to (or went furthest past) its tolerance."""

    graph: str
    output: str
    inputs: str  # the input set's label
    feed: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]  # the subject's outputs for `feed`
    reference: np.ndarray  # the reference's value of `output`

    def save(self, path: Path, folder: Path | None = None) -> Path:
        """The case as .npz: the graph's inputs and both sides' outputs, with (under "about")
        the two lines of Python that rerun it on the graph file in `folder`."""
        path = Path(os.path.abspath(path))
        graph = Path(os.path.abspath(Path(folder or ".") / f"{self.graph}.onnx"))
        arrays = {f"input.{k}": v for k, v in self.feed.items()}
        arrays.update({f"onnx.{k}": np.asarray(v) for k, v in self.outputs.items()})
        arrays[f"reference.{self.output}"] = np.asarray(self.reference)
        arrays["about"] = np.array(
            f"lossx parity failure: graph {self.graph}.onnx, output {self.output}, inputs "
            f"{self.inputs}. Rerun it in Python:\n"
            f"import numpy as np, onnxruntime as ort; case = np.load({str(path)!r})\n"
            f"ort.InferenceSession({str(graph)!r}).run(None, "
            "{k[6:]: case[k] for k in case.files if k.startswith('input.')})"
        )
        write_atomically(path, lambda f: np.savez(f, **arrays))
        return path


class OutputAccumulator:
    """Every comparison of one output, kept until its OutputReport is made."""

    def __init__(self, graph: str, output: str, tolerance: Tolerance, rule: ToleranceRule):
        self.graph, self.output, self.tolerance = graph, output, tolerance
        self.task = rule is ToleranceRule.TASK
        # every element's errors as counts (a training graph's gradients hold every parameter:
        # resnet18's 11M per input set), their maxima and sums in float64
        self.abs_percentiles, self.rel_percentiles = Percentiles(), Percentiles()
        self.histogram = dict.fromkeys(HISTOGRAM_BINS, 0)
        self.elements = 0
        self.max_error = self.max_relative = self.sum_error = self.sum_relative = 0.0
        self.failed = 0
        self.nonfinite = dict.fromkeys(NonFinite.__dataclass_fields__, 0)
        self.worst: WorstElement | None = None
        self.worst_case: WorstCase | None = None
        self.rows = self.agreements = self.correct = self.correct_reference = self.labelled = 0
        self.only_reference = self.only_subject = 0  # images one side alone classifies right
        self.invalid_reference, self.invalid_reference_inputs = 0, None
        self.float64_inputs: list[str] = []
        self.float64_onnx = self.float64_reference = 0.0
        self.routed_inputs: list[str] = []
        self.routed_onnx = 0.0
        self.spread_used: float | None = None  # the largest share of FP32_SPREAD used
        self.cleared = 0

    def add(
        self, inputs: InputSet, got, want, feed=None, outputs=None, must_be_finite=False
    ) -> int:
        """One input set's values of this output: `got` from the subject, `want` from the
        reference (`feed` and the subject's `outputs` are kept for the worst case). With
        `must_be_finite`, NaN or Inf in `want` means the model itself is broken. Returns how
        many of its elements are out of tolerance."""
        got, want = np.asarray(got), np.asarray(want)
        if must_be_finite:
            invalid = int(np.count_nonzero(~np.isfinite(want)))
            if invalid and not self.invalid_reference:
                self.invalid_reference_inputs = inputs.label
            self.invalid_reference += invalid
        if got.shape != want.shape:
            got = np.full(want.shape, np.nan)  # every element then fails
        atol = self.tolerance.atol_for(np.asarray(want, dtype=np.float64))
        errors = element_errors(got, want, atol, self.tolerance.rtol)
        self._keep(errors.error.ravel(), errors.relative.ravel())
        failed = int(np.count_nonzero(errors.failed))
        self.failed += failed
        for side, values in (("onnx", got), ("reference", want)):
            self.nonfinite[f"{side}_nan"] += int(np.count_nonzero(np.isnan(values)))
            self.nonfinite[f"{side}_inf"] += int(np.count_nonzero(np.isinf(values)))
        finite = np.isfinite(got) & np.isfinite(want)
        self.nonfinite["disagreeing"] += int(np.count_nonzero(errors.failed & ~finite))
        if errors.used.size:
            at = np.unravel_index(int(np.argmax(errors.used)), errors.used.shape)
            used = float(errors.used[at])
            if self.worst is None or used > self.worst.tolerance_used:
                self.worst = WorstElement(
                    inputs.label,
                    [int(i) for i in at],
                    float(got[at]),
                    float(want[at]),
                    float(errors.error[at]),
                    used,
                )
                # kept for a repro where out of tolerance: a passing one is never saved, and
                # every output of a training step holding its own would hold many steps
                case = (self.graph, self.output, inputs.label, feed or {}, outputs or {}, want)
                self.worst_case = WorstCase(*case) if used > 1 else None
        if self.task and want.ndim == 2:
            self.rows += len(want)
            self.agreements += int(np.count_nonzero(got.argmax(1) == want.argmax(1)))
            if inputs.real and inputs.counts_for_accuracy:
                right, right_reference = (
                    got.argmax(1) == inputs.labels,
                    want.argmax(1) == inputs.labels,
                )
                self.labelled += len(inputs.labels)
                self.correct += int(np.count_nonzero(right))
                self.correct_reference += int(np.count_nonzero(right_reference))
                self.only_reference += int(np.count_nonzero(right_reference & ~right))
                self.only_subject += int(np.count_nonzero(right & ~right_reference))
        return failed

    def _keep(self, error: np.ndarray, relative: np.ndarray) -> None:
        """One input set's element errors, counted into the output's statistics."""
        self.elements += error.size
        with np.errstate(over="ignore", invalid="ignore"):  # an Inf error gives an Inf mean
            self.max_error = float(np.max([self.max_error, error.max(initial=0.0)]))
            self.max_relative = float(np.max([self.max_relative, relative.max(initial=0.0)]))
            self.sum_error += float(error.sum())
            self.sum_relative += float(relative.sum())
        self.abs_percentiles.add(error)
        self.rel_percentiles.add(relative)
        for decade, count in error_histogram(error).items():
            self.histogram[decade] += count

    def judge_by_float64(
        self, inputs: InputSet, got, wants, exact, failed: int
    ) -> tuple[float, float] | None:
        """The `failed` elements of one input set, judged again by `exact`, the reference's
        float64 values: where the fp32 reference is itself that far from them (a batch norm's
        backward cancels), the comparison cannot tell which engine erred. They are cleared when
        the subject is within this tolerance of float64, or within FP32_SPREAD times the
        distance from float64 of the further of the reference's fp32 runs `wants` (correct fp32
        computations of the same step, rounded in different orders). Those further from float64
        than that run are left to `judge_by_routes` first (a near-tie routed otherwise shows at
        full size): returns None when they were cleared, else the run's distance and the share
        of the spread used."""
        got, exact = (np.asarray(x, dtype=np.float64) for x in (got, exact))
        if got.shape != exact.shape:
            return 0.0, np.inf
        onnx_error, failing = self._against(got, exact)
        with np.errstate(invalid="ignore"):
            reference_error = max(
                float(np.nan_to_num(np.abs(np.asarray(w, np.float64) - exact), nan=np.inf).max())
                for w in wants
            )
        self.float64_inputs.append(inputs.label)
        self.float64_onnx = max(self.float64_onnx, onnx_error)
        self.float64_reference = max(self.float64_reference, reference_error)
        if not failing:
            self.cleared += failed
            return None
        used = _spread_share(onnx_error, reference_error)
        if used * FP32_SPREAD <= 1.0:  # no further than the fp32 reference: routing can wait
            self.settle(failed, used)
            return None
        return reference_error, used

    def judge_by_routes(
        self, inputs: InputSet, got, routed, failed: int, yardstick: float, used: float
    ) -> None:
        """The `failed` elements `judge_by_float64` did not clear (the fp32 reference
        `yardstick` from float64, `used` of the spread), judged by `routed`: float64 along the
        subject's own ReLU, clip and max-pool decisions (`got` is the subject's run that exposed
        them). Where its fp32 forward fell on the other side of a near-tie, its gradient is the
        exact one of that side, and is cleared when within this tolerance of it, or within
        FP32_SPREAD times `yardstick`."""
        got, routed = (np.asarray(x, dtype=np.float64) for x in (got, routed))
        if got.shape != routed.shape:
            self.settle(failed, used)
            return
        onnx_error, failing = self._against(got, routed)
        self.routed_inputs.append(inputs.label)
        self.routed_onnx = max(self.routed_onnx, onnx_error)
        if not failing:
            self.cleared += failed
        else:
            self.settle(failed, min(used, _spread_share(onnx_error, yardstick)))

    def settle(self, failed: int, used: float) -> None:
        """An input set's `failed` elements decided by the spread clause, `used` of it."""
        self.spread_used = max(self.spread_used or 0.0, used)
        if used <= 1.0:
            self.cleared += failed

    def _against(self, got: np.ndarray, exact: np.ndarray) -> tuple[float, bool]:
        """The subject's largest error from `exact`, and whether any element misses the rule."""
        errors = element_errors(got, exact, self.tolerance.atol_for(exact), self.tolerance.rtol)
        return float(errors.error.max(initial=0.0)), bool(errors.failed.any())

    def report(self) -> OutputReport:
        with np.errstate(over="ignore", invalid="ignore"):  # Inf errors give Inf (or NaN) stats
            return self._report()

    def _report(self) -> OutputReport:
        agreement = self.agreements / self.rows if self.rows else None
        accuracy = self.correct / self.labelled if self.labelled else None
        accuracy_reference = self.correct_reference / self.labelled if self.labelled else None
        agreement_bound = drop_bound = None
        task_failures = []
        if agreement is not None:
            agreement_bound = agreement_upper_bound(self.agreements, self.rows)
            if agreement_bound < self.tolerance.min_argmax_agreement:
                task_failures.append(
                    f"argmax agreement {agreement:.2%} over {self.rows:,} rows (95% upper bound "
                    f"{agreement_bound:.2%}) < {self.tolerance.min_argmax_agreement:.2%}"
                )
        if accuracy is not None:
            drop_bound = drop_lower_bound(self.only_reference, self.only_subject, self.labelled)
            if drop_bound > self.tolerance.max_accuracy_drop:
                task_failures.append(
                    f"top-1 accuracy {accuracy:.2%} vs {accuracy_reference:.2%} over "
                    f"{self.labelled:,} images, a drop of more than "
                    f"{self.tolerance.max_accuracy_drop:.2%} (95% lower bound {drop_bound:.2%})"
                )
        return OutputReport(
            graph=self.graph,
            output=self.output,
            tolerance=self.tolerance,
            elements=self.elements,
            mismatches=self.failed,
            max_abs_error=self.max_error,
            mean_abs_error=self.sum_error / self.elements if self.elements else 0.0,
            p99_abs_error=self.abs_percentiles.percentile(99),
            max_rel_error=self.max_relative,
            mean_rel_error=self.sum_relative / self.elements if self.elements else 0.0,
            p99_rel_error=self.rel_percentiles.percentile(99),
            max_tolerance_used=self.worst.tolerance_used if self.worst else 0.0,
            worst=self.worst,
            nonfinite=NonFinite(**self.nonfinite),
            histogram=self.histogram,
            argmax_agreement=agreement,
            argmax_rows=self.rows or None,
            argmax_agreement_upper_bound=agreement_bound,
            accuracy_onnx=accuracy,
            accuracy_reference=accuracy_reference,
            accuracy_images=self.labelled or None,
            accuracy_drop_lower_bound=drop_bound,
            task_failures=task_failures,
            invalid_reference=self.invalid_reference,
            invalid_reference_inputs=self.invalid_reference_inputs,
            float64=Float64Check(
                self.float64_inputs,
                self.float64_onnx,
                self.float64_reference,
                self.cleared,
                self.routed_inputs,
                self.routed_onnx if self.routed_inputs else None,
                self.spread_used,
            )
            if self.float64_inputs
            else None,
        )


def compare_arrays(
    got: np.ndarray,
    want: np.ndarray,
    tolerance: Tolerance,
    rule: ToleranceRule = ToleranceRule.ELEMENTWISE,
    name: str = "value",
) -> OutputReport:
    """One pair of arrays compared, as one OutputReport (graph "-")."""
    accumulator = OutputAccumulator("-", name, tolerance, rule)
    accumulator.add(InputSet("arrays"), got, want)
    return accumulator.report()


def compare_runners(
    subject: Runner,
    reference: Runner,
    graphs: Sequence[GraphSpec],
    input_sets: Iterable[InputSet],
    tolerances: Tolerances,
    *,
    profile: str = "custom",
    parameters: dict[str, np.ndarray] | None = None,
    loss_inputs: Callable[[InputSet], np.ndarray] | None = None,
    repro: Path | None = None,
    progress: Callable[[InputSet], None] | None = None,
) -> ParityReport:
    """Run every graph on both runners for every input set and compare every output.

    On a real batch, standalone losses score `loss_inputs(input set)` (the caller's: e.g. the
    reference model's logits, lossx.compare.inputs.reference_logits), so that they measure the
    loss graph alone; on random inputs they draw their own. Graphs that take parameters get
    `parameters` on both sides; training graphs see a real batch in parts of at most
    TRAIN_BATCH images. With `repro`, the worst failing case is saved there.
    `progress(input set)` follows each input set.
    """
    started = time.perf_counter()
    tolerances.check_names(list(graphs))
    scored = [g.file for g in graphs if any(t.role is Role.LOSS_INPUT for t in g.inputs)]
    accumulators: dict[tuple[str, str], OutputAccumulator] = {}
    labels, refused = [], {}
    for inputs in input_sets:
        labels.append(inputs.label)
        scores = None
        if inputs.real and scored:
            if loss_inputs is None:
                raise SpecError(f"{scored[0]} on real batches needs loss_inputs to score")
            what = f"compute what {scored[0]} scores"
            scores = _guarded(reference, what, inputs, partial(loss_inputs, inputs))
        for graph in graphs:
            if not inputs.real and _real_images_only(graph, tolerances):
                continue
            if inputs.real and not graph.takes_data:  # an optimizer's graph
                continue
            parts = inputs.parts(TRAIN_BATCH) if graph.kind is GraphKind.TRAIN else [inputs]
            for part in parts:
                feed = part.feed(graph, scores, parameters)
                why = _compare_graph(
                    subject, reference, graph, part, feed, tolerances, accumulators
                )
                if why:
                    refused[f"{graph.file} on {part.label}"] = why
        if progress:
            progress(inputs)
    if not labels or not graphs:
        raise SpecError("no inputs or no graphs to compare; a comparison of nothing proves nothing")
    compared = {graph for graph, _ in accumulators}
    for graph in graphs:
        if not graph.takes_data and graph.stem not in compared:
            refused[graph.file] = "it takes no images, and no random inputs were compared"
    report = ParityReport(
        artifact=subject.name,
        reference=reference.name,
        profile=profile,
        inputs=labels,
        outputs=[a.report() for a in accumulators.values()],
        not_compared=refused,
    )
    saved = None
    if report.failures and repro is not None:
        worst = max(report.failures, key=lambda o: o.max_tolerance_used)
        case = accumulators[(worst.graph, worst.output)].worst_case
        if case is not None:  # None: failed by its share of mismatches or its task checks alone
            saved = str(case.save(repro, getattr(subject, "folder", None)))
    return replace(report, seconds=time.perf_counter() - started, repro=saved)


def _compare_graph(
    subject: Runner,
    reference: Runner,
    graph: GraphSpec,
    inputs: InputSet,
    feed: dict[str, np.ndarray],
    tolerances: Tolerances,
    accumulators: dict[tuple[str, str], OutputAccumulator],
) -> str | None:
    """Run `graph` on both runners for `feed` and add every output to its accumulator; a
    gradient, or any output of a training step (its batch norms divide by the spread of a
    small batch, which magnifies rounding), that misses its rule is judged against the
    reference run in float64 (once), then along the subject's own routing (_judge_by_routes).
    Returns why nothing was compared where the reference finds a training step's inputs
    Unjudgeable."""
    try:
        want = reference.run(graph, feed)
    except LossxError:
        raise
    except Unjudgeable as e:
        if graph.kind is GraphKind.TRAIN:
            return str(e)
        raise ParityError(
            f"{reference.name} cannot judge {graph.file} on {inputs.label}: {e}"
        ) from None
    except Exception as e:
        raise ParityError(
            f"{reference.name} failed to run {graph.file} on {inputs.label}: {first_line(e)}"
        ) from None
    got = _run(subject, graph, feed, inputs)
    losses = [t.name for t in graph.outputs if t.role is Role.LOSS]
    loss_finite = all(np.isfinite(want[name]).all() for name in losses)
    exact = None  # the reference in float64, run once where a gradient needs it
    others = None  # the reference's fp32 runs on other kernels (run_other_kernels), likewise
    unexplained = {}  # output: (failed elements float64 did not clear, yardstick, share used)
    for name in graph.output_names:
        key = (graph.stem, name)
        rule = graph.output(name).tolerance_rule
        if key not in accumulators:
            accumulators[key] = OutputAccumulator(
                graph.stem, name, tolerances.of(graph, name), rule
            )
        finite = graph.output(name).must_be_finite(loss_finite)
        failed = accumulators[key].add(inputs, got[name], want[name], feed, got, finite)
        judged = rule is ToleranceRule.GRADIENT or graph.kind is GraphKind.TRAIN
        if failed and judged and hasattr(reference, "run_float64"):
            exact = exact or _run(reference, graph, feed, inputs, float64=True)
            others = _other_runs(reference, graph, feed, inputs) if others is None else others
            wants = [want[name], *(other[name] for other in others)]
            pending = accumulators[key].judge_by_float64(
                inputs, got[name], wants, exact[name], failed
            )
            if pending is not None:
                unexplained[name] = (failed, *pending)
    if unexplained:
        _judge_by_routes(subject, reference, graph, inputs, feed, accumulators, unexplained)


def _spread_share(onnx_error: float, reference_error: float) -> float:
    """The subject's distance from float64 as a share of what fp32 rounding does there,
    FP32_SPREAD times the fp32 reference's (0/0: no spread to be within)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        used = float(np.float64(onnx_error) / (FP32_SPREAD * reference_error))
    return np.inf if used != used else used


def _other_runs(
    reference: Runner, graph: GraphSpec, feed: dict[str, np.ndarray], inputs: InputSet
) -> list[dict[str, np.ndarray]]:
    """The reference's fp32 runs of `graph` on its other kernels, where it has them."""
    if not hasattr(reference, "run_other_kernels"):
        return []
    what = f"run {graph.file} on its other kernels"
    return _guarded(reference, what, inputs, lambda: reference.run_other_kernels(graph, feed))


def _judge_by_routes(
    subject: Runner,
    reference: Runner,
    graph: GraphSpec,
    inputs: InputSet,
    feed: dict[str, np.ndarray],
    accumulators: dict[tuple[str, str], OutputAccumulator],
    unexplained: dict[str, tuple[int, float, float]],
) -> None:
    """Outputs float64 did not clear (`unexplained`: output to its failed elements, the fp32
    yardstick and the share of the spread used), judged again along the subject's own gradient
    routing where both runners can tell it (OutputAccumulator.judge_by_routes); settled as
    they are where not."""
    exposed = routed = None
    what = f"run {graph.file} exposing its routes"
    if hasattr(subject, "run_exposing_routes") and hasattr(reference, "run_float64_routed"):
        exposed = _guarded(subject, what, inputs, lambda: subject.run_exposing_routes(graph, feed))
    if exposed is not None:
        got, routes = exposed
        routed = _guarded(
            reference, what, inputs, lambda: reference.run_float64_routed(graph, feed, routes)
        )
    for name, (failed, yardstick, used) in unexplained.items():
        accumulator = accumulators[(graph.stem, name)]
        if routed is None:
            accumulator.settle(failed, used)
        else:
            accumulator.judge_by_routes(inputs, got[name], routed[name], failed, yardstick, used)


def _real_images_only(graph: GraphSpec, tolerances: Tolerances) -> bool:
    """Whether every output of `graph` is defined on real images alone (an int8 model,
    calibrated on real images, promises nothing on uniform noise)."""
    return all(tolerances.of(graph, name).real_images_only for name in graph.output_names)


def _run(
    runner: Runner, graph: GraphSpec, feed: dict, inputs: InputSet, float64: bool = False
) -> dict:
    """`runner.run` (or its `run_float64`), guarded (`_guarded`)."""
    run = runner.run_float64 if float64 else runner.run
    return _guarded(runner, f"run {graph.file}", inputs, lambda: run(graph, feed))


def _guarded(runner: Runner, what: str, inputs: InputSet, call: Callable[[], T]) -> T:
    """`call()`, its failure (other than lossx's own errors) a one-line ParityError saying
    `what` failed: a graph that cannot run on inputs its spec admits does not compute what it
    should."""
    try:
        return call()
    except LossxError:
        raise
    except Exception as e:
        raise ParityError(
            f"{runner.name} failed to {what} on {inputs.label}: {first_line(e)}"
        ) from None
