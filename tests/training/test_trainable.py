"""Training a subset of the parameters (--trainable / --frozen): the training graph trains only
those, batch norms whose parameters are all frozen keep their statistics, and both engines take
the same steps."""

import re
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from lossx.build.backward import eval_batch_norms, model_buffers
from lossx.build.export import export_artifact
from lossx.build.torch_engine import train as train_torch
from lossx.cli import main
from lossx.errors import SpecError
from lossx.runtime import load_artifact
from lossx.runtime.graphs import model_graph, train_graph
from lossx.runtime.loss_specs import parse_loss_spec
from lossx.runtime.options import SessionOptions
from lossx.training.ort_engine import train as train_onnxruntime
from lossx.training.recipe import DEFAULT_LR, TrainConfig, frozen_parameters

NAMES = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"]
HEAD = TrainConfig(model="resnet20", epochs=2, batch_size=64, limit=512, trainable=("fc.*",))


@pytest.mark.parametrize(
    ("trainable", "frozen", "expected"),
    [
        (None, None, set()),
        (("fc.*",), None, {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}),
        (("fc.weight", "bn.*"), None, {"conv.weight", "conv.bias", "fc.bias"}),
        (None, ("conv.*",), {"conv.weight", "conv.bias"}),
        (("*",), None, set()),
    ],
)
def test_globs_choose_the_frozen_parameters(trainable, frozen, expected):
    assert frozen_parameters(NAMES, trainable, frozen) == expected


@pytest.mark.parametrize(
    ("trainable", "frozen", "message"),
    [
        (("fc.*",), ("conv.*",), "give --trainable or --frozen, not both"),
        (("head.*",), None, "--trainable 'head.*' matches no parameter (they are conv.weight"),
        (None, ("*",), "--frozen * leaves no parameter to train"),
        (None, ("FC.*",), "matches no parameter"),  # state_dict names are case-sensitive
    ],
)
def test_choices_that_train_nothing_or_match_nothing_are_refused(trainable, frozen, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        frozen_parameters(NAMES, trainable, frozen)


def test_the_spec_says_which_batch_norms_run_in_eval_mode():
    """Eval mode is a batch norm none of whose buffers the step updates; one at momentum 0
    still counts the batch, so it keeps batch statistics."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.0), nn.BatchNorm2d(4))
    shape = (3, 8, 8)
    parameters = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for frozen_layers, expected in (([], []), (["2"], [model[2]])):
        buffers = model_buffers(model, shape, frozen_layers)
        spec = train_graph(parse_loss_spec("mse"), model_graph(shape, 4), parameters,
                           buffers=buffers)  # fmt: skip
        assert eval_batch_norms(model, spec) == expected


@pytest.fixture(scope="module")
def head_artifact(tmp_path_factory):
    """resnet20 from seeded weights, its training graph training the last layer only."""
    out = tmp_path_factory.mktemp("head") / "a"
    export_artifact(out, "resnet20", losses=["ce"], init="random", seed=0, train=True,
                    trainable=("fc.*",))  # fmt: skip
    return out


def _convs(path) -> int:
    return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def test_a_frozen_backbone_has_no_backward_through_it(head_artifact):
    """The step's Convs are the forward's: no weight or input gradient of a frozen layer."""
    spec = load_artifact(head_artifact).graph("train_ce").spec
    assert spec.parameter_names == ("fc.weight", "fc.bias")
    assert spec.output_names == ["loss", "logits", "grad.fc.weight", "grad.fc.bias"]
    assert spec.next_buffers == {}  # its batch norms run in eval mode
    assert _convs(head_artifact / "train_ce.onnx") == _convs(head_artifact / "model.onnx") == 19
    optimizer = load_artifact(head_artifact).graph("optimizer_adamw").spec
    assert optimizer.parameter_names == ("fc.weight", "fc.bias")


def _train_both(data_dir, artifact_dir, config, tmp_path):
    curves = {"torch": [], "onnxruntime": []}
    train_torch(data_dir, tmp_path / "t.pt", config, on_step=lambda _, v: curves["torch"].append(v))
    train_onnxruntime(load_artifact(artifact_dir), data_dir, tmp_path / "o.npz", config,
                      SessionOptions(threads=2),
                      on_step=lambda _, v: curves["onnxruntime"].append(v))  # fmt: skip
    checkpoint = torch.load(tmp_path / "t.pt", weights_only=True)
    expected = {k: v.numpy() for k, v in checkpoint["model"].items()}
    with np.load(tmp_path / "o.npz") as npz:
        got = {k: npz[k] for k in expected}
    return curves, got, expected


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_both_engines_train_the_head_alone_alike(data_dir, head_artifact, tmp_path, optimizer):
    """Measured over these 16 steps: step losses 9.5e-7 apart (SGD and AdamW), weights 1.4e-7
    of each tensor's largest; asserted at 1e-5 and 1e-5. The backbone's weights and batch-norm
    statistics do not move in either engine."""
    config = replace(HEAD, optimizer=optimizer, lr=DEFAULT_LR[optimizer])
    curves, got, expected = _train_both(data_dir, head_artifact, config, tmp_path)
    gaps = np.abs(np.array(curves["onnxruntime"]) - np.array(curves["torch"]))
    assert len(gaps) == 16 and gaps.max() < 1e-5, gaps
    start = load_artifact(head_artifact).state_dict()
    for name, want in expected.items():
        moved = not np.array_equal(want, start[name])
        assert moved == name.startswith("fc."), name
        assert np.array_equal(got[name], start[name]) == (not moved), name
        gap = np.abs(got[name] - want).max() / max(np.abs(want).max(), 1e-12)
        assert gap < 1e-5, name


def test_frozen_batch_norms_can_keep_batch_statistics(data_dir, tmp_path):
    """--frozen-bn train: the frozen layers' batch norms normalise by the batch and update
    their running statistics, in both engines. Measured: step losses 1.1e-5 apart over 16
    steps (the whole network's statistics evolve, as in full training)."""
    artifact = tmp_path / "a"
    export_artifact(artifact, "resnet20", losses=["ce"], init="random", seed=0, train=True,
                    trainable=("fc.*",), frozen_bn="train")  # fmt: skip
    spec = load_artifact(artifact).graph("train_ce").spec
    assert len(spec.next_buffers) == 3 * 19  # every batch norm's statistics
    config = replace(HEAD, frozen_bn="train", epochs=1, limit=256)
    curves, got, expected = _train_both(data_dir, artifact, config, tmp_path)
    gaps = np.abs(np.array(curves["onnxruntime"]) - np.array(curves["torch"]))
    assert gaps.max() < 1e-4, gaps
    start = load_artifact(artifact).state_dict()
    assert not np.array_equal(got["bn.running_mean"], start["bn.running_mean"])
    np.testing.assert_allclose(got["bn.running_mean"], expected["bn.running_mean"], atol=1e-5)
    assert np.array_equal(got["bn.weight"], start["bn.weight"])


def test_the_onnxruntime_engine_trains_what_its_graph_trains(data_dir, head_artifact, tmp_path):
    with pytest.raises(SpecError, match=re.escape("train_ce.onnx trains fc.weight, fc.bias, not")):
        train_onnxruntime(load_artifact(head_artifact), data_dir, tmp_path / "o.npz",
                          replace(HEAD, trainable=("blocks.8.*",)))  # fmt: skip
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainable", "fc.*"], "--trainable chooses what training graphs train; it needs"),
        (["--train", "--trainable", "fc.*"], "--trainable 'fc.*' matches no parameter"),
        (["--train", "--frozen", "*"], "--frozen * leaves no parameter to train"),
        (["--train", "--frozen", "model1.0.*", "--trainable", "model1.8.*"], "not both"),
    ],
)
def test_export_refuses_choices_in_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "a"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
