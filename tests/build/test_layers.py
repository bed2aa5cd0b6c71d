"""Every layer docs/training.md says training graphs cover, proven: each case of
tests/build/layer_cases.py exports a training graph (its own self-check against eager PyTorch
on real and random inputs) and matches torch.autograd in train mode on real images, and the
docs list is exactly those cases."""

import re

import pytest
import torch

from lossx.runtime.cifar10 import CONTRACT
from tests.build.layer_cases import LAYERS
from tests.build.test_backward import _export_step, assert_matches_autograd
from tests.conftest import REPO

TRAINING_DOC = REPO / "docs" / "training.md"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_the_layer_trains_as_autograd_does(layer, tmp_path, test_split):
    torch.manual_seed(0)
    model = LAYERS[layer]()
    spec, run = _export_step(model, "ce", tmp_path, input_grad=True)
    parameters = {k: v.numpy() for k, v in model.state_dict().items()}
    for batch in (1, 7):
        images = CONTRACT.to_model_input(test_split.images[:batch])
        assert_matches_autograd(spec, run, model, images, test_split.labels[:batch], parameters)


def documented_layers() -> list[str]:
    """The list between `<!-- layers -->` and `<!-- /layers -->` in docs/training.md."""
    text = TRAINING_DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\n(.*?)<!-- /layers -->", text, flags=re.S)
    assert block, "docs/training.md has no <!-- layers --> list"
    items = re.split(r"^- ", block.group(1), flags=re.M)[1:]
    return [" ".join(item.split()) for item in items]


def test_the_docs_list_exactly_the_layers_proven_here():
    expected = "\n".join(f"- {name}" for name in LAYERS)
    assert documented_layers() == list(LAYERS), f"docs/training.md's list should be:\n{expected}"
