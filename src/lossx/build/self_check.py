"""The export self-check: each written graph run in ONNX Runtime and compared with eager PyTorch
by the comparator (lossx.compare), on real images and random inputs of several sizes."""

from itertools import chain
from pathlib import Path

from torch import nn

from lossx.build.eager import EagerRunner
from lossx.build.models import (
    weights_to_arrays,
)
from lossx.compare.comparator import compare_runners
from lossx.compare.inputs import random_input_sets, real_input_sets
from lossx.compare.runners import OnnxRuntimeRunner
from lossx.compare.tolerances import DEFAULT_PROFILE, resolve_tolerances
from lossx.runtime.cifar10 import Cifar10Split, load_packaged_sample
from lossx.runtime.graphs import (
    GraphSpec,
)

SELF_CHECK_IMAGES = 64  # real images every graph that runs the model is first checked on


def verify_graph(
    spec: GraphSpec,
    model: nn.Module | None,
    path: Path,
    profile: str = DEFAULT_PROFILE,
    images: Cifar10Split | None = None,
) -> None:
    """Run graph file `path` in ONNX Runtime on fresh random inputs of several sizes (after
    real images: `images`, else for a graph that runs the model the first SELF_CHECK_IMAGES
    packaged test images) and compare it with eager `model` (a training graph gets the model's
    weights as its parameters) under tolerance `profile` (its precision's).

    Raises ParityError naming the graph, the worst output and the inputs it failed on, or
    ModelError where eager PyTorch itself computes NaN or Inf where numbers belong.
    """
    parameters = None
    if spec.parameter_names or spec.buffer_names:
        parameters = weights_to_arrays(model)
    if images is None and spec.runs_model:
        images = load_packaged_sample().head(SELF_CHECK_IMAGES)
    report = compare_runners(
        OnnxRuntimeRunner.of_file(path),
        EagerRunner(model),
        [spec],
        chain(real_input_sets(images, 256) if images else (), random_input_sets(seed=1)),
        resolve_tolerances(profile),
        profile=profile,
        parameters=parameters,
    )
    report.raise_if_failed(f"export self-check failed: {spec.file}: ")
