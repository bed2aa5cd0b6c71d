"""What once kept classifiers of the zoo from every command, each on a small model that shows it:
weights folded into constants, batch norm over 1x1 maps at batch 1, attention's backward, a
buffer named as the exporter names its values, state_dict names no Python identifier takes.
bench/zoo.py runs torchvision's models through the same commands."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from lossx.build import backward, export_artifact
from lossx.compare.tolerances import resolve_tolerances
from lossx.parity.check import check_artifact
from lossx.runtime import load_artifact, open_artifact
from tests.build.zoo_models import FoldNet


def _perturbed(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (value + rng.standard_normal(value.shape).astype(value.dtype) * 0.1)
        if value.dtype == np.float32
        else value
        for name, value in weights.items()
    }


def test_every_weight_keeps_its_own_initializer_and_can_be_replaced(tmp_path, test_split):
    out = tmp_path / "fold"
    export_artifact(out, "tests.build.zoo_models:FoldNet", losses=["ce"], init="random")
    artifact = load_artifact(out)
    state = artifact.state_dict()
    for graph, prefix in (("model.onnx", ""), ("model_ce.onnx", "model.")):
        names = {t.name for t in onnx.load(out / graph).graph.initializer}
        assert {prefix + name for name in state} <= names, graph
    other = _perturbed(state, 1)  # a zero bias and GroupNorm's ones no longer are
    images = artifact.contract.to_model_input(test_split.images[:16])
    got = open_artifact(out, weights=other).predict(images).logits
    model = FoldNet().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in other.items()})
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # fp32 rounding


@pytest.mark.parametrize(("side", "values"), [(1, "1 value"), (2, "4 values")])
def test_batch_norm_over_few_values_trains_and_says_batch_1_was_not_compared(
    tmp_path, test_split, side, values
):
    """One image gives a batch norm over 1x1 maps 1 value per channel (torch refuses it), over
    2x2 maps 4: both below BN_MIN_VALUES, so the training step is compared on the other
    batches (7 images give 7 and 28 values) and the report says why."""
    out = tmp_path / "bn"
    export_artifact(out, "tests.build.zoo_models:OneByOneBN", losses=["ce"], init="random",
                    train=True, model_args={"side": side})  # fmt: skip
    artifact = load_artifact(out)
    report = check_artifact(artifact, test_split.head(16), resolve_tolerances(), "fp32")
    assert report.passed
    refused = {k: v for k, v in report.not_compared.items() if k.startswith("train_ce.onnx")}
    assert set(refused) == {"train_ce.onnx on random N=1 seed 0", "train_ce.onnx on image 0 alone"}
    assert all(f"batch norm over {values} per channel" in why for why in refused.values())


def test_attention_trains(tmp_path):
    out = tmp_path / "vit"
    export_artifact(out, "tests.build.zoo_models:SmallViT", losses=["ce"], init="random",
                    train=True)  # fmt: skip
    grads = load_artifact(out).graph("train_ce").spec.gradients
    assert "encoder.layers.0.self_attn.in_proj_weight" in grads


def test_a_buffer_named_like_an_exporter_value_exports(tmp_path):
    out = tmp_path / "mean"
    export_artifact(out, "tests.build.zoo_models:MeanBuffer", losses=["ce"], init="random",
                    train=True)  # fmt: skip
    spec = load_artifact(out).graph("train_ce").spec
    assert {"mean", "std"} <= set(spec.buffer_names)


def test_state_dict_names_with_digits_first_and_dashes_export(tmp_path, test_split):
    out = tmp_path / "dashed"
    export_artifact(out, "tests.build.zoo_models:dashed_sequential", losses=["ce"],
                    init="random", train=True)  # fmt: skip
    artifact = load_artifact(out)
    assert "0.block1-0.weight" in artifact.graph("train_ce").spec.gradients
    assert check_artifact(artifact, test_split.head(16), resolve_tolerances(), "fp32").passed


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(3, 2, 1, 16), (3, 2, 1, 15), (3, 1, 1, 8), (2, 2, 0, 7), (3, 3, 0, 9), (2, 2, 0, 8)],
)
def test_max_pool_gradients_go_where_torch_sends_them_among_ties(kernel, stride, padding, size):
    """Images with flat regions tie within pooling windows; the training graph's backward picks
    torch's first maximum in row-major order, whatever ONNX Runtime's MaxPool index would say.
    Summation order aside, exact."""
    torch.manual_seed(0)
    x = torch.randint(0, 3, (2, 3, size, size)).float().requires_grad_()  # ties everywhere
    y, indices = F.max_pool2d(x, kernel, stride, padding, return_indices=True)
    dy = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, x, dy)
    got = backward._max_pool2d_backward(dy, x.detach(), kernel, stride, padding, 1, False, indices)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
