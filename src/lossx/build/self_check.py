"""The export self-check: each written graph run in ONNX Runtime and compared with eager PyTorch
by the comparator (lossx.compare), on real images and random inputs of several sizes."""

from itertools import chain
from pathlib import Path

import numpy as np
from torch import nn

from lossx.build.eager import EagerRunner
from lossx.build.models import (
    weights_to_arrays,
)
from lossx.compare.comparator import compare_runners
from lossx.compare.inputs import random_input_sets, real_input_sets
from lossx.compare.runners import OnnxRuntimeRunner
from lossx.compare.tolerances import DEFAULT_PROFILE, resolve_tolerances
from lossx.runtime.cifar10 import load_packaged_sample
from lossx.runtime.contract import COLORS, ImageContract, contract_for
from lossx.runtime.graphs import GraphSpec
from lossx.runtime.image_set import ImageSet
from lossx.runtime.images import fit

SELF_CHECK_IMAGES = 64  # real images every graph that runs the model is first checked on


def self_check_images(contract: ImageContract, limit: int | None = SELF_CHECK_IMAGES) -> ImageSet:
    """The real images graphs that run the model are checked on: the first `limit` (all where
    None) packaged CIFAR-10 test images fitted to the contract (resized, converted to its colours),
    their labels taken modulo its class count; seeded random pixels for a channel count that
    image files do not have."""
    sample = load_packaged_sample().head(limit)
    if contract.channels in COLORS:
        images = fit(sample.images, contract)
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (len(sample), *contract.hwc), dtype=np.uint8)
    labels = sample.labels % contract.num_classes
    return ImageSet(images, labels, contract.class_names, f"{sample.source}, fitted")


def verify_graph(
    spec: GraphSpec,
    model: nn.Module | None,
    path: Path,
    contract: ImageContract | None = None,
    profile: str = DEFAULT_PROFILE,
    images: ImageSet | None = None,
) -> None:
    """Run graph file `path` in ONNX Runtime on fresh random inputs of several sizes (after
    real images for a graph that runs the model: `images`, else `self_check_images` of its
    `contract`) and compare it with eager `model` (a training graph gets the model's weights
    as its parameters) under tolerance `profile` (its precision's).

    Raises ParityError naming the graph, the worst output and the inputs it failed on, or
    ModelError where eager PyTorch itself computes NaN or Inf where numbers belong.
    """
    parameters = None
    if spec.state_names:
        parameters = weights_to_arrays(model)
    real = ()
    if spec.runs_model:
        if contract is None:  # a graph exported alone: its own shapes, no normalisation
            classes = spec.class_dim()
            contract = contract_for(spec.image_shape, tuple(map(str, range(classes))))
        real = real_input_sets(images or self_check_images(contract), 256, contract)
    report = compare_runners(
        OnnxRuntimeRunner.of_file(path),
        EagerRunner(model),
        [spec],
        chain(real, random_input_sets(seed=1)),
        resolve_tolerances(profile),
        profile=profile,
        parameters=parameters,
    )
    report.raise_if_failed(f"export self-check failed: {spec.file}: ")
