"""The trained weights lossx ships: how they were made, and what they reach through ONNX."""

import pytest
import torch

from lossx.build.export import export_artifact
from lossx.build.models import PACKAGED_WEIGHTS, packaged_weights
from lossx.errors import SpecError
from lossx.runtime import evaluate, load_artifact

# docs/training.md: the targets, on official test images 0-999
STATED_ACCURACY = {"tudui": 0.78, "resnet20": 0.90}


def test_every_shipped_model_has_a_stated_accuracy():
    assert PACKAGED_WEIGHTS.keys() == STATED_ACCURACY.keys()


def test_shipped_weights_reach_the_stated_accuracy_through_onnx(shipped_artifact, test_split):
    assert shipped_artifact.manifest.weights["source"] == "packaged"
    result = evaluate(shipped_artifact, test_split)
    assert result.images == 1000
    assert result.top1_accuracy >= STATED_ACCURACY["tudui"]


def test_shipped_resnet20_reaches_the_stated_accuracy_through_onnx(tmp_path, test_split):
    export_artifact(tmp_path / "resnet20", "resnet20", losses=["ce"])
    artifact = load_artifact(tmp_path / "resnet20")
    assert artifact.manifest.weights["source"] == "packaged"
    result = evaluate(artifact, test_split)
    assert result.images == 1000
    assert result.top1_accuracy >= STATED_ACCURACY["resnet20"]


@pytest.mark.parametrize("model", sorted(PACKAGED_WEIGHTS))
def test_shipped_checkpoint_records_a_reproducible_recipe(model):
    payload = torch.load(packaged_weights(model), weights_only=True)
    config = payload["config"]
    assert config["model"] == model and config["seed"] == 0
    assert config["holdout"] == 0 and config["limit"] is None  # all 50,000 training images
    assert [e["epoch"] for e in payload["history"]] == list(range(1, config["epochs"] + 1))
    hours = {"tudui": 1, "resnet20": 2}[model]  # docs/training.md: the training time
    assert sum(e["seconds"] for e in payload["history"]) < hours * 3600


def test_a_model_without_shipped_weights_is_refused_by_name():
    with pytest.raises(SpecError, match="no trained weights ship for model 'dsnet'"):
        packaged_weights("dsnet")
