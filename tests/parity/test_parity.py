"""ONNX Runtime against eager PyTorch for every graph, on 1,000 real CIFAR-10 test images.

Tolerances are the documented defaults (atol 1e-5, rtol 1e-5). Measured worst case with the
shipped weights: 34% of the tolerance on logits over these images, 48% over all 50,000 training
images (README, "Parity tolerances").
"""

import numpy as np
import pytest

from lossx.parity.compare import DEFAULT_ATOL, DEFAULT_RTOL
from lossx.parity.eager import artifact_parity
from lossx.runtime import load_artifact
from tests.conftest import copy_with_eager_weights_changed

EXPECTED_OUTPUTS = [
    ("model", "logits"),
    ("loss_ce", "loss"),
    ("loss_mse", "loss"),
    ("loss_l1", "loss"),
    ("model_ce", "logits"),
    ("model_ce", "loss"),
    ("model_mse", "logits"),
    ("model_mse", "loss"),
    ("model_l1", "logits"),
    ("model_l1", "loss"),
]


@pytest.mark.parametrize("weights", ["seeded", "trained", "shipped"])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 256])
def test_every_graph_matches_eager(request, test_split, weights, batch_size):
    fixture = {"seeded": "artifact", "trained": "trained_artifact", "shipped": "shipped_artifact"}
    chosen = request.getfixturevalue(fixture[weights])
    report = artifact_parity(chosen, test_split, DEFAULT_ATOL, DEFAULT_RTOL, batch_size)
    assert report.images == 1000
    assert [(c.graph, c.output) for c in report.comparisons] == EXPECTED_OUTPUTS
    for c in report.comparisons:
        assert c.passed, f"{c.graph}/{c.output}: max abs error {c.max_abs_error:.3g}"
        if c.output == "logits":
            assert c.elements == 10_000
            assert c.argmax_agreement == 1.0
        else:
            assert c.elements == -(-1000 // batch_size)  # one scalar loss per batch


def test_parity_detects_a_graph_that_differs_from_eager(trained_artifact, tmp_path, test_split):
    """Perturb one bias of the eager model by 1e-2: every graph holding the model must fail."""

    def perturb(weights):
        weights["model1.8.bias"][3] += np.float32(1e-2)

    copy = copy_with_eager_weights_changed(trained_artifact.path, tmp_path / "copy", perturb)
    report = artifact_parity(load_artifact(copy), test_split.head(64), DEFAULT_ATOL, DEFAULT_RTOL)
    holding_the_model = {(g, o) for g, o in EXPECTED_OUTPUTS if not g.startswith("loss_")}
    assert {(c.graph, c.output) for c in report.failures} == holding_the_model
    assert not report.passed
