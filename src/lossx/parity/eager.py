"""Eager PyTorch beside ONNX Runtime on the same batches: a parity report for a whole artifact."""

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lossx.build.models import build_model, load_checkpoint
from lossx.build.modules import reference_module
from lossx.parity.compare import ParityReport, compare, merge_into
from lossx.runtime.artifact import Artifact
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.evaluate import graph_feed, iter_batches
from lossx.runtime.graphs import GraphSpec


class EagerRunner:
    """Runs any graph of an artifact eagerly: the model rebuilt with the artifact's weights
    (`artifact.parameters()`), or with a checkpoint's."""

    def __init__(self, artifact: Artifact, checkpoint: Path | None = None) -> None:
        self.model = build_model(artifact.manifest.model)
        if checkpoint is None:
            state = {k: torch.from_numpy(v) for k, v in artifact.parameters().items()}
            self.model.load_state_dict(state)
        else:
            load_checkpoint(self.model, Path(checkpoint))

    def run(self, spec: GraphSpec, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        module = reference_module(spec, self.model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. KLDivLoss's note on reduction="mean"
            outputs = module(*(torch.from_numpy(feed[name]) for name in spec.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return [o.numpy() for o in outputs]


def artifact_parity(
    artifact: Artifact,
    split: Cifar10Split,
    atol: float,
    rtol: float,
    batch_size: int = 256,
    provider: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> ParityReport:
    """Compare every graph of `artifact` with eager PyTorch on the batches of `split`.

    Standalone loss graphs get the eager logits (as eval feeds them), so their comparison
    measures the loss graph alone.
    """
    eager = EagerRunner(artifact)
    table = {}
    model = artifact.graph("model").spec
    specs = [entry.spec for entry in artifact.manifest.graphs]
    parameters = artifact.parameters()
    for images, labels in iter_batches(split, batch_size):
        eager_logits = eager.run(model, {"images": images})[0]
        for spec in specs:
            feed = graph_feed(spec, images, labels, eager_logits, parameters)
            onnx_outputs = artifact.session(spec.stem, provider).run(spec.output_names, feed)
            eager_outputs = eager.run(spec, feed)
            for name, got, want in zip(spec.output_names, onnx_outputs, eager_outputs, strict=True):
                merge_into(table, compare(spec.stem, name, got, want, atol, rtol))
        if progress:
            progress(len(labels))
    return ParityReport(tuple(table.values()), len(split))
