"""Training graphs' Convs on ONNX Runtime's NCHWc kernels: the rewrite computes what the
standard graph computes, touches only what MLAS's NCHWc Conv takes, and is what the engine runs."""

import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lossx.build.eager import EagerRunner
from lossx.compare.runners import OnnxRuntimeRunner
from lossx.runtime import load_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.feeds import graph_feed
from lossx.runtime.nchwc import DOMAIN, block_size, with_nchwc_convs
from lossx.runtime.options import SessionOptions


def nchwc_convs(model: onnx.ModelProto) -> int:
    return sum(n.domain == DOMAIN and n.op_type == "Conv" for n in model.graph.node)


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        model.SerializeToString(), options, disabled_optimizers=["NchwcTransformer"]
    )
    return session.run(None, feed)


def conv_model(weight_shape, strides=(1, 1), bias=True, constant=False) -> onnx.ModelProto:
    """One Conv of a [2, C, 12, 12] input, its weights an input (or a constant)."""
    out_channels, in_channels = weight_shape[:2]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, in_channels, 12, 12])]
    initializers = []
    weights = np.random.default_rng(0).standard_normal(weight_shape).astype(np.float32)
    if constant:
        initializers.append(numpy_helper.from_array(weights, "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, weight_shape))
    conv_inputs = ["x", "w"]
    if bias:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [out_channels]))
        conv_inputs.append("b")
    pad = weight_shape[2] // 2
    node = helper.make_node("Conv", conv_inputs, ["y"], pads=[pad] * 4, strides=list(strides))
    graph = helper.make_graph(
        [node], "conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feed_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        value.name: rng.standard_normal(
            [d.dim_value for d in value.type.tensor_type.shape.dim]
        ).astype(np.float32)
        for value in model.graph.input
    }


def test_this_cpu_has_nchwc_kernels():
    """CI's x86-64 CPUs have AVX2 or AVX-512: 8 or 16 channels a block."""
    if platform.machine() in ("x86_64", "AMD64"):
        assert block_size() in (8, 16)
    assert block_size() >= 1


@pytest.mark.parametrize(
    "weight_shape, strides, bias",
    [
        ((32, 16, 5, 5), (1, 1), True),
        ((16, 32, 3, 3), (2, 2), False),
        ((64, 64, 1, 1), (1, 1), True),
    ],
)
def test_a_rewritten_conv_computes_the_standard_one(weight_shape, strides, bias):
    model = conv_model(weight_shape, strides, bias)
    rewritten = with_nchwc_convs(model, block=block_size())
    assert nchwc_convs(rewritten) == 1
    feed = feed_for(model)
    (want,), (got,) = run(model, feed), run(rewritten, feed)
    # measured: 9.5e-7 of the largest output (summation order only); the block is this CPU's:
    # MLAS's kernels for the other width compute garbage
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize(
    "model",
    [
        conv_model((32, 16, 3, 3), constant=True),  # ORT's own NchwcTransformer's case
        conv_model((25, 16, 3, 3)),  # output channels not a whole number of blocks
        conv_model((32, 3, 3, 3)),  # input channels not either
    ],
    ids=["constant-weights", "25-outputs", "3-inputs"],
)
def test_what_the_nchwc_conv_cannot_take_is_left_alone(model):
    assert with_nchwc_convs(model, block=16) is model


def test_without_nchwc_kernels_nothing_changes():
    model = conv_model((32, 16, 3, 3))
    assert with_nchwc_convs(model, block=1) is model


def test_the_training_engine_runs_the_rewritten_graph(
    resnet20_train_artifact_dir, test_split, tmp_path
):
    """resnet20's training graph: 3x3 convolutions, stride 2, 16 to 64 channels, batch norm.
    34 Convs go to NCHWc: 18 forward ones (not the first: 3 input channels fill no block) and 16
    input gradients (the two stride-2 ones are ConvTransposes). Its outputs are as near float64
    as torch's, judged as lossx check judges them: along the graph's own ReLU decisions, where
    a near-tie sends a gradient down another path (on the packaged sample's first 32 images,
    grad.conv.weight landed 5.4e-4 or 6.4e-5 of its largest value from float64 unrouted, as
    the batch norms' sums were summed one way or another; torch's fp32 6.4e-5)."""
    artifact = load_artifact(resnet20_train_artifact_dir)
    spec = artifact.graph("train_ce").spec
    path = artifact.path / spec.file
    rewritten = with_nchwc_convs(onnx.load(path))
    assert nchwc_convs(rewritten) == 18 + 16
    images = CONTRACT.to_model_input(test_split.images[:32])
    feed = graph_feed(spec, images, test_split.labels[:32], None, artifact.state_dict())
    engine = artifact.session(spec.stem, SessionOptions(threads=2)).run(None, feed)
    for name, got, fast in zip(spec.output_names, engine, run(rewritten, feed), strict=True):
        np.testing.assert_array_equal(got, fast, err_msg=name)  # the engine's session is it
    onnx.save(rewritten, tmp_path / spec.file)
    exposed, routes = OnnxRuntimeRunner.of_file(tmp_path / spec.file).run_exposing_routes(
        spec, feed
    )
    runner = EagerRunner.of_artifact(artifact)
    routed, torch_fp32 = runner.run_float64_routed(spec, feed, routes), runner.run(spec, feed)
    exact = runner.run_float64(spec, feed)
    for name in spec.output_names:
        scale = max(float(np.abs(exact[name]).max()), 1e-12)
        error = float(np.abs(exposed[name] - routed[name]).max()) / scale
        torch_error = float(np.abs(torch_fp32[name] - exact[name]).max()) / scale
        assert error <= max(torch_error, 1e-5), (name, error, torch_error)
