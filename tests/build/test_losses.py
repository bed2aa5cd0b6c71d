"""The loss library's guarantees, one behaviour per test, and a regression test for each way
the stock exporter goes wrong (measured with torch 2.14.1, onnxscript 0.7.2, onnxruntime 1.32)."""

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lossx.build.export import export_loss
from lossx.build.losses import exported_loss, reference_loss
from lossx.build.preflight import MIN_OPSET
from lossx.build.torch_onnx import max_opset
from lossx.errors import SpecError
from lossx.runtime.graphs import check_loss_classes, loss_graph, resolve_losses
from lossx.runtime.loss_specs import LOSSES, parse_loss_spec
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session
from tests.conftest import compare_fp32, sample_tensors

SMOOTHING_CASES = [
    "ce(label_smoothing=0.1)",
    "ce(label_smoothing=0.2, weight=[1, 2, 0.5, 1, 3, 1, 1, 0.1, 1, 2])",
]


def stock_export(module: nn.Module, spec, path) -> None:
    """torch.onnx.export(dynamo=True) of the torch.nn module itself, as a user would."""
    example = tuple(sample_tensors(spec, {"N": 4, "C": 10, "D": 10}, seed=0))
    dims = {"N": torch.export.Dim("N", min=1)}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=tuple({0: dims["N"]} for _ in spec.inputs),
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))


def onnx_and_eager(spec, path, seed: int = 7, sizes=None):
    inputs = sample_tensors(spec, sizes or {"N": 9, "C": 10, "D": 10}, seed=seed)
    feed = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
    (got,) = open_session(path, SessionOptions("cpu")).run(None, feed)
    with torch.no_grad():
        want = reference_loss(spec.loss)(*inputs).numpy()
    return got, want


@pytest.mark.parametrize("text", SMOOTHING_CASES)
def test_label_smoothing_is_exported(tmp_path, text):
    spec = export_loss(text, tmp_path / "loss.onnx")
    got, want = onnx_and_eager(spec, tmp_path / "loss.onnx")
    assert compare_fp32(got, want).passed
    nodes = {n.op_type for n in onnx.load(tmp_path / "loss.onnx").graph.node}
    assert "SoftmaxCrossEntropyLoss" not in nodes


@pytest.mark.parametrize("text", SMOOTHING_CASES)
def test_stock_export_drops_label_smoothing(tmp_path, text):
    """Why lossx has its own formulation: the stock graph computes plain cross-entropy."""
    spec = loss_graph(parse_loss_spec(text))
    stock_export(reference_loss(spec.loss), spec, tmp_path / "stock.onnx")
    got, want = onnx_and_eager(spec, tmp_path / "stock.onnx")
    assert abs(float(got) - float(want)) > 1e-3


def test_probability_targets_load_and_match(tmp_path):
    spec = export_loss("ce(target=probs, label_smoothing=0.1)", tmp_path / "loss.onnx")
    assert spec.input_names == ["logits", "target"]
    got, want = onnx_and_eager(spec, tmp_path / "loss.onnx")
    assert compare_fp32(got, want).passed


def test_stock_probability_target_graph_does_not_load(tmp_path):
    spec = loss_graph(parse_loss_spec("ce(target=probs)"))
    stock_export(reference_loss(spec.loss), spec, tmp_path / "stock.onnx")
    with pytest.raises(Exception, match="INVALID_GRAPH"):
        ort.InferenceSession(tmp_path / "stock.onnx", providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(LOSSES))
def test_reduction_none_loads_without_onnxruntime_warnings(tmp_path, capfd, name):
    spec = export_loss(f"{name}(reduction=none)", tmp_path / "loss.onnx")
    capfd.readouterr()
    options = ort.SessionOptions()
    options.log_severity_level = 1  # info and above, warnings included
    ort.InferenceSession(tmp_path / "loss.onnx", options, providers=["CPUExecutionProvider"])
    assert "[W:onnxruntime" not in capfd.readouterr().err
    assert spec.outputs[0].shape == (("N",) if name in ("ce", "nll") else ("N", "D"))


def test_bce_with_large_logits_stays_finite(tmp_path):
    spec = export_loss("bce_logits(pos_weight=[2, 1, 1, 1, 1, 1, 1, 1, 1, 3])", tmp_path / "l.onnx")
    logits = torch.tensor([[-1e4, 1e4, -30.0, 0.0, 5, -5, 80, -80, 1e-3, 1e4]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.5, 0, 1, 0, 1, 0.3, 1]])
    (got,) = open_session(tmp_path / "l.onnx", SessionOptions("cpu")).run(
        None, {"logits": logits.numpy(), "target": target.numpy()}
    )
    want = reference_loss(spec.loss)(logits, target).numpy()
    assert np.isfinite(got) and np.isfinite(want)
    assert compare_fp32(got, want).passed


def test_stock_bce_overflows_at_large_logits(tmp_path):
    spec = loss_graph(parse_loss_spec("bce_logits"))
    stock_export(reference_loss(spec.loss), spec, tmp_path / "stock.onnx")
    feed = {"logits": np.full((1, 10), -1e4, np.float32), "target": np.ones((1, 10), np.float32)}
    (got,) = open_session(tmp_path / "stock.onnx", SessionOptions("cpu")).run(None, feed)
    assert np.isinf(got)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("opset", [MIN_OPSET, "newest"])
def test_every_loss_exports_at_the_oldest_and_newest_opset(tmp_path, name, opset):
    opset = max_opset() if opset == "newest" else opset
    spec = export_loss(name, tmp_path / "loss.onnx", opset=opset)
    proto = onnx.load(tmp_path / "loss.onnx")
    assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
    got, want = onnx_and_eager(spec, tmp_path / "loss.onnx")
    assert compare_fp32(got, want).passed


def test_newest_opset_is_what_every_tool_supports():
    assert max_opset() == min(
        torch.onnx._constants.ONNX_MAX_OPSET, onnx.defs.onnx_opset_version(), 23
    )


def test_spatial_inputs_are_exported(tmp_path):
    """[N, C, H, W] logits with [N, H, W] labels, as a segmentation model gives."""
    spec = export_loss(
        "ce(label_smoothing=0.1, ignore_index=255)", tmp_path / "l.onnx", extra_dims=2
    )
    assert spec.inputs[0].shape == ("N", "C", "d1", "d2")
    assert spec.inputs[1].shape == ("N", "d1", "d2")
    got, want = onnx_and_eager(spec, tmp_path / "l.onnx", sizes={"N": 2, "C": 4, "d1": 5, "d2": 3})
    assert compare_fp32(got, want).passed


def test_reference_is_torch_nn_with_the_options():
    module = reference_loss(
        parse_loss_spec("ce(label_smoothing=0.1, weight=[1, 2], reduction=sum)")
    )
    assert type(module) is nn.CrossEntropyLoss
    assert (module.label_smoothing, module.reduction) == (0.1, "sum")
    assert module.weight.tolist() == [1.0, 2.0]
    assert type(reference_loss(parse_loss_spec("huber(delta=2)"))) is nn.HuberLoss


def test_stock_losses_are_exported_from_torch_nn():
    for name in ("mse", "l1", "smooth_l1", "huber"):
        spec = parse_loss_spec(name)
        assert type(exported_loss(spec)) is type(reference_loss(spec))


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (
            ["ce(weight=[1, 2, 3])"],
            r"ce\(weight=\[1, 2, 3\]\): weights for 3 classes; the model has 10",
        ),
        (
            ["bce_logits(pos_weight=[1])"],
            r"pos_weight=\[1\]\): weights for 1 logits per image; the model has 10",
        ),
        (
            ["ce", "ce(label_smoothing=0.1)"],
            r"loss ce given twice; an artifact holds one spec per loss",
        ),
        ([], r"no losses given"),
    ],
)
def test_artifact_loss_lists_are_checked(losses, message):
    with pytest.raises(SpecError, match=message):
        check_loss_classes(resolve_losses(losses), 10)  # the model's 10 logits
