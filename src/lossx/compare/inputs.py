"""The inputs both sides of a comparison see: real image batches and seeded random feeds
drawn in numpy from a graph's own tensor specs.

One table of random sizes serves the export self-check and `lossx check`: batch 1, an odd
batch and a large one, with other class and feature counts than the export example for the
standalone losses (and extra dims d1.. for loss graphs exported with extra_dims > 0).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from lossx.compare.runners import Runner
from lossx.runtime.contract import ImageContract
from lossx.runtime.feeds import graph_feed, iter_batches, log_softmax, softmax
from lossx.runtime.graphs import GraphSpec, Role
from lossx.runtime.image_set import ImageSet
from lossx.runtime.update_rules import RULES

# The sizes standalone losses are exported at (every dim but the fixed ones is dynamic).
EXAMPLE_SIZES = {"N": 4, "C": 10, "D": 10, "d1": 3, "d2": 5, "d3": 2}
RANDOM_SIZES = (
    {"N": 1, "C": 10, "D": 10, "d1": 1, "d2": 1, "d3": 1},
    {"N": 7, "C": 5, "D": 3, "d1": 2, "d2": 3, "d3": 4},
    {"N": 64, "C": 13, "D": 21, "d1": 3, "d2": 1, "d3": 2},
)
_WEIGHTS = (Role.PARAMETER, Role.FROZEN_PARAMETER, Role.BUFFER)
# A training step holds every activation for its backward, and ONNX Runtime's more than eager
# torch's: resnet18's at 64x64 on 256 images peaked at 3.8 GB in ONNX Runtime alone. Training
# graphs are compared on batches of at most this many images (a larger real batch in parts).
TRAIN_BATCH = 64


def sample_feed(
    spec: GraphSpec,
    sizes: dict[str, int],
    seed: int,
    scale: float = 1.0,
    ignore_fraction: float = 0.25,
    parameters: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Random inputs for `spec`, with the values each input means, each its own array (an
    aliased pair exports wrongly). Real values and scores are standard normal times `scale`;
    class indices are ignore_index with probability `ignore_fraction`; unit targets include
    exact 0 and 1; a training graph's parameters are `parameters` (a model's weights) or small
    random values; an optimizer's hyperparameters are drawn from their rule's check ranges."""
    rng = np.random.default_rng(seed)
    feed = {}
    for tensor in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in tensor.shape]
        if tensor.role in _WEIGHTS:
            if parameters is not None:
                feed[tensor.name] = np.array(parameters[tensor.name], dtype=tensor.dtype)
            elif tensor.role is Role.BUFFER:  # e.g. batch-norm statistics: variances > 0
                feed[tensor.name] = rng.integers(0, 100, shape).astype(tensor.dtype)
            else:
                feed[tensor.name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        elif tensor.values == "class_index":
            classes = spec.class_dim()
            classes = classes if isinstance(classes, int) else sizes[classes]
            labels = rng.integers(0, classes, shape, dtype=np.int64)
            ignored = rng.random(shape) < ignore_fraction
            feed[tensor.name] = np.where(ignored, spec.loss["ignore_index"], labels)
        elif tensor.values == "hyperparameter":
            feed[tensor.name] = _hyperparameter(tensor.name, rng)
        elif tensor.values == "nonnegative":
            feed[tensor.name] = np.abs(rng.standard_normal(shape) * scale).astype(np.float32)
        elif tensor.values == "image":
            feed[tensor.name] = rng.random(shape, dtype=np.float32)
        elif tensor.values == "unit":
            values, pick = rng.random(shape, dtype=np.float32), rng.random(shape)
            exact = np.where(pick > 0.9, np.float32(1), values)
            feed[tensor.name] = np.where(pick < 0.1, np.float32(0), exact)
        elif tensor.values in ("probabilities", "log_probabilities"):
            scores = (rng.standard_normal(shape) * scale).astype(np.float32)
            normalise = softmax if tensor.values == "probabilities" else log_softmax
            feed[tensor.name] = normalise(scores).astype(np.float32)
        else:
            feed[tensor.name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return feed


_HYPERPARAMETERS = {h.name: h for rule in RULES.values() for h in rule.hyperparameters}


def _hyperparameter(name: str, rng: np.random.Generator) -> np.ndarray:
    record = _HYPERPARAMETERS[name]
    low, high = record.check_range
    if record.dtype == "bool":
        return np.array(rng.random() < 0.5)
    if record.dtype == "int64":
        return np.array(rng.integers(low, high + 1), np.int64)
    return np.array(rng.uniform(low, high))


@dataclass(frozen=True)
class InputSet:
    """One feed for every graph: a real batch (images and labels), or random inputs of
    `sizes` drawn from `seed`."""

    label: str
    images: np.ndarray | None = None  # float32 [B,C,H,W], model-ready
    labels: np.ndarray | None = None
    sizes: dict[str, int] | None = None
    seed: int = 0
    counts_for_accuracy: bool = True  # False for images already seen in the full pass
    first: int = 0  # the index of a pass's first image in the data

    def parts(self, size: int) -> list["InputSet"]:
        """A pass's real batch of more than `size` images as batches of `size`, labelled by
        their images; any other set as it is."""
        if not self.real or not self.counts_for_accuracy or len(self.images) <= size:
            return [self]
        return [
            pass_batch(self.images[i : i + size], self.labels[i : i + size], self.first + i)
            for i in range(0, len(self.images), size)
        ]

    @property
    def real(self) -> bool:
        return self.images is not None

    def feed(
        self,
        spec: GraphSpec,
        logits: np.ndarray | None,
        parameters: dict[str, np.ndarray] | None,
    ) -> dict[str, np.ndarray]:
        """`spec`'s feed: a real batch with `logits` (the reference's) for standalone losses,
        or random inputs."""
        if not self.real:
            return sample_feed(spec, self.sizes, self.seed, parameters=parameters)
        return graph_feed(spec, self.images, self.labels, logits, parameters)


def pass_batch(images: np.ndarray, labels: np.ndarray, first: int) -> InputSet:
    """A batch of a pass over the data from image `first` on, labelled by its images."""
    return InputSet(f"images {first}-{first + len(labels) - 1}", images, labels, first=first)


def real_input_sets(
    data: ImageSet, batch_size: int, contract: ImageContract, odd_batches: bool = False
) -> Iterator[InputSet]:
    """Every image of `data` in batches, preprocessed as `contract` says; with `odd_batches`
    then image 0 alone and images 1-7 as one batch (sizes a full pass may never see)."""
    start = 0
    for images, labels in iter_batches(data, batch_size, contract):
        yield pass_batch(images, labels, start)
        start += len(labels)
    if odd_batches and start:
        first = next(iter_batches(data.head(8), 8, contract))
        yield InputSet("image 0 alone", first[0][:1], first[1][:1], counts_for_accuracy=False)
        odd = InputSet(
            f"images 1-{len(first[1]) - 1} as one batch",
            first[0][1:],
            first[1][1:],
            counts_for_accuracy=False,
        )
        if len(odd.labels):
            yield odd


def random_input_sets(seed: int) -> Iterator[InputSet]:
    """Random feeds of each size of RANDOM_SIZES, seeds `seed`, `seed` + 1, ..."""
    for index, sizes in enumerate(RANDOM_SIZES):
        yield InputSet(f"random N={sizes['N']} seed {seed + index}", sizes=sizes, seed=seed + index)


def reference_logits(reference: Runner, model: GraphSpec) -> Callable[[InputSet], np.ndarray]:
    """What standalone loss graphs score in a comparison with `reference` (compare_runners's
    `loss_inputs`): the reference model's logits (graph `model`'s) of each real batch, so that
    a loss graph is measured alone, on the logits a model gives. Wrap `reference` in RunOnce
    to share that run with the model graph's comparison."""
    images, logits = model.named(Role.IMAGES), model.named(Role.LOGITS)
    return lambda inputs: reference.run(model, {images: inputs.images})[logits]
