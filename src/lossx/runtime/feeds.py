"""The feeds of an artifact's graphs: image batches, and the logits and labels each loss
takes in the form it is defined on. Evaluation, training and parity checks all feed graphs
through here.
"""

import os
from collections.abc import Iterator

import numpy as np

from lossx.errors import DataError, ModelError, with_article
from lossx.runtime.contract import ImageContract
from lossx.runtime.graphs import GraphSpec, Role, TensorSpec
from lossx.runtime.image_set import ImageSet
from lossx.runtime.loss_specs import LossSpec

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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be an integer of at least 1, got {batch_size!r}")
    needed, available = batch_size * BYTES_PER_BATCH_IMAGE, available_memory()
    if available is not None and needed > available:
        raise DataError(
            f"batch size {batch_size:,} needs about {needed / 1e9:,.1f} GB of memory; "
            f"{available / 1e9:,.1f} GB are available. Choose a smaller --batch-size"
        )


def iter_batches(
    split: ImageSet, batch_size: int, contract: ImageContract
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Model-ready batches: float32 images [B,C,H,W] as `contract` says and int64 labels [B]."""
    check_batch_size(batch_size)
    for images, labels in split.batches(batch_size):
        yield contract.to_model_input(images), labels


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def target_form(loss: LossSpec, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The target input of `loss` for class labels: the labels, or their one-hot vectors."""
    if loss.target == "class_index":
        return labels
    targets = one_hot(labels, num_classes)
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
            feed[tensor.name] = target_form(spec.loss, labels, _classes(spec, logits))
        else:
            feed[tensor.name] = parameters[tensor.name]
    return feed


def _classes(spec: GraphSpec, logits: np.ndarray | None) -> int:
    classes = spec.class_dim()
    return classes if isinstance(classes, int) else logits.shape[1]


def check_feed(
    spec: GraphSpec, feed: dict[str, np.ndarray], pixel_range: tuple[float, float] = (0.0, 1.0)
) -> None:
    """Refuse inputs graph `spec` cannot take, naming the input and what was expected: names,
    dtypes, ranks, fixed and shared dims, empty batches, and class indices out of range (which
    ONNX Runtime's gathers would read from the end or fail on without saying why), and images
    outside `pixel_range` (the image contract's, lossx.runtime.contract)."""
    if sorted(feed) != sorted(spec.input_names):
        given = ", ".join(feed) or "none"
        raise DataError(f"{spec.file} takes inputs {', '.join(spec.input_names)}; got {given}")
    dims: dict[str, tuple[str, int]] = {}
    for tensor in spec.inputs:
        value = feed[tensor.name]
        if not isinstance(value, np.ndarray) or value.dtype != np.dtype(tensor.dtype):
            raise DataError(
                f"{tensor.name}: expected {with_article(tensor.dtype)} array of shape "
                f"[{', '.join(map(str, tensor.shape))}], got {_described(value)}"
            )
        expected = "[" + ", ".join(map(str, tensor.shape)) + "]"
        if value.ndim != len(tensor.shape):
            raise DataError(f"{tensor.name}: expected shape {expected}, got {list(value.shape)}")
        for want, size in zip(tensor.shape, value.shape, strict=True):
            if isinstance(want, int) and size != want:
                raise DataError(
                    f"{tensor.name}: expected shape {expected}, got {list(value.shape)}"
                )
            if isinstance(want, str):
                seen = dims.setdefault(want, (tensor.name, size))
                if seen[1] != size:
                    raise DataError(
                        f"{tensor.name}: dim {want} is {size} but {seen[0]} has {want} = {seen[1]}"
                    )
        if value.size == 0:
            raise DataError(f"{tensor.name}: empty (shape {list(value.shape)}); nothing to compute")
        if value.dtype.kind == "f":
            _check_values(tensor, value, pixel_range)
    for tensor in spec.inputs:
        if tensor.values == "class_index":
            classes = spec.class_dim()
            classes = classes if isinstance(classes, int) else dims[classes][1]
            check_labels(spec.loss, feed[tensor.name], classes, tensor.name)


def check_outputs(spec: GraphSpec, outputs: dict[str, np.ndarray]) -> None:
    """Refuse outputs holding NaN or Inf where a sound model gives numbers (the logits; the
    gradients and next buffers where the loss is a number): a class, an accuracy or a step
    computed from them would mean nothing."""
    losses = [t.name for t in spec.outputs if t.role is Role.LOSS and t.name in outputs]
    loss_finite = all(np.isfinite(outputs[name]).all() for name in losses)
    for tensor in spec.outputs:
        value = outputs.get(tensor.name)
        if value is None or not tensor.must_be_finite(loss_finite):
            continue
        bad = ~np.isfinite(value)
        if bad.any():
            where = [int(i) for i in np.argwhere(bad)[0]]
            raise ModelError(
                f"{spec.file} computes {value[tuple(where)]} in {tensor.name} (at index "
                f"{where}), not a number: the model or its weights are broken"
            )


def _described(value: object) -> str:
    if isinstance(value, np.ndarray):
        return with_article(f"{value.dtype} array")
    if isinstance(value, np.generic):
        return f"a numpy {value.dtype} scalar, not an array"
    return with_article(type(value).__name__)


# How far a normalised pixel may lie outside the contract's range: float32 rounding of
# (x - mean) / std, a few ulps of values up to a few units.
_PIXEL_SLACK = 1e-5


def _check_values(tensor: TensorSpec, value: np.ndarray, pixel_range: tuple[float, float]) -> None:
    """NaN anywhere, or Inf other than a log-probability's -inf (log 0), or images outside
    `pixel_range`, are refused: they mean a broken input, not a number to compute with."""
    low, high = value.min(), value.max()  # NaN propagates: two fast passes decide most inputs
    if not (np.isfinite(low) and np.isfinite(high)):
        allowed = value == -np.inf if tensor.values == "log_probabilities" else False
        bad = np.isnan(value) | (np.isinf(value) & np.logical_not(allowed))
        if bad.any():
            where = [int(i) for i in np.argwhere(bad)[0]]
            raise DataError(
                f"{tensor.name}: {value[tuple(where)]} at index {where}; expected finite values"
            )
    least, most = pixel_range
    if tensor.values == "image" and (low < least - _PIXEL_SLACK or high > most + _PIXEL_SLACK):
        expected = (
            "pixels scaled to [0, 1] (x / 255, no mean/std normalisation)"
            if pixel_range == (0.0, 1.0)
            else f"pixels scaled by the artifact's preprocessing, within [{least:g}, {most:g}]"
        )
        raise DataError(f"{tensor.name}: values from {low:g} to {high:g}; expected {expected}")


def check_labels(spec: LossSpec, labels: np.ndarray, classes: int, name: str = "labels") -> None:
    """Refuse class indices outside [0, classes) other than ignore_index, as torch does.

    ONNX Runtime's gathers read a negative index from the end and fail on a large one with an
    internal message; lossx checks first and names the bad value.
    """
    if labels.dtype != np.int64:
        raise DataError(f"{name}: expected int64 class indices, got {labels.dtype}")
    bad = ((labels < 0) | (labels >= classes)) & (labels != spec["ignore_index"])
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{name}: value {int(labels[where])} at index {list(where)} is not a class index "
            f"0..{classes - 1} nor ignore_index {spec['ignore_index']}"
        )
