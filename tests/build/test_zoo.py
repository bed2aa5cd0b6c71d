"""The registry's models beyond the seed CNN: built by name, the size they are meant to be, and
exported and checked like any other."""

import pytest
from torch import nn

from lossx.build.models import MODELS, build_model
from tests.cli.test_cli import run_cli


@pytest.mark.parametrize(
    ("name", "parameters", "layers"),
    [
        ("tudui", 145_578, (nn.Conv2d, nn.MaxPool2d, nn.Linear)),
        ("resnet20", 269_722, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)),
        ("dsnet", 136_778, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.AvgPool2d, nn.Dropout)),
    ],
)
def test_zoo_models_are_what_they_say(name, parameters, layers):
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == parameters
    kinds = {type(m) for m in model.modules()}
    assert all(layer in kinds for layer in layers)
    if name == "dsnet":
        assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
                   for m in model.modules())  # fmt: skip
    assert set(MODELS) >= {"tudui", "resnet20", "dsnet"}


@pytest.mark.parametrize("name", ["resnet20", "dsnet"])
def test_zoo_models_export_and_pass_check(name, tmp_path):
    out = tmp_path / name
    result = run_cli("export", out, "--model", name, "--init", "random", "--seed", "1",
                     "--loss", "ce")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("check", out, "--limit", "64")
    assert result.exit_code == 0, result.output
    assert f"model {name} with the artifact's weights.npz" in result.stdout
    if name == "dsnet":  # resnet20's training graphs: tests/build/test_backward.py
        refused = run_cli("export", tmp_path / "t", "--model", name, "--init", "random", "--train")
        assert refused.exit_code == 2 and "classifier.1 (Dropout" in refused.stderr
