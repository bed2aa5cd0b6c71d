"""lossx.training.FineTuning: what an app fine-tunes with, torch-free. It takes the onnxruntime
engine's steps, resumes where it stopped, and writes an artifact every runtime loads."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lossx.build.export import export_artifact
from lossx.errors import ArtifactError, DataError
from lossx.runtime import load_artifact, load_cifar10, open_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.training import FineTuning
from lossx.training.ort_engine import OnnxRuntimeEngine
from lossx.training.recipe import TrainConfig
from tests.conftest import require_shared
from tests.runtime.test_torch_free import BLOCK_TORCH


@pytest.fixture(scope="module")
def head_artifact(tmp_path_factory):
    """The shipped seed CNN, its training graphs training the last layer only."""
    out = tmp_path_factory.mktemp("api") / "a"
    export_artifact(out, losses=["ce"], train=True, trainable=("model1.8.*",))
    return out


@pytest.fixture(scope="module")
def images(cifar_dir):
    require_shared(cifar_dir)
    return load_cifar10(cifar_dir, "train", limit=256)


def _batches(images):
    return [(images.images[i : i + 64], images.labels[i : i + 64]) for i in range(0, 256, 64)]


def test_steps_are_the_onnxruntime_engines(head_artifact, images, tmp_path):
    run = FineTuning(head_artifact, optimizer="adamw", lr=1e-3)
    config = TrainConfig(optimizer="adamw", lr=1e-3)
    engine = OnnxRuntimeEngine(load_artifact(head_artifact), config, tmp_path / "e.npz",
                               run.options)  # fmt: skip
    for pixels, labels in _batches(images):
        loss = run.step(pixels, labels)
        assert loss == engine.step(CONTRACT.to_model_input(pixels), labels, 1e-3, 0.9)
    assert run.steps == 4
    start = load_artifact(head_artifact).state_dict()
    for name, value in run.state_dict().items():
        np.testing.assert_array_equal(value, engine.state_dict()[name])
        assert np.array_equal(value, start[name]) != name.startswith("model1.8."), name


def test_a_saved_run_resumes_where_it_stopped(head_artifact, images, tmp_path):
    straight = FineTuning(head_artifact, optimizer="adamw", lr=1e-3)
    for pixels, labels in _batches(images):
        straight.step(pixels, labels)
    first = FineTuning(head_artifact, optimizer="adamw", lr=1e-3)
    for pixels, labels in _batches(images)[:2]:
        first.step(pixels, labels)
    first.save(tmp_path / "run.npz")
    resumed = FineTuning.resume(head_artifact, tmp_path / "run.npz")
    assert resumed.steps == 2
    for pixels, labels in _batches(images)[2:]:
        resumed.step(pixels, labels)
    for name, value in straight.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value)


def test_the_exported_artifact_holds_the_new_weights(head_artifact, images, tmp_path):
    run = FineTuning(head_artifact, lr=0.05)
    for pixels, labels in _batches(images):
        run.step(pixels, labels)
    manifest = run.export(tmp_path / "tuned")
    assert manifest.weights["source"] == "fine_tuned"
    assert manifest.weights["trained"]["steps"] == 4
    assert manifest.weights["trained"]["trainable"] == ["model1.8.weight", "model1.8.bias"]
    tuned = load_artifact(tmp_path / "tuned")
    for name, value in run.state_dict().items():
        np.testing.assert_array_equal(tuned.state_dict()[name], value)
    # the model graph itself holds them: logits as the run's weights give them
    pixels = images.images[:32]
    got = open_artifact(tmp_path / "tuned").predict(pixels).logits
    want = (
        load_artifact(head_artifact)
        .with_weights(run.state_dict())
        .run("model", {"images": CONTRACT.to_model_input(pixels)})["logits"]
    )
    np.testing.assert_array_equal(got, want)
    before = open_artifact(head_artifact).predict(pixels).logits
    assert not np.allclose(got, before)
    assert FineTuning(tmp_path / "tuned").steps == 0  # it fine-tunes further


def test_bad_batches_and_destinations_are_refused(head_artifact, images, tmp_path):
    run = FineTuning(head_artifact)
    pixels, labels = images.images[:8], images.labels[:8]
    with pytest.raises(DataError, match=r"class indices must be 0\.\.9"):
        run.step(pixels, labels + 10)
    with pytest.raises(DataError, match=r"expected 8 class indices, got int64 \(7,\)"):
        run.step(pixels, labels[:7])
    with pytest.raises(DataError, match="uint8 images must be"):
        run.step(pixels[:, :16], labels)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="is not a lossx artifact; refusing to overwrite"):
        run.export(tmp_path / "mine")
    with pytest.raises(ArtifactError, match="is the artifact being read"):
        run.export(head_artifact)
    assert run.steps == 0


FINE_TUNE = """
import json, sys
import numpy as np
from lossx.training import FineTuning
run = FineTuning(sys.argv[1], optimizer="adamw")
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
loss = run.step(images, rng.integers(0, 10, 16))
run.export(sys.argv[2])
print(json.dumps({"loss": loss, "torch": "torch" in sys.modules}))
"""


def test_fine_tuning_runs_without_torch(head_artifact, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + FINE_TUNE, str(head_artifact), str(tmp_path / "t")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert np.isfinite(report["loss"]) and not report["torch"]
    assert (tmp_path / "t" / "manifest.json").is_file()
