"""Graph specs as data: what each kind of graph takes and gives, asked of the spec."""

import json

import pytest

from lossx.errors import ArtifactError
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.graphs import (
    GraphKind,
    Role,
    TensorSpec,
    ToleranceRule,
    artifact_graphs,
    fused_graph,
    loss_graph,
    model_graph,
    train_graph,
)
from lossx.runtime.loss_specs import parse_loss_spec
from lossx.runtime.manifest import load_manifest

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)

PARAMETERS = [("conv.weight", (4, 3, 3, 3)), ("conv.bias", (4,)), ("fc.weight", (10, 1024))]


def test_a_training_graph_names_its_parameters_and_their_gradients():
    spec = train_graph(parse_loss_spec("ce"), MODEL, PARAMETERS)
    assert spec.kind is GraphKind.TRAIN
    assert spec.parameter_names == ("conv.weight", "conv.bias", "fc.weight")
    assert spec.buffer_names == ()
    assert spec.gradients == {name: f"grad.{name}" for name, _ in PARAMETERS}
    assert not spec.input_grad
    assert spec.output("grad.conv.bias").shape == (4,)


def test_the_image_gradient_is_an_output_only_when_asked():
    spec = train_graph(parse_loss_spec("mse"), MODEL, PARAMETERS, input_grad=True)
    assert spec.input_grad
    assert spec.gradients["images"] == "grad.images"
    assert spec.output("grad.images").gradient_of == "images"


def test_each_output_follows_the_tolerance_rule_of_its_role():
    loss = parse_loss_spec("ce")
    train = train_graph(loss, MODEL, PARAMETERS)
    assert train.output("logits").tolerance_rule is ToleranceRule.TASK
    assert train.output("loss").tolerance_rule is ToleranceRule.ELEMENTWISE
    assert train.output("grad.fc.weight").tolerance_rule is ToleranceRule.GRADIENT
    assert loss_graph(loss).output("loss").tolerance_rule is ToleranceRule.ELEMENTWISE


@pytest.mark.parametrize(
    ("spec", "runs_model", "class_dim"),
    [
        (MODEL, True, 10),
        (loss_graph(parse_loss_spec("ce")), False, "C"),
        (loss_graph(parse_loss_spec("ce(weight=[1, 2, 3])")), False, 3),
        (fused_graph(parse_loss_spec("nll"), MODEL), True, 10),
        (train_graph(parse_loss_spec("l1"), MODEL, PARAMETERS), True, 10),
    ],
    ids=["model", "loss", "weighted-loss", "fused", "train"],
)
def test_kinds_answer_from_their_tensors(spec, runs_model, class_dim):
    assert spec.runs_model is runs_model
    trains = spec.kind is GraphKind.TRAIN
    assert spec.parameter_names == (tuple(n for n, _ in PARAMETERS) if trains else ())
    assert spec.class_dim() == class_dim


def test_only_model_and_fused_graphs_hold_the_weights_as_initializers():
    assert {kind: kind.weights_prefix for kind in GraphKind} == {
        GraphKind.MODEL: "",
        GraphKind.LOSS: None,
        GraphKind.FUSED: "model.",
        GraphKind.TRAIN: None,
        GraphKind.OPTIMIZER: None,
    }


def test_tensor_specs_round_trip_through_the_manifest_form():
    for spec in artifact_graphs([parse_loss_spec("ce")], MODEL, PARAMETERS, input_grad=True):
        for tensor in (*spec.inputs, *spec.outputs):
            assert TensorSpec.from_dict(json.loads(json.dumps(tensor.to_dict()))) == tensor
    assert MODEL.inputs[0].role is Role.IMAGES


@pytest.mark.parametrize(("key", "value"), [("role", "weights"), ("kind", "backward")])
def test_an_unknown_role_or_kind_in_a_manifest_is_refused(artifact_dir, tmp_path, key, value):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    if key == "kind":
        manifest["graphs"][0]["kind"] = value
    else:
        manifest["graphs"][0]["inputs"][0]["role"] = value
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"malformed.*{value}|malformed.* must be one of"):
        load_manifest(tmp_path)
