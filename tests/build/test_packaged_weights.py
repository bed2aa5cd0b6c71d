"""The trained weights lossx ships: how they were made, and what they reach through ONNX."""

import torch

from lossx.build.models import packaged_weights
from lossx.runtime import evaluate

STATED_ACCURACY = 0.78  # docs/training.md: the target, on official test images 0-999


def test_shipped_weights_reach_the_stated_accuracy_through_onnx(shipped_artifact, test_split):
    assert shipped_artifact.manifest.weights["source"] == "packaged"
    result = evaluate(shipped_artifact, test_split)
    assert result.images == 1000
    assert result.top1_accuracy >= STATED_ACCURACY


def test_shipped_checkpoint_records_a_reproducible_recipe():
    payload = torch.load(packaged_weights("tudui"), weights_only=True)
    config = payload["config"]
    assert config["model"] == "tudui" and config["seed"] == 0
    assert config["holdout"] == 0 and config["limit"] is None  # all 50,000 training images
    assert [e["epoch"] for e in payload["history"]] == list(range(1, config["epochs"] + 1))
    assert sum(e["seconds"] for e in payload["history"]) < 3600  # within an hour of training
