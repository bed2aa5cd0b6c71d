import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from lossx.errors import DataError
from lossx.runtime import evaluate, feeds
from lossx.runtime.cifar10 import CONTRACT
from tests.conftest import eager_model


@pytest.fixture(scope="module")
def eager_figures(trained_artifact, test_split):
    """Accuracy and losses computed by eager torch over the 1,000 real test images."""
    model = eager_model(trained_artifact)
    with torch.no_grad():
        logits = model(torch.from_numpy(CONTRACT.to_model_input(test_split.images))).double()
    labels = torch.from_numpy(test_split.labels)
    probabilities = logits.softmax(dim=1)
    one_hot = nn.functional.one_hot(labels, 10).double()
    return {
        "predicted": logits.argmax(dim=1).numpy(),
        "accuracy": (logits.argmax(dim=1) == labels).double().mean().item(),
        "ce": nn.functional.cross_entropy(logits, labels).item(),
        "mse": nn.functional.mse_loss(probabilities, one_hot).item(),
        "l1": nn.functional.l1_loss(probabilities, one_hot).item(),
    }


@pytest.mark.parametrize("batch_size", [1, 7, 64, 256])
def test_eval_figures_match_eager_torch(trained_artifact, test_split, eager_figures, batch_size):
    result = evaluate(trained_artifact, test_split, batch_size=batch_size)
    assert result.images == 1000
    assert result.top1_accuracy == eager_figures["accuracy"]
    assert result.top1_accuracy > 0.2  # a briefly trained model, well above chance (0.1)
    for name in ("ce", "mse", "l1"):  # float32 graphs against a float64 reference
        assert result.losses[name] == pytest.approx(eager_figures[name], rel=2e-6)
    assert result.providers == ["cpu"]
    assert result.images_per_second > 0


def test_eval_result_as_json(artifact, test_split):
    data = json.loads(json.dumps(evaluate(artifact, test_split.head(10)).to_dict()))
    assert data["images"] == 10
    assert set(data["losses"]) == set(data["loss_definitions"]) == {"ce", "mse", "l1"}
    assert "softmax probabilities against one-hot" in data["loss_definitions"]["mse"]


def test_eval_of_no_images_is_refused(artifact, test_split):
    with pytest.raises(DataError, match=r"no images to evaluate"):
        evaluate(artifact, test_split.head(0))


def test_batch_size_zero_is_refused(artifact, test_split):
    with pytest.raises(DataError, match=r"batch size must be an integer of at least 1, got 0"):
        evaluate(artifact, test_split, batch_size=0)


def test_progress_counts_every_image(artifact, test_split):
    seen = []
    evaluate(artifact, test_split.head(100), batch_size=30, progress=seen.append)
    assert seen == [30, 30, 30, 10]


def test_a_batch_that_cannot_fit_in_memory_is_refused_early(artifact, test_split, monkeypatch):
    monkeypatch.setattr(feeds, "available_memory", lambda: 1_000_000_000)
    with pytest.raises(DataError, match=r"batch size 10,000 needs about 2.2 GB of memory; 1.0 GB"):
        evaluate(artifact, test_split, batch_size=10_000)
    evaluate(artifact, test_split.head(10), batch_size=4_000)  # 0.9 GB fits


def test_per_class_accuracy_and_confusion_count_what_eager_torch_predicts(
    trained_artifact, test_split, eager_figures
):
    result = evaluate(trained_artifact, test_split, batch_size=64)
    predicted, labels = eager_figures["predicted"], test_split.labels
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (labels, predicted), 1)
    assert result.confusion == expected.tolist()
    assert result.class_names == list(trained_artifact.manifest.class_names)
    data = json.loads(json.dumps(result.to_dict()))
    for index, name in enumerate(result.class_names):
        mine = labels == index
        assert data["per_class_accuracy"][name] == pytest.approx((predicted[mine] == index).mean())
    assert sum(map(sum, data["confusion"])) == 1000
    text = result.to_text()
    assert "most often taken for" in text and "airplane" in text.split("most often taken for")[1]


def test_a_class_without_images_has_no_accuracy(artifact, test_split):
    cats = test_split.labels == 3
    only_cats = replace(test_split, images=test_split.images[cats], labels=test_split.labels[cats])
    result = evaluate(artifact, only_cats)
    shares = {name: share for name, _, share in result.per_class}
    assert shares["cat"] is not None and shares["dog"] is None
    assert result.to_dict()["per_class_accuracy"]["dog"] is None
    dog_row = next(line for line in result.per_class_text().splitlines() if line.startswith("dog"))
    assert dog_row.split()[1:] == ["0", "-", "-"]
