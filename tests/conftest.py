"""Shared fixtures: real CIFAR-10 data and exported artifacts, built once per session.

Tests read the real data in ../shared/data/cifar10 (beside the checkout). In a user's clone
without it they fall back to the packaged sample (official test images 0-999); CI must have it
(tests/runtime/test_cifar10.py::test_ci_reads_the_shared_dataset).
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lossx.build import build_model, export_artifact
from lossx.build.eager import EagerRunner
from lossx.compare.comparator import compare_arrays
from lossx.compare.inputs import sample_feed
from lossx.compare.report import OutputReport
from lossx.compare.tolerances import DEFAULT_PROFILE, PROFILES
from lossx.runtime import load_artifact, load_cifar10, load_packaged_sample
from lossx.runtime.artifact import sha256_of
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.weights import read_weights
from lossx.training.recipe import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


def shared_cifar10_dir() -> Path | None:
    if (SHARED_CIFAR10 / "cifar-10-batches-py" / "test_batch").is_file():
        return SHARED_CIFAR10
    return None


def require_shared(cifar_dir: Path | None) -> None:
    """For tests that need the full dataset: fail in CI, skip (saying why) in a user's clone."""
    if cifar_dir is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the real dataset in {SHARED_CIFAR10}")
        pytest.skip(f"needs the real dataset in {SHARED_CIFAR10}")


@pytest.fixture(scope="session")
def cifar_dir() -> Path | None:
    found = shared_cifar10_dir()
    if found is None and not os.environ.get("CI"):
        warnings.warn(f"{SHARED_CIFAR10} not found: tests use the packaged sample", stacklevel=1)
    return found


@pytest.fixture(scope="session")
def data_dir(cifar_dir) -> Path:
    """The real dataset's folder, for tests that need all of it (require_shared)."""
    require_shared(cifar_dir)
    return cifar_dir


@pytest.fixture(scope="session")
def test_split(cifar_dir):
    """The official CIFAR-10 test images 0-999 (1,000 real images)."""
    return load_cifar10(cifar_dir, "test") if cifar_dir else load_packaged_sample()


@pytest.fixture(scope="session")
def train_subset(cifar_dir):
    """10,000 real training images (the test sample where the training set is absent)."""
    return load_cifar10(cifar_dir, "train", limit=10_000) if cifar_dir else load_packaged_sample()


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory) -> Path:
    """An artifact of the seeded (untrained) model with all three losses."""
    out = tmp_path_factory.mktemp("artifacts") / "seeded"
    export_artifact(out, init="random")
    return out


@pytest.fixture(scope="session")
def artifact(artifact_dir):
    return load_artifact(artifact_dir)


@pytest.fixture(scope="session")
def seeded_train_artifact_dir(tmp_path_factory) -> Path:
    """Training graphs for ce and mse on seeded random weights, the ones `lossx train --engine
    torch --seed 0` starts from."""
    out = tmp_path_factory.mktemp("train-artifact") / "a"
    export_artifact(out, losses=["ce", "mse"], init="random", seed=0, train=True)
    return out


@pytest.fixture(scope="session")
def resnet20_train_artifact_dir(tmp_path_factory) -> Path:
    """resnet20's training graph for ce on seeded random weights, the ones `lossx train
    --engine torch --model resnet20 --seed 0` starts from."""
    out = tmp_path_factory.mktemp("resnet20-train") / "a"
    export_artifact(out, "resnet20", losses=["ce"], init="random", seed=0, train=True)
    return out


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, train_subset) -> Path:
    """A state_dict after one epoch of SGD on real training images: logits of realistic size."""
    torch.manual_seed(0)
    model = build_model().train()
    images = torch.from_numpy(CONTRACT.to_model_input(train_subset.images))
    labels = torch.from_numpy(train_subset.labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for start in range(0, len(labels), 64):
        batch = slice(start, start + 64)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("checkpoints") / "trained.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def trained_artifact(tmp_path_factory, trained_checkpoint):
    out = tmp_path_factory.mktemp("artifacts") / "trained"
    export_artifact(out, checkpoint=trained_checkpoint)
    return load_artifact(out)


@pytest.fixture(scope="session")
def shipped_artifact(tmp_path_factory):
    """An artifact of the trained weights lossx ships (export's default)."""
    out = tmp_path_factory.mktemp("artifacts") / "shipped"
    export_artifact(out)
    return load_artifact(out)


@pytest.fixture(scope="session")
def shipped_train_artifact_dir(tmp_path_factory) -> Path:
    """The shipped weights with a training graph for ce: what the JavaScript examples train."""
    out = tmp_path_factory.mktemp("shipped-train") / "a"
    export_artifact(out, losses=["ce"], train=True)
    return out


@pytest.fixture(scope="session")
def training_plan(tmp_path_factory, shipped_train_artifact_dir, cifar_dir):
    """16 steps of the default recipe on the first 1,024 real training images: the plan
    `lossx train --write-plan` writes, and the weights `lossx train --engine onnxruntime`
    reaches after its first 4 and all 16 steps (the JavaScript examples must reach them too);
    and 4 steps of AdamW ("adamw4", plan_adamw4.npz)."""
    from lossx.training.ort_engine import train as train_onnxruntime
    from lossx.training.plan import write_plan

    require_shared(cifar_dir)
    folder = tmp_path_factory.mktemp("plan")
    reached = {}
    for limit in (256, 1024):  # 4 and 16 steps of 64
        config = TrainConfig(epochs=1, batch_size=64, limit=limit)
        write_plan(folder / f"plan{limit // 64}.npz", cifar_dir, config)
        out = folder / f"python{limit // 64}.npz"
        train_onnxruntime(load_artifact(shipped_train_artifact_dir), cifar_dir, out, config)
        reached[limit // 64] = read_weights(out)
    config = TrainConfig(epochs=1, batch_size=64, limit=256, optimizer="adamw")
    write_plan(folder / "plan_adamw4.npz", cifar_dir, config)
    train_onnxruntime(
        load_artifact(shipped_train_artifact_dir), cifar_dir, folder / "a.npz", config
    )
    reached["adamw4"] = read_weights(folder / "a.npz")
    return {
        "folder": folder,
        "weights": reached,
        "start": read_weights(shipped_train_artifact_dir / "weights.npz"),
    }


@pytest.fixture(scope="session")
def int8_artifact(tmp_path_factory):
    """The shipped weights at int8, calibrated on the packaged training images (the default)."""
    out = tmp_path_factory.mktemp("artifacts") / "int8"
    export_artifact(out, precision="int8")
    return load_artifact(out)


@pytest.fixture(scope="session")
def fp16_artifact(tmp_path_factory):
    """The shipped weights at fp16."""
    out = tmp_path_factory.mktemp("artifacts") / "fp16"
    export_artifact(out, precision="fp16")
    return load_artifact(out)


def eager_model(artifact) -> nn.Module:
    """The artifact's model, rebuilt eagerly from its weights file."""
    return EagerRunner.of_artifact(artifact).model


def sample_tensors(spec, sizes: dict[str, int], seed: int, **options) -> list[torch.Tensor]:
    """`sample_feed`'s random inputs of `spec` as torch tensors, in input order."""
    return [torch.from_numpy(x) for x in sample_feed(spec, sizes, seed, **options).values()]


def compare_fp32(got, want) -> OutputReport:
    """`got` against `want` under the fp32-cpu profile (atol 2e-5, rtol 1e-5), elementwise."""
    return compare_arrays(got, want, PROFILES[DEFAULT_PROFILE])


def copy_with_eager_weights_changed(artifact_dir: Path, target: Path, change) -> Path:
    """Copy an artifact, let `change` edit its weights.npz arrays and re-hash it in the manifest.

    The ONNX graphs keep the old weights, so parity with the eager side must fail.
    """
    shutil.copytree(artifact_dir, target)
    with np.load(target / "weights.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    change(weights)
    np.savez(target / "weights.npz", **weights)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["weights.npz"]["sha256"] = sha256_of(target / "weights.npz")
    manifest["files"]["weights.npz"]["bytes"] = (target / "weights.npz").stat().st_size
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def rehash(folder: Path, name: str) -> None:
    """Write file `name`'s present sha256 and size into the artifact's manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = sha256_of(folder / name)
    manifest["files"][name]["bytes"] = (folder / name).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def copy_with_nan_logits(artifact_dir: Path, target: Path) -> Path:
    """Copy an artifact whose model.onnx multiplies its logits by NaN (re-hashed, so that only
    the values are wrong): what a broken model computes."""
    import onnx

    shutil.copytree(artifact_dir, target)
    proto = onnx.load(target / "model.onnx")
    graph = proto.graph
    for node in graph.node:
        node.output[:] = ["logits.raw" if name == "logits" else name for name in node.output]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
    graph.node.append(onnx.helper.make_node("Mul", ["logits.raw", "nan"], ["logits"]))
    onnx.save(proto, target / "model.onnx")
    rehash(target, "model.onnx")
    return target


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where onnxruntime really offers the CUDA provider."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return
    skip = pytest.mark.skip(reason="no CUDAExecutionProvider in this onnxruntime")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
