"""`lossx check`: every graph of an artifact against a reference, on real and random inputs.

The reference is eager PyTorch (the model rebuilt from the manifest and the artifact's weights
or a checkpoint) or, for drift between exports, another artifact. Both sides see the same
feeds: the real CIFAR-10 batches (plus a batch of 1 and an odd batch of 7) and seeded random
inputs of several sizes. The result is one CheckReport (lossx.parity.report).
"""

import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import lossx
from lossx.build.export import sample_inputs
from lossx.errors import SpecError
from lossx.files import write_atomically
from lossx.parity.compare import element_errors
from lossx.parity.eager import EagerRunner
from lossx.parity.layers import layer_diagnosis
from lossx.parity.report import (
    HISTOGRAM_BINS,
    PROFILES,
    CheckReport,
    NonFinite,
    OutputReport,
    Tolerance,
    WorstElement,
    output_tolerance,
)
from lossx.runtime.artifact import Artifact
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.evaluate import check_batch_size, graph_feed
from lossx.runtime.graphs import GraphSpec
from lossx.runtime.preprocessing import to_model_input
from lossx.runtime.session import provider_names

RANDOM_SIZES = ({"N": 1, "C": 10, "D": 10}, {"N": 7, "C": 5, "D": 3})


@dataclass(frozen=True)
class Tolerances:
    """The tolerance of each output: `per_output` by "graph/output" or by output name."""

    default: Tolerance
    per_output: dict[str, Tolerance]

    def of(self, graph: str, output: str) -> Tolerance:
        """An --atol-for of "graph/output", else of "output", else the default (for gradients
        at least GRADIENT_TOLERANCE)."""
        fallback = output_tolerance(output, self.default)
        return self.per_output.get(f"{graph}/{output}") or self.per_output.get(output, fallback)


def resolve_tolerances(
    profile: str,
    atol: float | None = None,
    rtol: float | None = None,
    atol_for: tuple[str, ...] = (),
) -> Tolerances:
    """A profile's tolerance, with --atol/--rtol overriding it and --atol-for OUTPUT=X items."""
    if profile not in PROFILES:
        raise SpecError(f"unknown tolerance profile {profile!r}; choose {', '.join(PROFILES)}")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and np.isfinite(value)):
            raise SpecError(f"--{name} must be a finite number >= 0, got {value}")
    base = PROFILES[profile]
    default = replace(
        base, atol=base.atol if atol is None else atol, rtol=base.rtol if rtol is None else rtol
    )
    per_output = {}
    for item in atol_for:
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or not key or not (number >= 0 and np.isfinite(number)):
            raise SpecError(f"--atol-for {item!r}: write OUTPUT=X or GRAPH/OUTPUT=X, X >= 0")
        per_output[key] = replace(default, atol=number)
    return Tolerances(default, per_output)


class BaselineReference:
    """Another artifact's ONNX Runtime outputs as the reference (drift between exports)."""

    def __init__(self, baseline: Artifact, provider: str = "cpu") -> None:
        self.baseline = baseline
        self.provider = provider

    def run(self, spec: GraphSpec, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.baseline.session(spec.stem, self.provider).run(spec.output_names, feed)


@dataclass(frozen=True)
class InputSet:
    label: str
    images: np.ndarray | None  # real images and labels; None for random inputs
    labels: np.ndarray | None
    seed: int = 0
    sizes: dict | None = None
    repeated: bool = False  # images already seen in the full pass: not counted for accuracy


def input_sets(data: Cifar10Split | None, batch_size: int, seed: int) -> Iterator[InputSet]:
    """Real batches (all of `data`, then a batch of 1 and an odd batch of 7), then random."""
    if data is not None and len(data):
        for start in range(0, len(data), batch_size):
            stop = min(start + batch_size, len(data))
            yield InputSet(
                f"images {start}-{stop - 1}",
                data.images[start:stop],
                data.labels[start:stop],
            )
        yield InputSet("image 0 alone", data.images[:1], data.labels[:1], repeated=True)
        odd = data.images[1:8]
        labels = data.labels[1 : 1 + len(odd)]
        yield InputSet(f"images 1-{len(odd)} as one batch", odd, labels, repeated=True)
    for index, sizes in enumerate(RANDOM_SIZES):
        yield InputSet(
            f"random N={sizes['N']} seed {seed + index}", None, None, seed + index, sizes
        )


class _Accumulator:
    """Every comparison of one output, kept until the report is made."""

    def __init__(self, graph: str, output: str, tolerance: Tolerance) -> None:
        self.graph, self.output, self.tolerance = graph, output, tolerance
        self.errors, self.relatives, self.failed = [], [], 0
        self.nonfinite = dict.fromkeys(NonFinite.__dataclass_fields__, 0)
        self.worst: WorstElement | None = None
        self.worst_case = None  # (input set label, feed, onnx outputs, reference outputs)
        self.rows = self.agreements = self.correct_onnx = self.correct_reference = 0
        self.labelled_rows = 0

    def add(self, label: str, onnx_value, reference, labels, case) -> None:
        onnx_value, reference = np.asarray(onnx_value), np.asarray(reference)
        if onnx_value.shape != reference.shape:
            onnx_value = np.full(reference.shape, np.nan)  # every element then fails
        atol = self.tolerance.atol_for(np.asarray(reference, dtype=np.float64))
        errors = element_errors(onnx_value, reference, atol, self.tolerance.rtol)
        self.errors.append(errors.error.ravel())
        self.relatives.append(errors.relative.ravel())
        self.failed += int(np.count_nonzero(errors.failed))
        both = {"onnx": onnx_value, "reference": reference}
        for side, values in both.items():
            self.nonfinite[f"{side}_nan"] += int(np.count_nonzero(np.isnan(values)))
            self.nonfinite[f"{side}_inf"] += int(np.count_nonzero(np.isinf(values)))
        finite = np.isfinite(onnx_value) & np.isfinite(reference)
        self.nonfinite["disagreeing"] += int(np.count_nonzero(errors.failed & ~finite))
        if errors.used.size:
            at = np.unravel_index(int(np.argmax(errors.used)), errors.used.shape)
            used = float(errors.used[at])
            if self.worst is None or used > self.worst.tolerance_used:
                self.worst = WorstElement(
                    label,
                    [int(i) for i in at],
                    float(onnx_value[at]),
                    float(reference[at]),
                    float(errors.error[at]),
                    used,
                )
                self.worst_case = (label, *case)
        if self.output == "logits" and reference.ndim == 2:
            self.rows += len(reference)
            self.agreements += int(np.count_nonzero(onnx_value.argmax(1) == reference.argmax(1)))
            if labels is not None:
                self.labelled_rows += len(labels)
                self.correct_onnx += int(np.count_nonzero(onnx_value.argmax(1) == labels))
                self.correct_reference += int(np.count_nonzero(reference.argmax(1) == labels))

    def report(self) -> OutputReport:
        errors = np.concatenate(self.errors)
        relatives = np.concatenate(self.relatives)
        labelled = self.labelled_rows or None
        agreement = self.agreements / self.rows if self.rows else None
        accuracy_onnx = self.correct_onnx / labelled if labelled else None
        accuracy_reference = self.correct_reference / labelled if labelled else None
        task_failures = []
        if agreement is not None and agreement < self.tolerance.min_argmax_agreement:
            task_failures.append(
                f"argmax agreement {agreement:.2%} < {self.tolerance.min_argmax_agreement:.2%}"
            )
        if labelled and accuracy_reference - accuracy_onnx > self.tolerance.max_accuracy_drop:
            task_failures.append(
                f"top-1 accuracy {accuracy_onnx:.2%} vs {accuracy_reference:.2%}, a drop of more "
                f"than {self.tolerance.max_accuracy_drop:.2%}"
            )
        return OutputReport(
            graph=self.graph,
            output=self.output,
            tolerance=self.tolerance,
            elements=int(errors.size),
            mismatches=self.failed,
            max_abs_error=float(errors.max(initial=0.0)),
            mean_abs_error=float(errors.mean()) if errors.size else 0.0,
            p99_abs_error=float(np.percentile(errors, 99)) if errors.size else 0.0,
            max_rel_error=float(relatives.max(initial=0.0)),
            mean_rel_error=float(relatives.mean()) if relatives.size else 0.0,
            p99_rel_error=float(np.percentile(relatives, 99)) if relatives.size else 0.0,
            max_tolerance_used=self.worst.tolerance_used if self.worst else 0.0,
            worst=self.worst,
            nonfinite=NonFinite(**self.nonfinite),
            histogram=error_histogram(errors),
            argmax_agreement=agreement,
            accuracy_onnx=accuracy_onnx,
            accuracy_reference=accuracy_reference,
            task_failures=task_failures,
        )


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


def check_artifact(
    artifact: Artifact,
    data: Cifar10Split | None,
    tolerances: Tolerances,
    profile: str,
    checkpoint: Path | None = None,
    baseline: Artifact | None = None,
    batch_size: int = 256,
    seed: int = 0,
    session_options: dict | None = None,
    repro: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Compare every output of every graph of `artifact` with eager PyTorch (or `baseline`)."""
    started = time.perf_counter()
    check_batch_size(batch_size)
    options = {"provider": "cpu", **(session_options or {})}
    provider = options.pop("provider")
    eager = EagerRunner(artifact, checkpoint) if baseline is None else None
    reference = eager if baseline is None else BaselineReference(baseline, provider)
    specs = _graphs_to_compare(artifact, baseline)
    model_spec = artifact.graph("model").spec
    accumulators: dict[tuple[str, str], _Accumulator] = {}
    parameters = artifact.parameters()  # what training graphs are fed, on both sides
    labels_seen = []
    for inputs in input_sets(data, batch_size, seed):
        if progress:
            progress(inputs.label)
        labels_seen.append(inputs.label)
        if inputs.images is not None:
            images = to_model_input(inputs.images)
            reference_logits = reference.run(model_spec, {"images": images})[0]
        for spec in specs:
            if inputs.images is None:
                feed = _random_feed(spec, inputs, parameters)
            else:
                feed = graph_feed(spec, images, inputs.labels, reference_logits, parameters)
            got = artifact.session(spec.stem, provider, **options).run(spec.output_names, feed)
            want = reference.run(spec, feed)
            onnx_outputs = dict(zip(spec.output_names, got, strict=True))
            labels = None if inputs.repeated else inputs.labels
            for name, g, w in zip(spec.output_names, got, want, strict=True):
                key = (spec.stem, name)
                if key not in accumulators:
                    accumulators[key] = _Accumulator(spec.stem, name, tolerances.of(*key))
                case = (spec.stem, feed, onnx_outputs, w, name)
                accumulators[key].add(inputs.label, g, w, labels, case)
    outputs = [a.report() for a in accumulators.values()]
    report = CheckReport(
        artifact=str(artifact.path),
        reference=_describe_reference(artifact, checkpoint, baseline),
        profile=profile,
        inputs=labels_seen,
        outputs=outputs,
        fingerprint=fingerprint(artifact, provider, options),
        seconds=0.0,
    )
    layers, first = [], None
    failing_model = [
        o
        for o in report.failures
        if artifact.graph(o.graph).spec.kind in ("model", "fused", "train")
    ]
    if failing_model and eager is not None:
        diagnosis_images = to_model_input(data.images[:64]) if data is not None else None
        if diagnosis_images is None:
            diagnosis_images = _random_feed(model_spec, InputSet("", None, None, seed, {"N": 8}))
            diagnosis_images = diagnosis_images["images"]
        layers = layer_diagnosis(
            artifact, eager.model, diagnosis_images, tolerances.of("model", "logits"), provider
        )
        first = next((row.layer for row in layers if not row.passed), None)
    saved = None
    if report.failures and repro is not None:
        worst = max(report.failures, key=lambda o: o.max_tolerance_used)
        saved = str(save_repro(repro, accumulators[(worst.graph, worst.output)]))
    return replace(
        report,
        seconds=time.perf_counter() - started,
        layers=layers,
        first_failing_layer=first,
        repro=saved,
    )


def _graphs_to_compare(artifact: Artifact, baseline: Artifact | None) -> list[GraphSpec]:
    specs = [entry.spec for entry in artifact.manifest.graphs]
    if baseline is None:
        return specs
    shared = [s for s in specs if baseline.has_graph(s.stem)]
    for spec in shared:
        old = baseline.graph(spec.stem).spec
        if (old.input_names, old.output_names) != (spec.input_names, spec.output_names):
            raise SpecError(
                f"{spec.file}: inputs/outputs differ from the baseline's; cannot compare them"
            )
    if not shared:
        raise SpecError("the artifact and the baseline have no graph in common")
    return shared


def _random_feed(spec: GraphSpec, inputs: InputSet, parameters=None) -> dict[str, np.ndarray]:
    weights = {k: torch.from_numpy(v) for k, v in (parameters or {}).items()}
    tensors = sample_inputs(spec, inputs.sizes, inputs.seed, parameters=weights)
    return {t.name: x.numpy() for t, x in zip(spec.inputs, tensors, strict=True)}


def _describe_reference(artifact: Artifact, checkpoint: Path | None, baseline) -> str:
    if baseline is not None:
        return f"baseline artifact {baseline.path} (ONNX Runtime)"
    weights = (
        f"checkpoint {checkpoint}"
        if checkpoint
        else f"the artifact's {artifact.manifest.weights['file']}"
    )
    return f"eager PyTorch {torch.__version__}, model {artifact.manifest.model} with {weights}"


def fingerprint(artifact: Artifact, provider: str, options: dict) -> dict:
    """What produced and ran the comparison: enough to reproduce it or explain a difference."""
    session = artifact.session("model", provider, **options)
    return {
        "lossx": lossx.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "providers": provider_names(session),
        "opset": artifact.manifest.opset,
        "ir_versions": {e.spec.file: e.ir_version for e in artifact.manifest.graphs},
        "graphs": {
            e.spec.file: artifact.manifest.files[e.spec.file]["sha256"]
            for e in artifact.manifest.graphs
        },
        "producer": artifact.manifest.producer,
    }


def save_repro(path: Path, accumulator: _Accumulator) -> Path:
    """The worst failing case as .npz: the graph's inputs and both sides' outputs, with a note
    on how to rerun it."""
    label, graph, feed, onnx_outputs, reference_value, output = accumulator.worst_case
    arrays = {f"input.{k}": v for k, v in feed.items()}
    arrays.update({f"onnx.{k}": np.asarray(v) for k, v in onnx_outputs.items()})
    arrays[f"reference.{output}"] = np.asarray(reference_value)
    arrays["about"] = np.array(
        f"lossx check failure: graph {graph}.onnx, output {output}, inputs {label}. Rerun: "
        f"onnxruntime.InferenceSession('{graph}.onnx').run(None, {{name[6:]: arrays[name] for "
        "name in arrays if name.startswith('input.')}})"
    )
    path = Path(path)
    write_atomically(path, lambda f: np.savez(f, **arrays))
    return path
