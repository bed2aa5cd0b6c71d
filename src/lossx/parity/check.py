"""`lossx check` and `lossx eval --compare-eager`: an artifact against eager PyTorch (or, for
drift between exports, another artifact) through the comparator (lossx.compare.comparator).

`lossx check` compares every graph on the real image batches, a batch of 1 and an odd batch
of 7, and seeded random inputs of several sizes; on a failure of a graph that runs the model
it adds the layer-by-layer diagnosis. `--compare-eager` compares on the real batches only.
"""

import platform
import sys
from collections.abc import Callable
from dataclasses import replace
from itertools import chain
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import lossx
from lossx.build.eager import EagerRunner
from lossx.compare.comparator import compare_runners
from lossx.compare.inputs import (
    InputSet,
    random_input_sets,
    real_input_sets,
    reference_logits,
    sample_feed,
)
from lossx.compare.report import ParityReport
from lossx.compare.runners import OnnxRuntimeRunner, RunOnce
from lossx.compare.tolerances import Tolerances
from lossx.errors import SpecError
from lossx.parity.layers import first_failing_node, layer_diagnosis
from lossx.runtime.artifact import Artifact
from lossx.runtime.feeds import check_batch_size, iter_batches
from lossx.runtime.graphs import GraphSpec, Role
from lossx.runtime.image_set import ImageSet
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions
from lossx.runtime.session import provider_names

DIAGNOSIS_IMAGES = 64


def check_artifact(
    artifact: Artifact,
    data: ImageSet | None,
    tolerances: Tolerances,
    profile: str,
    reference: Artifact | Path | None = None,
    batch_size: int = 256,
    seed: int = 0,
    options: SessionOptions = DEFAULT_SESSION,
    repro: Path | None = None,
    progress: Callable[[InputSet], None] | None = None,
    model_name: str | None = None,
    model_args: dict[str, object] | None = None,
) -> ParityReport:
    """Compare every output of every graph of `artifact` with eager PyTorch on the artifact's
    weights, on a checkpoint's (`reference` a path), or with a baseline artifact's outputs
    (`reference` an Artifact). The eager model is the manifest's, or `model_name`."""
    check_batch_size(batch_size)
    baseline = reference if isinstance(reference, Artifact) else None
    if baseline is not None:
        expected = RunOnce(OnnxRuntimeRunner.of_artifact(baseline, "baseline artifact", options))
    else:
        expected = RunOnce(EagerRunner.of_artifact(artifact, reference, model_name, model_args))
    inputs = random_input_sets(seed)
    if data is not None:
        inputs = chain(
            real_input_sets(data, batch_size, artifact.contract, odd_batches=True), inputs
        )
    report = compare_runners(
        OnnxRuntimeRunner.of_artifact(artifact, options=options),
        expected,
        _graphs_to_compare(artifact, baseline),
        inputs,
        tolerances,
        profile=profile,
        parameters=artifact.state_dict(),
        loss_inputs=reference_logits(expected, artifact.graph("model").spec),
        repro=repro,
        progress=progress,
    )
    report = replace(
        report,
        artifact=str(artifact.path),
        fingerprint=fingerprint(artifact, options),
        not_compared={
            **report.not_compared,
            **{
                entry.spec.file: "the baseline has no such graph"
                for entry in artifact.manifest.graphs
                if baseline is not None and not baseline.has_graph(entry.spec.stem)
            },
        },
    )
    failing_model = [o for o in report.failures if artifact.graph(o.graph).spec.runs_model]
    if not failing_model or baseline is not None or artifact.manifest.precision_record.converted:
        return report  # the layers of a converted graph are not the eager model's
    model = artifact.graph("model").spec
    if data is not None:
        head = data.head(DIAGNOSIS_IMAGES)
        images = next(iter_batches(head, DIAGNOSIS_IMAGES, artifact.contract))[0]
    else:
        images = sample_feed(model, {"N": 8}, seed)[model.named(Role.IMAGES)]
    tolerance = tolerances.of(model, model.named(Role.LOGITS))
    layers = layer_diagnosis(artifact, expected.model, images, tolerance, options.provider)
    first = next((row.layer for row in layers if not row.passed), None)
    node = first_failing_node(artifact, expected.model, images, tolerance, options.provider)
    return replace(report, layers=layers, first_failing_layer=first, first_failing_node=node)


def compare_with_eager(
    artifact: Artifact,
    data: ImageSet,
    tolerances: Tolerances,
    profile: str,
    batch_size: int = 256,
    options: SessionOptions = DEFAULT_SESSION,
    progress: Callable[[InputSet], None] | None = None,
) -> ParityReport:
    """`lossx eval --compare-eager`: every graph of `artifact` against eager PyTorch on the
    batches of `data` alone."""
    reference = RunOnce(EagerRunner.of_artifact(artifact))
    report = compare_runners(
        OnnxRuntimeRunner.of_artifact(artifact, options=options),
        reference,
        [entry.spec for entry in artifact.manifest.graphs],
        real_input_sets(data, batch_size, artifact.contract),
        tolerances,
        profile=profile,
        parameters=artifact.state_dict(),
        loss_inputs=reference_logits(reference, artifact.graph("model").spec),
        progress=progress,
    )
    return replace(report, artifact=str(artifact.path), fingerprint=fingerprint(artifact, options))


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


def fingerprint(artifact: Artifact, options: SessionOptions) -> dict:
    """What produced and ran the comparison: enough to reproduce it or explain a difference."""
    session = artifact.session("model", options)
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
