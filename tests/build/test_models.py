import pickle

import pytest
import torch
from torch import nn

from lossx.build.models import MODELS, Tudui, build_model, load_checkpoint
from lossx.errors import CheckpointError, SpecError

TUTORIAL_KEYS = [
    f"model1.{index}.{kind}" for index in (0, 2, 4, 7, 8) for kind in ("weight", "bias")
]


def test_tudui_is_the_seed_network():
    layers = list(build_model("tudui").model1)
    assert [type(layer) for layer in layers] == [
        nn.Conv2d, nn.MaxPool2d, nn.Conv2d, nn.MaxPool2d, nn.Conv2d, nn.MaxPool2d,
        nn.Flatten, nn.Linear, nn.Linear,
    ]  # fmt: skip
    convs = [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in layers[0:5:2]]
    assert convs == [(3, 32, (5, 5), (2, 2)), (32, 32, (5, 5), (2, 2)), (32, 64, (5, 5), (2, 2))]
    assert [(lin.in_features, lin.out_features) for lin in layers[7:]] == [(1024, 64), (64, 10)]
    assert sum(p.numel() for p in build_model().parameters()) == 145_578


def test_state_dict_keys_match_the_tutorial_network():
    assert list(build_model().state_dict()) == TUTORIAL_KEYS


def test_tudui_is_the_default_registered_model():
    assert MODELS["tudui"] is Tudui


def test_unknown_model_is_refused_with_the_known_names():
    with pytest.raises(SpecError, match=r"unknown model 'resnet'.*tudui"):
        build_model("resnet")


def test_seeded_weights_are_reproducible_and_differ_by_seed():
    a, b, c = build_model(seed=0), build_model(seed=0), build_model(seed=1)
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key])
    assert not torch.equal(a.model1[0].weight, c.model1[0].weight)


def test_tutorial_state_dict_loads_unchanged(tmp_path):
    source = build_model(seed=5)
    torch.save(source.state_dict(), tmp_path / "tudui.pth")
    model = build_model(seed=0)
    load_checkpoint(model, tmp_path / "tudui.pth")
    assert torch.equal(model.model1[8].bias, source.model1[8].bias)


def test_wrapped_state_dict_loads(tmp_path):
    source = build_model(seed=5)
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, tmp_path / "ckpt.pt")
    model = build_model(seed=0)
    load_checkpoint(model, tmp_path / "ckpt.pt")
    assert torch.equal(model.model1[0].weight, source.model1[0].weight)


def test_whole_pickled_module_is_refused_with_a_hint(tmp_path):
    torch.save(build_model(), tmp_path / "module.pth")  # the tutorial's "method 1"
    with pytest.raises(
        CheckpointError,
        match=r"pickles .*Tudui, refused under weights_only=True; save model.state_dict\(\)",
    ):
        load_checkpoint(build_model(), tmp_path / "module.pth")


def test_pickle_payload_in_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model1.0.weight": Payload()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(build_model(), tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"weight": torch.zeros(3)}, "keys do not fit the model: missing model1.0.bias"),
        ("extra", "keys do not fit the model: unexpected model1.9.weight"),
        ("shape", r"model1.8.weight has shape \[5, 64\], the model needs \[10, 64\]"),
        ([1, 2, 3], "not a state_dict"),
    ],
)
def test_checkpoint_that_does_not_fit_is_refused(tmp_path, state, message):
    good = build_model().state_dict()
    if state == "extra":
        state = {**good, "model1.9.weight": torch.zeros(1)}
    elif state == "shape":
        state = {**good, "model1.8.weight": torch.zeros(5, 64)}
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(build_model(), tmp_path / "bad.pt")


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 10, b"PK\x03\x04truncated"])
def test_unreadable_checkpoint_is_refused(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad.pt: not a checkpoint \((an empty file|not a zip"
                       r" archive|a damaged zip archive)\)"):  # fmt: skip
        load_checkpoint(build_model(), tmp_path / "bad.pt")


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(build_model(), tmp_path / "nope.pt")
