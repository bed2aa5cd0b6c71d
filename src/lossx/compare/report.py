"""What a comparison found, as plain data: one ParityReport, rendered by lossx.compare.render.

The export self-check, `lossx eval --compare-eager` and `lossx check` all produce it. Everything
here is numpy-free JSON-ready data; `ParityReport.to_dict` is the JSON report, whose schema is
`parity_report.schema.json` beside this file. The report owns its verdict.
"""

from dataclasses import asdict, dataclass, field

from lossx.compare.tolerances import Tolerance
from lossx.errors import ModelError, ParityError

SCHEMA_VERSION = 2  # 2: confidence bounds, float64 judgement, invalid reference values
# Decades of absolute error for the histogram: "0", then [1e-12, 1e-11), ..., [1e-1, 1), ">=1".
HISTOGRAM_BINS = ("0", "<1e-12", *(f"1e-{k}" for k in range(12, 0, -1)), ">=1")


@dataclass(frozen=True)
class WorstElement:
    """The element that used the largest share of its tolerance."""

    inputs: str  # which input set, e.g. "test images 256-511" or "random N=7 seed 2"
    index: list[int]  # position in the output tensor of that input set
    onnx: float  # may be NaN or +-Inf (written as strings in JSON)
    reference: float
    abs_error: float
    tolerance_used: float


@dataclass(frozen=True)
class NonFinite:
    """NaN/Inf counts on each side; `disagreeing` counts elements where only one side (or the
    two sides differently) is non-finite: each of those is a failure."""

    onnx_nan: int = 0
    onnx_inf: int = 0
    reference_nan: int = 0
    reference_inf: int = 0
    disagreeing: int = 0


@dataclass(frozen=True)
class Float64Check:
    """A gradient's input sets that missed the gradient rule against the fp32 reference, judged
    again by the reference computed in float64: there the subject passes when it is within the
    rule of float64, or within FP32_SPREAD times the fp32 reference's distance from float64
    (what fp32 rounding does decides, not which engine is the reference). Those still
    out are judged by float64 along the subject's own gradient routing: an fp32 forward on the
    other side of a near-tie computes the exact gradient of that side."""

    inputs: list[str]  # the input sets judged by float64
    onnx_max_abs_error: float  # the subject against float64, over those input sets
    reference_max_abs_error: float  # the fp32 reference against float64, over the same
    cleared: int  # elements out of tolerance against fp32 that float64 showed to be as accurate
    # input sets judged again by float64 routed as the subject's forward decided (ReLU, clip,
    # max pool: lossx.build.routing), and the subject's largest error from that
    routed_inputs: list[str] = field(default_factory=list)
    routed_max_abs_error: float | None = None
    # the largest share used of what fp32 rounding does (FP32_SPREAD times the fp32 reference's
    # distance from float64), over the input sets float64 judged by it; None where the subject
    # was within the rule of float64 on all of them
    max_spread_used: float | None = None


@dataclass(frozen=True)
class OutputReport:
    """One output of one graph over every input set."""

    graph: str
    output: str
    tolerance: Tolerance
    elements: int
    mismatches: int  # elements out of tolerance, one-sided NaN/Inf included
    max_abs_error: float
    mean_abs_error: float
    p99_abs_error: float
    max_rel_error: float
    mean_rel_error: float
    p99_rel_error: float
    max_tolerance_used: float
    worst: WorstElement | None
    nonfinite: NonFinite
    histogram: dict[str, int]  # HISTOGRAM_BINS -> element count
    # Logits only (task-level checks): argmax agreement over every row, and top-1 accuracy of
    # each side on the real images (None without labels), with the sample sizes and the 95%
    # confidence bounds the checks are decided by (lossx.compare.tolerances, CONFIDENCE_Z).
    argmax_agreement: float | None = None
    argmax_rows: int | None = None
    argmax_agreement_upper_bound: float | None = None
    accuracy_onnx: float | None = None
    accuracy_reference: float | None = None
    accuracy_images: int | None = None
    accuracy_drop_lower_bound: float | None = None
    task_failures: list[str] = field(default_factory=list)  # task-level checks that failed
    # Elements the reference computed as NaN or Inf where a sound model gives numbers (logits;
    # gradients and next buffers where the loss is a number): the model itself is broken.
    invalid_reference: int = 0
    invalid_reference_inputs: str | None = None  # the first input set where that happened
    float64: Float64Check | None = None  # gradients: input sets judged by float64

    @property
    def passed(self) -> bool:
        allowed = int(self.tolerance.max_mismatch_fraction * self.elements)
        cleared = self.float64.cleared if self.float64 else 0
        within = self.mismatches - cleared <= allowed and self.nonfinite.disagreeing == 0
        return within and not self.task_failures and not self.invalid_reference

    @property
    def fraction_out_of_tolerance(self) -> float:
        return self.mismatches / self.elements if self.elements else 0.0

    @property
    def name(self) -> str:
        return f"{self.graph}/{self.output}"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        data["fraction_out_of_tolerance"] = self.fraction_out_of_tolerance
        return data


@dataclass(frozen=True)
class LayerRow:
    """One layer of the model, eager module output against the ONNX value it maps to."""

    layer: str  # module path and class, e.g. "model1.3 (MaxPool2d)"
    onnx_value: str  # the ONNX tensor name compared
    max_abs_error: float
    max_tolerance_used: float

    @property
    def passed(self) -> bool:
        return self.max_tolerance_used <= 1


@dataclass(frozen=True)
class ParityReport:
    """Every output of every graph compared with a reference, the environment, and on failure
    the layer-by-layer diagnosis and where the failing case was saved."""

    artifact: str
    reference: str  # "eager PyTorch (...)" or "baseline artifact ..."
    profile: str  # tolerance profile name, or "custom"
    inputs: list[str]  # the input sets compared, in order
    outputs: list[OutputReport]
    fingerprint: dict = field(default_factory=dict)  # versions, providers, opset, graph sha256s
    seconds: float = 0.0
    layers: list[LayerRow] = field(default_factory=list)  # filled on a model failure
    first_failing_layer: str | None = None
    # the first op out of tolerance: module path, aten op and line (a residual addition too)
    first_failing_node: str | None = None
    repro: str | None = None  # .npz with the failing inputs and both outputs
    not_compared: dict[str, str] = field(default_factory=dict)  # graph file -> why not

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def failures(self) -> list[OutputReport]:
        return [o for o in self.outputs if not o.passed]

    @property
    def invalid(self) -> list[OutputReport]:
        """Outputs the reference computed NaN or Inf for where they must be numbers: the model
        is broken, so nothing could be verified (an error of the input, not of parity)."""
        return [o for o in self.outputs if o.invalid_reference]

    @property
    def exit_code(self) -> int:
        """0 when every output is within tolerance; ModelError's (2) when the reference computes
        NaN or Inf where numbers belong; else ParityError's (1)."""
        if self.invalid:
            return ModelError.exit_code
        return 0 if self.passed else ParityError.exit_code

    def failure_line(self) -> str:
        """One line: how many outputs failed, the worst, where it failed and what was saved;
        or, for a broken model, which output the reference computed NaN or Inf for."""
        if self.invalid:
            o = self.invalid[0]
            return (
                f"{o.name}: the reference ({self.reference}) computes NaN or Inf, not numbers "
                f"({o.invalid_reference:,} elements, first on {o.invalid_reference_inputs}); "
                "the model itself is broken, so there is nothing to verify"
            )
        worst = max(self.failures, key=lambda o: o.max_tolerance_used)
        where = f" on {worst.worst.inputs}" if worst.worst else ""
        line = (
            f"parity failed for {len(self.failures)} of {len(self.outputs)} outputs, worst "
            f"{worst.name} (max abs error {worst.max_abs_error:.3g}{where})"
        )
        if self.first_failing_node:
            line += f"; first failing node {self.first_failing_node}"
        elif self.first_failing_layer:
            line += f"; first failing layer {self.first_failing_layer}"
        if self.repro:
            line += f"; failing case saved to {self.repro}"
        return line

    def raise_if_failed(self, context: str = "") -> None:
        """ModelError or ParityError (see `exit_code`) with `failure_line` (after `context`)
        unless every output passed."""
        if not self.passed:
            error = ModelError if self.invalid else ParityError
            raise error(f"{context}{self.failure_line()}")

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "passed": self.passed,
            "artifact": self.artifact,
            "reference": self.reference,
            "profile": self.profile,
            "inputs": list(self.inputs),
            "outputs": [o.to_dict() for o in self.outputs],
            "not_compared": dict(self.not_compared),
            "layers": [{**asdict(row), "passed": row.passed} for row in self.layers],
            "first_failing_layer": self.first_failing_layer,
            "first_failing_node": self.first_failing_node,
            "repro": self.repro,
            "fingerprint": self.fingerprint,
            "seconds": self.seconds,
        }
