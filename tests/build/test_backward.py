"""Training graphs: loss and every gradient in standard ONNX, checked against torch.autograd."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lossx.build import export_artifact
from lossx.build.backward import (
    ReferenceTrainingStep,
    _loss_and_gradient,
    _pool_backward,
    check_trainable,
)
from lossx.build.eager import EagerRunner
from lossx.compare.elementwise import element_errors
from lossx.compare.tolerances import PROFILES, resolve_tolerances, rule_tolerance
from lossx.errors import DataError, SpecError
from lossx.parity.check import check_artifact
from lossx.runtime import load_artifact, to_model_input
from lossx.runtime.feeds import graph_feed
from lossx.runtime.loss_specs import parse_loss_spec
from tests.cli.test_cli import run_cli

LOSSES = [
    "ce(label_smoothing=0.1, weight=[1, 2, 1, 1, 0.5, 1, 1, 3, 1, 1], ignore_index=3)",
    "mse",
    "l1(reduction=sum)",
]


@pytest.fixture(scope="module")
def train_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "artifact"
    export_artifact(out, losses=LOSSES, train=True, input_grad=True)  # the shipped weights
    return load_artifact(out)


@pytest.mark.parametrize(
    "text",
    [
        "ce", "ce(reduction=sum)", "ce(label_smoothing=0.2)",
        "ce(weight=[1, 2, 3, 1, 1, 1, 1, 1, 1, 5])",
        "ce(ignore_index=2, label_smoothing=0.3, weight=[1, 2, 3, 1, 1, 1, 1, 1, 1, 5])",
        "ce(target=probs)", "ce(target=probs, label_smoothing=0.1, reduction=sum)",
        "ce(target=probs, weight=[1, 2, 3, 1, 1, 1, 1, 1, 1, 5])",
        "mse", "mse(reduction=sum)", "l1", "l1(reduction=sum)",
    ],
)  # fmt: skip
def test_loss_gradients_are_autograd_s(text):
    spec = parse_loss_spec(text)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 10, generator=generator) * 3
    if spec.target == "class_index":
        target = torch.randint(0, 10, (9,), generator=generator)
    else:
        target = torch.softmax(torch.randn(9, 10, generator=generator), 1)
    value, grad = _loss_and_gradient(spec, logits, target)
    leaf = logits.clone().requires_grad_()
    from lossx.build.losses import reference_loss

    expected = reference_loss(spec)(leaf, target)
    (expected_grad,) = torch.autograd.grad(expected, leaf)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_all_ignored_labels_give_nan_loss_and_zero_gradients_like_torch():
    spec = parse_loss_spec("ce(ignore_index=4)")
    value, grad = _loss_and_gradient(spec, torch.randn(3, 10), torch.full((3,), 4))
    assert torch.isnan(value) and (grad == 0).all()


def test_training_graphs_are_in_the_artifact(train_artifact):
    spec = train_artifact.graph("train_ce").spec
    names = [n for n, _ in EagerRunner.of_artifact(train_artifact).model.named_parameters()]
    assert spec.input_names == ["images", "labels", *names]
    assert spec.output_names == ["loss", "logits", *(f"grad.{n}" for n in names), "grad.images"]
    assert train_artifact.graph("train_mse").spec.input_names[1] == "targets"


@pytest.mark.parametrize("batch_size", [1, 7, 64, 256])
def test_gradients_match_autograd_on_real_images(train_artifact, test_split, batch_size):
    """Every gradient against torch.autograd on real CIFAR-10 images, at batch sizes the graph
    was not exported with: loss and logits within the fp32 default (1e-5), gradients under
    the gradient rule (GRADIENT_TOLERANCE: 2e-3 + 1e-3 relative; see its note), as lossx check
    compares them."""
    eager = EagerRunner.of_artifact(train_artifact)
    parameters = train_artifact.parameters()
    images = to_model_input(test_split.images[:batch_size])
    labels = test_split.labels[:batch_size]
    for loss in train_artifact.manifest.losses:
        spec = train_artifact.graph(f"train_{loss.name}").spec
        feed = graph_feed(spec, images, labels, None, parameters)
        got = dict(
            zip(spec.output_names, train_artifact.run(spec.stem, feed).values(), strict=True)
        )
        want = eager.run(spec, feed)
        for name in spec.output_names:
            tolerance = rule_tolerance(spec.output(name).tolerance_rule, PROFILES["fp32-cpu"])
            atol = tolerance.atol_for(want[name].astype(np.float64))
            errors = element_errors(got[name], want[name], atol, tolerance.rtol)
            outside = int(errors.failed.sum())
            assert outside <= tolerance.max_mismatch_fraction * errors.failed.size, (
                f"{spec.stem} {name}: {outside} of {errors.failed.size} elements outside, max "
                f"abs error {errors.error.max():.3g}"
            )


def test_pool_backward_gives_ties_to_the_first_maximum_like_autograd():
    x = torch.randint(0, 3, (4, 5, 8, 8), generator=torch.Generator().manual_seed(0)).float()
    dy = torch.randn(4, 5, 4, 4)
    leaf = x.clone().requires_grad_()
    torch.nn.functional.max_pool2d(leaf, 2).backward(dy)
    assert torch.equal(_pool_backward(dy, x, torch.nn.functional.max_pool2d(x, 2)), leaf.grad)


def test_gradients_match_autograd_on_flat_images(train_artifact):
    """Flat image regions give exactly equal convolution outputs, so max-pooling windows tie
    exactly: ONNX Runtime must route the gradient to the first maximum, as torch does."""
    images = np.zeros((4, 3, 32, 32), np.float32)
    images[1] = 1.0
    images[2, :, :16] = 0.5
    images[3, 0] = np.linspace(0, 1, 32, dtype=np.float32)[None, :]
    labels = np.array([0, 1, 2, 3])
    spec = train_artifact.graph("train_mse").spec
    feed = graph_feed(spec, images, labels, None, train_artifact.parameters())
    got = train_artifact.run(spec.stem, feed)
    want = EagerRunner.of_artifact(train_artifact).run(spec, feed)
    for name in spec.output_names:
        tolerance = rule_tolerance(spec.output(name).tolerance_rule, PROFILES["fp32-cpu"])
        atol = tolerance.atol_for(want[name].astype(np.float64))
        errors = element_errors(got[name], want[name], atol, tolerance.rtol)
        assert not errors.failed.any(), f"{name}: max abs error {errors.error.max():.3g}"


def test_lossx_check_gates_training_graphs(train_artifact, test_split):
    report = check_artifact(
        train_artifact, test_split.head(300), resolve_tolerances("fp32-cpu"), "fp32-cpu"
    )
    train_outputs = [o for o in report.outputs if o.graph.startswith("train_")]
    assert len(train_outputs) == 3 * 13
    assert report.passed, [o.name for o in report.failures]


def test_wrong_parameters_are_refused(train_artifact, test_split):
    spec = train_artifact.graph("train_ce").spec
    feed = graph_feed(spec, to_model_input(test_split.images[:2]), test_split.labels[:2], None,
                      train_artifact.parameters())  # fmt: skip
    feed["model1.7.weight"] = feed["model1.7.weight"][:, :10]
    with pytest.raises(
        DataError, match=r"model1.7.weight: expected shape \[64, 1024\], got \[64, 10\]"
    ):
        train_artifact.run("train_ce", feed)
    feed["model1.7.weight"] = np.zeros((64, 1024), np.float64)
    with pytest.raises(
        DataError,
        match=r"model1.7.weight: expected a float32 array of shape \[64, 1024\], got a float64",
    ):
        train_artifact.run("train_ce", feed)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ("kl_div", "no ONNX backward for loss kl_div yet; training graphs support ce, mse, l1"),
        ("ce(reduction=none)", "has no scalar loss to differentiate"),
    ],
)
def test_losses_without_an_onnx_backward_are_refused(tmp_path, loss, message):
    with pytest.raises(SpecError, match=message):
        export_artifact(tmp_path / "a", losses=[loss], init="random", train=True)
    assert not (tmp_path / "a").exists()


def test_layers_without_an_onnx_backward_are_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(SpecError, match=r"no ONNX backward for 1 \(ReLU\) yet"):
        check_trainable(model, parse_loss_spec("ce"))
    with pytest.raises(SpecError, match=r"0 without a bias"):
        check_trainable(nn.Sequential(nn.Linear(3, 3, bias=False)), parse_loss_spec("ce"))
    assert ReferenceTrainingStep  # the reference the export self-check compares with


def test_cli_export_train(tmp_path):
    result = run_cli("export", tmp_path / "a", "--init", "random", "--loss", "ce", "--train")
    assert result.exit_code == 0, result.output
    graphs = [
        g["file"] for g in json.loads((tmp_path / "a" / "manifest.json").read_text())["graphs"]
    ]
    assert graphs[-1] == "train_ce.onnx"
    result = run_cli("export", tmp_path / "b", "--input-grad")
    assert result.exit_code == 2 and "it needs --train" in result.stderr
