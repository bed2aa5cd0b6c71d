"""The float64 step routed as an engine's fp32 forward decided (lossx.build.routing): ONNX
Runtime's decisions line up with torch's op by op, and a decision taken the other way moves
the gradient exactly as that path says."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossx.build import export_artifact
from lossx.build.eager import EagerRunner
from lossx.compare.runners import OnnxRuntimeRunner
from lossx.runtime import load_artifact
from lossx.runtime.feeds import graph_feed
from lossx.runtime.graphs import Role


@pytest.fixture(scope="module")
def routing_step(tmp_path_factory, test_split):
    out = tmp_path_factory.mktemp("routing") / "art"
    export_artifact(out, "tests.build.zoo_models:RoutingNet", losses=["ce"], init="random",
                    train=True)  # fmt: skip
    artifact = load_artifact(out)
    spec = artifact.graph("train_ce").spec
    images = artifact.contract.to_model_input(test_split.images[:8])
    feed = graph_feed(spec, images, test_split.labels[:8], None, artifact.state_dict())
    return artifact, spec, feed


def test_onnx_runtime_exposes_each_deciding_op_in_the_order_torch_runs_them(routing_step):
    artifact, spec, feed = routing_step
    onnx = OnnxRuntimeRunner.of_artifact(artifact)
    got, routes = onnx.run_exposing_routes(spec, feed)
    plain = onnx.run(spec, feed)
    for name in spec.output_names:  # the session exposing them computes the same step
        np.testing.assert_allclose(got[name], plain[name], rtol=1e-5, atol=1e-6)
    assert [kind for kind, _ in routes] == ["relu", "max_pool", "clip", "clip"]
    assert [value.shape for _, value in routes] == [(8, 4, 32, 32)] * 2 + [(8, 6, 16, 16)] * 2
    runner = EagerRunner.of_artifact(artifact)
    routed, exact = runner.run_float64_routed(spec, feed, routes), runner.run_float64(spec, feed)
    for name in spec.output_names:  # fp32 decided as float64 did here: the very same step
        np.testing.assert_allclose(routed[name], exact[name], rtol=1e-12, atol=1e-15)
    assert runner.run_float64_routed(spec, feed, routes[:3]) is None  # one op short
    swapped = [routes[1], routes[0], *routes[2:]]
    assert runner.run_float64_routed(spec, feed, swapped) is None


def test_a_relu_decided_the_other_way_routes_its_gradient_down_that_path(routing_step):
    artifact, spec, feed = routing_step
    _, routes = OnnxRuntimeRunner.of_artifact(artifact).run_exposing_routes(spec, feed)
    relu_input = routes[0][1].copy()
    at = np.unravel_index(np.argmax(relu_input), relu_input.shape)  # a ReLU passing gradient
    relu_input[at] = -relu_input[at]  # this engine decided it does not
    runner = EagerRunner.of_artifact(artifact)
    routed = runner.run_float64_routed(spec, feed, [("relu", relu_input), *routes[1:]])

    class ReluDecidedAs(torch.autograd.Function):  # an independent statement of the same step
        @staticmethod
        def forward(ctx, x):
            return x.clamp_min(0)

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.from_numpy(relu_input > 0)

    model = runner.model.double().train()
    images = torch.from_numpy(feed[spec.named_tensor(Role.IMAGES).name].astype(np.float64))
    x = model.pool(ReluDecidedAs.apply(model.conv(images)))
    logits = model.head(model.clip(F.relu6(model.conv2(x))).mean((2, 3)))
    loss = F.cross_entropy(logits, torch.from_numpy(feed[spec.named_tensor(Role.TARGET).name]))
    want = torch.autograd.grad(loss, model.conv.weight)[0].numpy()
    got = routed["grad.conv.weight"]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    exact = runner.run_float64(spec, feed)["grad.conv.weight"]
    assert np.abs(got - exact).max() > 1e-6  # the path mattered
