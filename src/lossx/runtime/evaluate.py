"""Evaluate an artifact over CIFAR-10 with ONNX Runtime: accuracy, losses, throughput.

The losses come from the artifact's own loss graphs; numpy only prepares their inputs
(softmax probabilities and one-hot targets for the dense losses).
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from lossx.errors import DataError
from lossx.runtime.artifact import Artifact
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.graphs import LOSS_TARGETS, NUM_CLASSES
from lossx.runtime.preprocessing import to_model_input
from lossx.runtime.session import provider_names

LOSS_DESCRIPTIONS = {
    "ce": "mean cross-entropy of the logits against the labels",
    "mse": "mean squared error of the softmax probabilities against one-hot labels",
    "l1": "mean absolute error of the softmax probabilities against one-hot labels",
}


@dataclass(frozen=True)
class EvalResult:
    """What `lossx eval` reports; `to_dict` is its JSON form."""

    artifact: str
    data: str
    images: int
    batch_size: int
    top1_accuracy: float
    losses: dict[str, float]  # loss name -> mean over all images, see LOSS_DESCRIPTIONS
    seconds: float  # wall time of the whole evaluation: data preparation, model and losses
    images_per_second: float
    model_images_per_second: float  # model graph alone
    providers: list[str]  # execution providers ONNX Runtime really used, in order

    def to_dict(self) -> dict:
        data = asdict(self)
        data["loss_definitions"] = {name: LOSS_DESCRIPTIONS[name] for name in self.losses}
        return data


def iter_batches(split: Cifar10Split, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Model-ready batches: float32 images [B,3,32,32] and int64 labels [B]."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, len(split), batch_size):
        stop = start + batch_size
        yield to_model_input(split.images[start:stop]), split.labels[start:stop]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def one_hot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def loss_inputs(loss: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The feed of standalone graph `loss_<loss>` as eval uses it."""
    if LOSS_TARGETS[loss] == "class_index":
        return {"logits": logits, "labels": labels}
    return {"input": softmax(logits), "target": one_hot(labels)}


def fused_inputs(loss: str, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The feed of fused graph `model_<loss>`: images and the loss's target form of the labels."""
    if LOSS_TARGETS[loss] == "class_index":
        return {"images": images, "labels": labels}
    return {"images": images, "targets": one_hot(labels)}


def evaluate(
    artifact: Artifact,
    split: Cifar10Split,
    batch_size: int = 256,
    provider: str = "cpu",
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Run the model and every loss graph of `artifact` over `split`."""
    if len(split) == 0:
        raise DataError("no images to evaluate")
    model = artifact.session("model", provider, threads)
    losses = {
        name: artifact.session(f"loss_{name}", provider, threads)
        for name in artifact.manifest.loss_names
    }
    correct = 0
    loss_sums = dict.fromkeys(losses, 0.0)
    model_seconds = 0.0
    started = time.perf_counter()
    for images, labels in iter_batches(split, batch_size):
        model_started = time.perf_counter()
        (logits,) = model.run(["logits"], {"images": images})
        model_seconds += time.perf_counter() - model_started
        correct += int((logits.argmax(axis=1) == labels).sum())
        for name, session in losses.items():
            (loss,) = session.run(["loss"], loss_inputs(name, logits, labels))
            loss_sums[name] += float(loss) * len(labels)  # graphs reduce by mean
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
        losses={name: total / count for name, total in loss_sums.items()},
        seconds=seconds,
        images_per_second=count / seconds,
        model_images_per_second=count / model_seconds,
        providers=provider_names(model),
    )
