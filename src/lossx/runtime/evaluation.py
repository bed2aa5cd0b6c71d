"""Evaluate an artifact over a labelled image set with ONNX Runtime: accuracy, losses,
throughput.

The losses come from the artifact's own loss graphs; numpy only prepares their inputs
(the logits in the form each loss takes, and the labels in the form its target takes).
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from lossx.errors import DataError
from lossx.runtime.artifact import Artifact
from lossx.runtime.feeds import check_batch_size, check_outputs, graph_feed, iter_batches
from lossx.runtime.graphs import Role
from lossx.runtime.image_set import ImageSet
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions
from lossx.runtime.session import provider_names


@dataclass(frozen=True)
class EvalResult:
    """What `lossx eval` reports; `to_dict` is its JSON form."""

    artifact: str
    weights: str  # the artifact's own, or the --weights file with its sha256
    precision: str  # of the model graph (the artifact's manifest)
    data: str
    images: int
    batch_size: int
    top1_accuracy: float
    losses: dict[str, float]  # loss name -> value over all images, see loss_definitions
    loss_definitions: dict[str, str]  # loss name -> LossSpec.eval_description
    seconds: float  # wall time of the whole evaluation: data preparation, model and losses
    images_per_second: float
    model_images_per_second: float  # model graph alone
    providers: list[str]  # execution providers ONNX Runtime really used, in order
    class_names: list[str]  # the artifact's, in class-index order
    # confusion[true][predicted]: how many images of class `true` the model took for `predicted`
    confusion: list[list[int]]
    # files of the data that could not be read and were left out: {"file", "reason"}
    skipped: list[dict] = field(default_factory=list)

    @property
    def per_class(self) -> list[tuple[str, int, float | None]]:
        """(class name, images of it, share the model got right: None where there are none)."""
        rows = []
        for index, name in enumerate(self.class_names):
            count = sum(self.confusion[index])
            rows.append((name, count, self.confusion[index][index] / count if count else None))
        return rows

    def to_dict(self) -> dict:
        data = asdict(self)
        data["per_class_accuracy"] = {name: share for name, _, share in self.per_class}
        return data

    def to_text(self) -> str:
        """The table `lossx eval` prints."""
        rows = [
            ("weights", self.weights),
            ("model precision", self.precision),
            ("data", self.data),
            ("images evaluated", f"{self.images:,}"),
            *skipped_rows(self.skipped),
            ("top-1 accuracy", f"{self.top1_accuracy:.2%}"),
        ]
        rows += [
            (f"{name} loss", f"{value:.6f}  ({self.loss_definitions[name]})")
            for name, value in self.losses.items()
        ]
        rows += [
            (
                "throughput",
                f"{self.images_per_second:,.0f} images/s end to end, "
                f"{self.model_images_per_second:,.0f} images/s model alone",
            ),
            ("providers", ", ".join(self.providers)),
        ]
        width = max(len(label) for label, _ in rows)
        table = "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
        return table + "\n\n" + self.per_class_text()

    def per_class_text(self) -> str:
        """Each class's images and accuracy, and what the model most often took it for."""
        width = max(len("class"), *(len(name) for name in self.class_names))
        lines = [f"{'class':<{width}}  {'images':>7}  {'accuracy':>8}  most often taken for"]
        for index, (name, count, share) in enumerate(self.per_class):
            row = self.confusion[index]
            wrong = [(n, other) for other, n in enumerate(row) if other != index and n]
            worst = max(wrong, default=None)
            taken = f"{self.class_names[worst[1]]} ({worst[0]:,})" if worst else "-"
            accuracy = f"{share:.2%}" if share is not None else "-"
            lines.append(f"{name:<{width}}  {count:>7,}  {accuracy:>8}  {taken}")
        return "\n".join(lines)


def evaluate(
    artifact: Artifact,
    split: ImageSet,
    batch_size: int = 256,
    options: SessionOptions = DEFAULT_SESSION,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Run the model and every loss graph of `artifact` over `split` in sessions opened with
    `options`."""
    if not isinstance(split, ImageSet):
        raise DataError(
            f"split: expected an ImageSet (Runtime.dataset, lossx.runtime.load_dataset), got "
            f"{type(split).__name__}"
        )
    if len(split) == 0:
        raise DataError("no images to evaluate")
    check_batch_size(batch_size)
    model = artifact.session("model", options)
    model_spec = artifact.graph("model").spec
    graphs = {loss: artifact.manifest.loss_graph(loss.name) for loss in artifact.manifest.losses}
    losses = {
        loss: (graph, artifact.session(graph.stem, options)) for loss, graph in graphs.items()
    }
    classes = len(artifact.manifest.class_names)
    confusion = np.zeros((classes, classes), np.int64)
    totals = dict.fromkeys(losses, 0.0)
    elements = dict.fromkeys(losses, 0)
    model_seconds = 0.0
    started = time.perf_counter()
    for images, labels in iter_batches(split, batch_size, artifact.contract):
        model_started = time.perf_counter()
        (logits,) = model.run(
            [model_spec.named(Role.LOGITS)], {model_spec.named(Role.IMAGES): images}
        )
        model_seconds += time.perf_counter() - model_started
        check_outputs(model_spec, {model_spec.named(Role.LOGITS): logits})
        pairs = labels.astype(np.int64) * classes + logits.argmax(axis=1)
        confusion += np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)
        for spec, (graph, session) in losses.items():
            feed = graph_feed(graph, images, labels, logits, None)
            (loss,) = session.run([graph.named(Role.LOSS)], feed)
            weight = len(labels) if spec["reduction"] in ("mean", "batchmean") else 1
            totals[spec] += float(loss.sum(dtype=np.float64)) * weight
            elements[spec] += loss.size if spec["reduction"] == "none" else len(labels)
        if progress:
            progress(len(labels))
    seconds = time.perf_counter() - started
    count = int(confusion.sum())  # the images read: files that could not be are skipped
    if count == 0:
        raise DataError(f"{split.source}: none of its {len(split):,} files could be read")
    return EvalResult(
        artifact=str(artifact.path),
        weights=artifact.weights_used,
        precision=artifact.manifest.precision_name,
        data=split.source,
        images=count,
        batch_size=batch_size,
        top1_accuracy=int(np.trace(confusion)) / count,
        losses={spec.name: _aggregate(spec, totals[spec], elements[spec]) for spec in losses},
        loss_definitions={spec.name: spec.eval_description for spec in losses},
        seconds=seconds,
        images_per_second=count / seconds,
        model_images_per_second=count / model_seconds,
        providers=provider_names(model),
        class_names=list(artifact.manifest.class_names),
        confusion=confusion.tolist(),
        skipped=[{"file": s.file, "reason": s.reason} for s in split.skipped],
    )


def skipped_rows(skipped: list[dict]) -> list[tuple[str, str]]:
    """A report's row for the files left out, naming the first, if any were."""
    if not skipped:
        return []
    first = skipped[0]
    return [("skipped files", f"{len(skipped):,} (the first: {first['file']}: {first['reason']})")]


def _aggregate(loss: LossSpec, total: float, elements: int) -> float:
    return total if loss["reduction"] == "sum" else total / elements
