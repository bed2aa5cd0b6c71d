"""Tolerances: the profiles lossx compares under, and the rule each kind of output follows.

An element passes when |onnx - reference| <= atol + rtol * |reference|. Which tolerance an
output gets is asked of its graph spec (`TensorSpec.tolerance_rule`), never of its name.
"""

import math
from dataclasses import dataclass, field, replace

from lossx.errors import SpecError
from lossx.runtime.graphs import GraphSpec, ToleranceRule
from lossx.runtime.precisions import PRECISIONS


def _check_finite(name: str, value: float) -> None:
    """A tolerance that is NaN, infinite or negative would pass everything or nothing."""
    if isinstance(value, bool) or not (
        isinstance(value, int | float) and value >= 0 and math.isfinite(value)
    ):
        raise SpecError(f"--{name} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class Tolerance:
    """An element passes when |onnx - reference| <= atol + rtol * |reference|. For logits,
    the task-level checks: argmax agreement at least `min_argmax_agreement`, and top-1 accuracy
    on real images at most `max_accuracy_drop` below the reference's."""

    atol: float
    rtol: float
    min_argmax_agreement: float = 1.0
    max_accuracy_drop: float = 0.0
    max_mismatch_fraction: float = 0.0  # share of elements allowed outside (gradients, int8)
    atol_scales: bool = False  # atol is times max(1, max |reference|) of each batch (gradients)
    real_images_only: bool = False  # compared on real images only, never on random inputs

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            _check_finite(name, getattr(self, name))
        for name in ("min_argmax_agreement", "max_accuracy_drop", "max_mismatch_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value <= 1):
                raise SpecError(f"tolerance {name} must be in [0, 1], got {value!r}")

    def atol_for(self, reference) -> float:
        """The absolute tolerance for one batch's `reference` values."""
        if not self.atol_scales or not len(reference):
            return self.atol
        finite = reference[reference == reference]  # NaN excluded
        peak = float(abs(finite).max()) if finite.size else 0.0
        return self.atol * max(1.0, peak if peak != float("inf") else 1.0)


# Defaults per profile. fp32-cpu: at atol 1e-5 the shipped weights use 48% of it over all
# 50,000 training images on AVX-512 CPUs, but on an AVX2-only AMD EPYC the gate's random images
# (uniform in [0,1], N=7 seed 1) reached 1.43e-5 on a logit of 0.221, torch's own fp32 being
# 1.08e-5 from float64 there (ONNX Runtime 5.4e-6), so atol is 2e-5 (docs/parity.md).
# fp32-cuda (TF32 off): an H100 gave logits 1.05e-5 from the CPU's at most, a third of it.
# fp16 and int8: the shipped weights' artifacts against eager fp32 on a VNNI CPU
# (docs/precision.md). fp16: max 0.0098 over all 50,000 training images (77% of tolerance),
# argmax agreement 99.97%, top-1 +0.01 pp; test images 99.90%, -0.10 pp. int8 (real images
# only: calibrated on photographs, it promises nothing on noise; there it reached 1.4): over
# the training images 38 of 500,080 logits outside 0.5 + 0.1|ref| (clipped outliers, worst
# 7.95), agreement 98.02%, top-1 -0.12 pp; test images max 1.10, 97.60%, +0.20 pp. The
# task-level limits allow a near-tie to flip in fp32 (none did over 50,000 images).
PROFILES = {
    "fp32-cpu": Tolerance(2e-5, 1e-5, min_argmax_agreement=0.999, max_accuracy_drop=0.001),
    "fp32-cuda": Tolerance(3e-5, 3e-5, min_argmax_agreement=0.999, max_accuracy_drop=0.001),
    "fp16": Tolerance(1e-2, 1e-2, min_argmax_agreement=0.995, max_accuracy_drop=0.002),
    "int8": Tolerance(
        0.5,
        0.1,
        min_argmax_agreement=0.96,
        max_accuracy_drop=0.01,
        max_mismatch_fraction=0.001,
        real_images_only=True,
    ),
}
if not {p.tolerance_profile for p in PRECISIONS.values()} - {None} <= PROFILES.keys():
    raise ImportError("a precision of lossx.runtime.precisions names no profile of PROFILES")
DEFAULT_PROFILE = "fp32-cpu"


# Gradients of training graphs under the fp32 profiles. A gradient sums over every image and
# position, and max-pooling routes it through one argmax per window: where two conv outputs
# differ by less than float32 rounding, ONNX Runtime and torch pick different maxima and a few
# elements get another pixel's gradient. Measured on the 1,000 real test images (batch 256,
# mean reductions): worst element 7.5e-4 (grad.images, mse), nothing outside; with
# l1(reduction=sum), whose gradients are 2,560 times larger, such flips moved the first
# convolution's weight gradient by up to 0.11 (of values up to 100). So a gradient element
# passes within 2e-3 * max(1, largest |reference| in the batch) + 1e-3 * |reference|, and up to
# 0.1% of a gradient's elements may fall outside.
GRADIENT_TOLERANCE = Tolerance(2e-3, 1e-3, max_mismatch_fraction=0.001, atol_scales=True)


# Where an output misses its rule against the fp32 reference and float64 decides, the subject
# passes when its distance from float64 is at most FP32_SPREAD times the further of the
# reference's fp32 runs (torch on its oneDNN and its native kernels), along the subject's own
# routing where that is nearer. Correct fp32 computations of an ill-conditioned step (a
# train-mode batch norm over a few values per channel) land far from float64 and apart: torch's
# two kernels a median 1.4-7x apart (bench/fp32_spread.py), the lossx graph in ONNX Runtime up to
# 1.7x further than the further of them on torchvision's models at 32x32 and 64x64 where every
# batch norm sees at least BN_MIN_VALUES values per channel. Below that it reached 3.2-4.8x (2
# and 4 values on 1x1 maps, one image on 2x2 maps): a variance of so few values keeps too few
# digits in fp32 to judge by, so a training step is not compared there (the reason is reported),
# as torch itself refuses one value per channel.
FP32_SPREAD = 2.0
BN_MIN_VALUES = 5

# The task-level checks judge a sample: one flipped argmax among 64 images moves agreement by
# 1.6 points, more than int8's whole margin. A check therefore fails only where the sample
# shows the limit is missed: the 95% confidence bound (z = 1.96) on the side of passing is
# beyond the limit. int8's 96% then fails on 1,000 rows at 94.7% agreement or less.
CONFIDENCE_Z = 1.96


def agreement_upper_bound(agreeing: int, rows: int, z: float = CONFIDENCE_Z) -> float:
    """The upper end of the Wilson score interval of an agreement rate `agreeing`/`rows`."""
    p, z2 = agreeing / rows, z * z
    centre = p + z2 / (2 * rows)
    spread = z * math.sqrt(p * (1 - p) / rows + z2 / (4 * rows * rows))
    return min(1.0, (centre + spread) / (1 + z2 / rows))


def drop_lower_bound(
    only_reference: int, only_subject: int, images: int, z: float = CONFIDENCE_Z
) -> float:
    """The lower end of the confidence interval of a paired accuracy drop (McNemar's normal
    approximation): `only_reference` images the reference alone got right, `only_subject`
    those the subject alone did, of `images`."""
    drop = (only_reference - only_subject) / images
    variance = ((only_reference + only_subject) / images - drop * drop) / images
    return drop - z * math.sqrt(max(variance, 0.0))


def default_profile(provider: str) -> str:
    """The profile for fp32 graphs run on `provider` (the one ONNX Runtime really used)."""
    return "fp32-cuda" if provider == "cuda" else DEFAULT_PROFILE


def rule_tolerance(rule: ToleranceRule, default: Tolerance) -> Tolerance:
    """`default`, or for a gradient GRADIENT_TOLERANCE where `default` is tighter than it (the
    task-level limits stay `default`'s)."""
    if rule is ToleranceRule.GRADIENT and default.atol < GRADIENT_TOLERANCE.atol:
        return replace(
            GRADIENT_TOLERANCE,
            min_argmax_agreement=default.min_argmax_agreement,
            max_accuracy_drop=default.max_accuracy_drop,
        )
    return default


@dataclass(frozen=True)
class Tolerances:
    """The tolerance of each output: `per_output` by "graph/output" or by output name, else
    the default under the output's rule; in an int8 or fp16 artifact, `fp32` (when set) for the
    graphs it keeps fp32 (its losses)."""

    default: Tolerance
    per_output: dict[str, Tolerance] = field(default_factory=dict)
    fp32: Tolerance | None = None

    def check_names(self, graphs: list[GraphSpec]) -> None:
        """Refuse a per-output tolerance that names no output of `graphs`, listing those that
        exist: a typo must not leave an output at the default silently."""
        outputs = {name for graph in graphs for name in graph.output_names}
        qualified = {f"{graph.stem}/{name}" for graph in graphs for name in graph.output_names}
        for key in self.per_output:
            if key not in outputs and key not in qualified:
                raise SpecError(
                    f"--atol-for {key}: no graph has an output {key}; outputs are "
                    f"{', '.join(sorted(outputs))} (or GRAPH/OUTPUT, e.g. "
                    f"{sorted(qualified)[0]})"
                )

    def of(self, graph: GraphSpec, output: str) -> Tolerance:
        explicit = self.per_output.get(f"{graph.stem}/{output}") or self.per_output.get(output)
        kept_fp32 = self.fp32 is not None and not graph.kind.follows_precision
        base = self.fp32 if kept_fp32 else self.default
        return explicit or rule_tolerance(graph.output(output).tolerance_rule, base)


def check_overrides(
    atol: float | None = None, rtol: float | None = None, atol_for: tuple[str, ...] = ()
) -> dict[str, float]:
    """Refuse an --atol or --rtol that is not a finite number >= 0, or an --atol-for item that
    is not OUTPUT=X; return the --atol-for items by output. Torch-free and quick: the command
    line checks them before any work."""
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None:
            _check_finite(name, value)
    per_output = {}
    for item in atol_for:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not key or not (number >= 0 and math.isfinite(number)):
            raise SpecError(f"--atol-for {item!r}: write OUTPUT=X or GRAPH/OUTPUT=X, X >= 0")
        per_output[key] = number
    return per_output


def resolve_tolerances(
    profile: str = DEFAULT_PROFILE,
    atol: float | None = None,
    rtol: float | None = None,
    atol_for: tuple[str, ...] = (),
    fp32_profile: str | None = None,
) -> Tolerances:
    """A profile's tolerance, with --atol/--rtol overriding it and --atol-for OUTPUT=X items;
    with `fp32_profile`, that profile (so overridden) for the graphs an artifact keeps fp32."""
    for name in (profile, fp32_profile or profile):
        if name not in PROFILES:
            raise SpecError(f"unknown tolerance profile {name!r}; choose {', '.join(PROFILES)}")
    per_output = check_overrides(atol, rtol, atol_for)

    def overridden(base: Tolerance) -> Tolerance:
        return replace(
            base,
            atol=base.atol if atol is None else atol,
            rtol=base.rtol if rtol is None else rtol,
        )

    default = overridden(PROFILES[profile])
    fp32 = overridden(PROFILES[fp32_profile]) if fp32_profile else None
    per_output = {key: replace(default, atol=number) for key, number in per_output.items()}
    return Tolerances(default, per_output, fp32)
