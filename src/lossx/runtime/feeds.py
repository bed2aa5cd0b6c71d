"""The feeds of an artifact's graphs: CIFAR-10 batches, and the logits and labels each loss
takes in the form it is defined on. Evaluation, training and parity checks all feed graphs
through here.
"""

import os
from collections.abc import Iterator

import numpy as np

from lossx.errors import DataError
from lossx.runtime.cifar10 import Cifar10Split
from lossx.runtime.graphs import NUM_CLASSES, GraphSpec, Role
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.preprocessing import to_model_input

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


def loss_input(loss: LossSpec, logits: np.ndarray) -> np.ndarray:
    """The logits in the form `loss` scores: as they are, softmax or log-softmax."""
    transform = {"logits": np.asarray, "softmax": softmax, "log_softmax": log_softmax}
    return transform[loss.info.eval_input](logits)


def graph_feed(
    spec: GraphSpec,
    images: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray | None,
    parameters: dict[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """The feed of any graph for a batch, input by input from its role: the images, `logits`
    in the form the loss scores (a standalone loss), the labels in the loss's target form, and
    `parameters` (by state_dict name) for a training graph's parameters and buffers."""
    feed = {}
    for tensor in spec.inputs:
        if tensor.role is Role.IMAGES:
            feed[tensor.name] = images
        elif tensor.role is Role.LOSS_INPUT:
            feed[tensor.name] = loss_input(spec.loss, logits)
        elif tensor.role is Role.TARGET:
            feed[tensor.name] = target_form(spec.loss, labels)
        else:
            feed[tensor.name] = parameters[tensor.name]
    return feed
