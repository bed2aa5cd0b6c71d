"""ONNX Runtime against eager PyTorch for every graph, on 1,000 real CIFAR-10 test images.

Tolerances are the fp32-cpu profile's (atol 2e-5, rtol 1e-5). Measured worst case with the
shipped weights, measured against atol 1e-5: 34% of the tolerance on logits over these images,
48% over all 50,000 training images (docs/parity.md).
"""

import numpy as np
import pytest
import torch

from lossx.build import export_artifact
from lossx.build.eager import EagerRunner
from lossx.compare.tolerances import resolve_tolerances
from lossx.parity.check import compare_with_eager
from lossx.runtime import evaluate, load_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.feeds import graph_feed
from tests.conftest import copy_with_eager_weights_changed


def artifact_parity(artifact, data, batch_size=256):
    return compare_with_eager(artifact, data, resolve_tolerances(), "fp32-cpu", batch_size)


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
    report = artifact_parity(chosen, test_split, batch_size)
    assert report.inputs[-1].endswith("-999")
    assert [(c.graph, c.output) for c in report.outputs] == EXPECTED_OUTPUTS
    for c in report.outputs:
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
    report = artifact_parity(load_artifact(copy), test_split.head(64))
    holding_the_model = {(g, o) for g, o in EXPECTED_OUTPUTS if not g.startswith("loss_")}
    assert {(c.graph, c.output) for c in report.failures} == holding_the_model
    assert not report.passed


EVERY_LOSS = {
    "options": [
        "ce(label_smoothing=0.1, weight=[1, 2, 1, 1, 0.5, 1, 1, 3, 1, 1])",
        "nll(ignore_index=3, reduction=sum)",
        "mse(reduction=none)",
        "l1(reduction=sum)",
        "smooth_l1(beta=0.5)",
        "huber(delta=0.3, reduction=none)",
        "bce_logits(pos_weight=[1, 2, 3, 1, 1, 1, 1, 1, 1, 5], "
        "weight=[1, 1, 1, 1, 1, 2, 2, 2, 2, 3])",
        "kl_div(reduction=batchmean)",
    ],
    "targets": ["ce(target=probs, label_smoothing=0.2)", "kl_div(log_target=true)"],
}


@pytest.fixture(scope="module", params=list(EVERY_LOSS))
def every_loss_artifact(request, tmp_path_factory):
    """The shipped weights with every loss and many options: real logits, real labels."""
    out = tmp_path_factory.mktemp("every-loss") / request.param
    export_artifact(out, losses=EVERY_LOSS[request.param])
    return load_artifact(out)


@pytest.mark.parametrize(("batch_size", "images"), [(1, 100), (7, 1000), (256, 1000)])
def test_every_loss_matches_eager_on_real_data(every_loss_artifact, test_split, batch_size, images):
    data = test_split.head(images)
    report = artifact_parity(every_loss_artifact, data, batch_size)
    assert len(report.outputs) == 1 + 3 * len(every_loss_artifact.manifest.losses)
    for c in report.outputs:
        assert c.passed, f"{c.graph}/{c.output}: {c.max_tolerance_used:.1f}x the tolerance"


def test_eval_losses_are_torch_on_the_same_inputs(every_loss_artifact, test_split):
    """lossx eval's figure for each loss: the torch.nn loss of the eval feed, aggregated as
    LossSpec.eval_description says (batch values weighted by batch size, sums summed, elements
    averaged)."""
    eager = EagerRunner.of_artifact(every_loss_artifact)
    with torch.no_grad():
        logits = eager.model(torch.from_numpy(CONTRACT.to_model_input(test_split.images))).numpy()
    result = evaluate(every_loss_artifact, test_split, batch_size=1000)
    for spec in every_loss_artifact.manifest.losses:
        graph = every_loss_artifact.manifest.loss_graph(spec.name)
        feed = graph_feed(graph, None, test_split.labels, logits, None)
        value = eager.run(graph, feed)["loss"]
        expected = value.mean() if spec["reduction"] == "none" else value
        assert result.losses[spec.name] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
        assert str(spec) in result.loss_definitions[spec.name]
