"""Evaluate an artifact over CIFAR-10 with ONNX Runtime: accuracy, losses, throughput.

The losses come from the artifact's own loss graphs; numpy only prepares their inputs
(the logits in the form each loss takes, and the labels in the form its target takes).
"""

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from lossx.errors import DataError
from lossx.runtime.artifact import Artifact
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.graphs import NUM_CLASSES, GraphSpec, fused_graph, loss_graph
from lossx.runtime.losses import LossSpec
from lossx.runtime.preprocessing import to_model_input
from lossx.runtime.session import provider_names

_EVAL_INPUTS = {
    "logits": "the logits",
    "softmax": "the softmax probabilities",
    "log_softmax": "the log-softmax of the logits",
}
_EVAL_TARGETS = {
    "class_index": "the labels",
    "probabilities": "one-hot labels",
    "unit": "one-hot labels",
    "real": "one-hot labels",
    "log_probabilities": "the log of one-hot labels (log 0 taken as log of float32's tiny)",
}
_AGGREGATES = {
    "mean": "batch values averaged with batch-size weights",
    "batchmean": "batch values averaged with batch-size weights",
    "sum": "summed over all images",
    "none": "per-element losses averaged over all elements",
}


def describe_loss(loss: LossSpec) -> str:
    """What `lossx eval` reports for `loss`, in words."""
    return (
        f"{loss.info.torch_class} {loss} of {_EVAL_INPUTS[loss.info.eval_input]} against "
        f"{_EVAL_TARGETS[loss.target]}; {_AGGREGATES[loss['reduction']]}"
    )


@dataclass(frozen=True)
class EvalResult:
    """What `lossx eval` reports; `to_dict` is its JSON form."""

    artifact: str
    data: str
    images: int
    batch_size: int
    top1_accuracy: float
    losses: dict[str, float]  # loss name -> value over all images, see loss_definitions
    loss_definitions: dict[str, str]  # loss name -> describe_loss(spec)
    seconds: float  # wall time of the whole evaluation: data preparation, model and losses
    images_per_second: float
    model_images_per_second: float  # model graph alone
    providers: list[str]  # execution providers ONNX Runtime really used, in order

    def to_dict(self) -> dict:
        return asdict(self)


# Peak memory per image of a batch, measured with lossx eval: 8,192-image batches took 1.87 GB
# of RSS against 0.19 GB for 256-image ones (float32 input and ONNX Runtime's activations).
BYTES_PER_BATCH_IMAGE = 220_000


def available_memory() -> int | None:
    """Bytes the system can still give this process (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_size(batch_size: int) -> None:
    """Refuse a batch size below 1, or one whose batches would not fit in memory."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    needed, available = batch_size * BYTES_PER_BATCH_IMAGE, available_memory()
    if available is not None and needed > available:
        raise DataError(
            f"batch size {batch_size:,} needs about {needed / 1e9:,.1f} GB of memory; "
            f"{available / 1e9:,.1f} GB are available. Choose a smaller --batch-size"
        )


def iter_batches(split: Cifar10Split, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Model-ready batches: float32 images [B,3,32,32] and int64 labels [B]."""
    check_batch_size(batch_size)
    for start in range(0, len(split), batch_size):
        stop = start + batch_size
        yield to_model_input(split.images[start:stop]), split.labels[start:stop]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def target_form(loss: LossSpec, labels: np.ndarray) -> np.ndarray:
    """The target input of `loss` for class labels: the labels, or their one-hot vectors."""
    if loss.target == "class_index":
        return labels
    targets = one_hot(labels)
    if loss.target == "log_probabilities":
        return np.log(np.maximum(targets, np.finfo(np.float32).tiny))
    return targets


def loss_inputs(loss: LossSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The feed of standalone graph `loss_<name>` as eval uses it (see describe_loss)."""
    transform = {"logits": np.asarray, "softmax": softmax, "log_softmax": log_softmax}
    input_name, target_name = loss_graph(loss).input_names
    return {
        input_name: transform[loss.info.eval_input](logits),
        target_name: target_form(loss, labels),
    }


def graph_feed(
    spec: GraphSpec,
    images: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    parameters: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The feed of any graph for a batch: images for the model, `logits` in the loss's form for
    a loss graph, images and targets for a fused graph, plus `parameters` for a training one."""
    if spec.kind == "model":
        return {"images": images}
    if spec.kind == "loss":
        return loss_inputs(spec.loss, logits, labels)
    feed = fused_inputs(spec.loss, images, labels)
    if spec.kind == "train":
        feed.update({name: parameters[name] for name in spec.input_names[2:]})
    return feed


def fused_inputs(loss: LossSpec, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The feed of fused graph `model_<name>`: images and the loss's target form of the labels."""
    images_name, target_name = fused_graph(loss).input_names
    return {images_name: images, target_name: target_form(loss, labels)}


def evaluate(
    artifact: Artifact,
    split: Cifar10Split,
    batch_size: int = 256,
    provider: str = "cpu",
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    optimization: str = "all",
    tf32: bool = False,
) -> EvalResult:
    """Run the model and every loss graph of `artifact` over `split` (session options as in
    `open_session`)."""
    if len(split) == 0:
        raise DataError("no images to evaluate")
    options = {"threads": threads, "optimization": optimization, "tf32": tf32}
    model = artifact.session("model", provider, **options)
    losses = {
        spec: artifact.session(f"loss_{spec.name}", provider, **options)
        for spec in artifact.manifest.losses
    }
    correct = 0
    totals = dict.fromkeys(losses, 0.0)
    elements = dict.fromkeys(losses, 0)
    model_seconds = 0.0
    started = time.perf_counter()
    for images, labels in iter_batches(split, batch_size):
        model_started = time.perf_counter()
        (logits,) = model.run(["logits"], {"images": images})
        model_seconds += time.perf_counter() - model_started
        correct += int((logits.argmax(axis=1) == labels).sum())
        for spec, session in losses.items():
            (loss,) = session.run(["loss"], loss_inputs(spec, logits, labels))
            weight = len(labels) if spec["reduction"] in ("mean", "batchmean") else 1
            totals[spec] += float(loss.sum(dtype=np.float64)) * weight
            elements[spec] += loss.size if spec["reduction"] == "none" else len(labels)
        if progress:
            progress(len(labels))
    seconds = time.perf_counter() - started
    count = len(split)
    return EvalResult(
        artifact=str(artifact.path),
        data=split.source,
        images=count,
        batch_size=batch_size,
        top1_accuracy=correct / count,
        losses={spec.name: _aggregate(spec, totals[spec], elements[spec]) for spec in losses},
        loss_definitions={spec.name: describe_loss(spec) for spec in losses},
        seconds=seconds,
        images_per_second=count / seconds,
        model_images_per_second=count / model_seconds,
        providers=provider_names(model),
    )


def _aggregate(loss: LossSpec, total: float, elements: int) -> float:
    return total if loss["reduction"] == "sum" else total / elements
