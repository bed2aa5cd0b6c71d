"""Training graphs of any model: loss, logits, every gradient and the buffers a train-mode step
leaves, in standard ONNX, checked against torch.autograd in train mode on real CIFAR-10 images."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir.passes.common
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lossx.build import backward, export_artifact
from lossx.build.backward import ReferenceTrainingStep, model_buffers
from lossx.build.eager import EagerRunner
from lossx.build.graph_export import export_graph
from lossx.build.models import build_model
from lossx.build.surgery import INFERENCE_MODE_OPS
from lossx.build.torch_onnx import batch_norm_fusions
from lossx.compare.elementwise import element_errors
from lossx.compare.tolerances import PROFILES, resolve_tolerances, rule_tolerance
from lossx.errors import DataError, ExportError, SpecError
from lossx.parity.check import check_artifact
from lossx.runtime import load_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.feeds import graph_feed
from lossx.runtime.graphs import model_graph, train_graph
from lossx.runtime.loss_specs import parse_loss_spec
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session
from tests.build.random_cnns import RandomCNN
from tests.cli.test_cli import run_cli

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)

LOSSES = [
    "ce(label_smoothing=0.1, weight=[1, 2, 1, 1, 0.5, 1, 1, 3, 1, 1], ignore_index=3)",
    "mse",
    "l1(reduction=sum)",
]
BATCHES = (1, 7, 64)


@pytest.fixture(scope="module")
def train_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "artifact"
    export_artifact(out, losses=LOSSES, train=True, input_grad=True)  # the shipped weights
    return load_artifact(out)


@pytest.fixture(scope="module")
def resnet20_artifact(resnet20_train_artifact_dir):
    return load_artifact(resnet20_train_artifact_dir)


def assert_matches_autograd(spec, run, model, images, labels, parameters) -> dict[str, float]:
    """Every output of training graph `spec` (run by `run(feed)`) against torch.autograd on
    `model` in train mode, under the rules lossx check applies: loss, logits and next buffers
    within the fp32-cpu profile (2e-5 + 1e-5 relative), gradients under the gradient rule (2e-3 of
    the batch's largest value + 1e-3 relative, a few outliers allowed). Returns each output's
    largest absolute error."""
    feed = graph_feed(spec, images, labels, None, parameters)
    got = dict(zip(spec.output_names, run(feed), strict=True))
    want = EagerRunner(model).run(spec, feed)
    worst = {}
    for name in spec.output_names:
        tolerance = rule_tolerance(spec.output(name).tolerance_rule, PROFILES["fp32-cpu"])
        reference = want[name].astype(np.float64)
        errors = element_errors(
            got[name], want[name], tolerance.atol_for(reference), tolerance.rtol
        )
        outside = int(errors.failed.sum())
        assert outside <= tolerance.max_mismatch_fraction * errors.failed.size, (
            f"{spec.stem} {name} at batch {len(images)}: {outside} of {errors.failed.size} "
            f"elements outside, max abs error {errors.error.max():.3g}"
        )
        worst[name] = float(errors.error.max()) if errors.error.size else 0.0
    return worst


def test_training_graphs_follow_the_contract(train_artifact, resnet20_artifact):
    spec = train_artifact.graph("train_ce").spec
    names = [n for n, _ in EagerRunner.of_artifact(train_artifact).model.named_parameters()]
    assert spec.input_names == ["images", "labels", *names]
    assert spec.output_names == ["loss", "logits", *(f"grad.{n}" for n in names), "grad.images"]
    assert train_artifact.graph("train_mse").spec.input_names[1] == "targets"
    spec = resnet20_artifact.graph("train_ce").spec
    model = build_model("resnet20")
    buffers = [n for n, _ in model.named_buffers()]
    parameters = [n for n, _ in model.named_parameters()]
    assert spec.input_names == ["images", "labels", *parameters, *buffers]
    assert list(spec.next_buffers) == buffers  # running_mean, running_var, num_batches_tracked
    assert spec.output("next.bn.num_batches_tracked").dtype == "int64"


@pytest.mark.parametrize("batch_size", [*BATCHES, 256])
def test_seed_cnn_gradients_match_autograd_on_real_images(train_artifact, test_split, batch_size):
    model = EagerRunner.of_artifact(train_artifact).model
    images = CONTRACT.to_model_input(test_split.images[:batch_size])
    labels = test_split.labels[:batch_size]
    for loss in train_artifact.manifest.losses:
        spec = train_artifact.graph(f"train_{loss.name}").spec
        run = lambda feed, s=spec: list(train_artifact.run(s.stem, feed).values())  # noqa: E731
        assert_matches_autograd(spec, run, model, images, labels, train_artifact.state_dict())


@pytest.mark.parametrize("batch_size", BATCHES)
def test_resnet20_gradients_and_statistics_match_autograd(
    resnet20_artifact, test_split, batch_size
):
    """Batch norm in train mode: batch statistics in the forward, running_mean, running_var
    and num_batches_tracked as torch leaves them after the step."""
    model = EagerRunner.of_artifact(resnet20_artifact).model
    spec = resnet20_artifact.graph("train_ce").spec
    images = CONTRACT.to_model_input(test_split.images[100 : 100 + batch_size])
    run = lambda feed: list(resnet20_artifact.run(spec.stem, feed).values())  # noqa: E731
    worst = assert_matches_autograd(
        spec, run, model, images, test_split.labels[100 : 100 + batch_size],
        resnet20_artifact.state_dict(),
    )  # fmt: skip
    assert worst["next.bn.num_batches_tracked"] == 0


def test_train_mode_batch_norm_is_not_the_eval_mode_one(resnet20_artifact, test_split):
    """The trap a train-mode decomposition avoids: ONNX BatchNormalization runs in inference
    mode in ONNX Runtime. The step's loss must be the train-mode loss, not the eval-mode one,
    and its statistics must move."""
    spec = resnet20_artifact.graph("train_ce").spec
    images, labels = CONTRACT.to_model_input(test_split.images[:32]), test_split.labels[:32]
    parameters = resnet20_artifact.state_dict()
    out = resnet20_artifact.run(spec.stem, graph_feed(spec, images, labels, None, parameters))
    model = EagerRunner.of_artifact(resnet20_artifact).model.eval()
    with torch.no_grad():
        eval_loss = F.cross_entropy(model(torch.from_numpy(images)), torch.from_numpy(labels))
        train_loss = F.cross_entropy(model.train()(torch.from_numpy(images)),
                                     torch.from_numpy(labels))  # fmt: skip
    assert abs(float(out["loss"]) - float(train_loss)) < 1e-5
    assert abs(float(eval_loss) - float(train_loss)) > 1e-2
    assert not np.allclose(out["next.bn.running_mean"], parameters["bn.running_mean"])
    graph = onnx.load(resnet20_artifact.path / spec.file)
    assert not {n.op_type for n in graph.graph.node} & set(INFERENCE_MODE_OPS)


def test_batch_norm_statistics_are_as_accurate_as_torchs(tmp_path, test_split):
    """The batch statistics are summed in float64, as torch's CPU kernel sums them: the new
    running mean and variance of 65,536 pixels per channel land as near float64 as torch's, and
    so do the gradients through them (float32 sums left the running mean 2.9x, and the weight's
    gradient 2.6x, as far from float64 as torch)."""
    export_artifact(tmp_path / "bn", "tests.build.zoo_models:NormFirst", losses=["ce"],
                    init="random", train=True)  # fmt: skip
    artifact = load_artifact(tmp_path / "bn")
    spec = artifact.graph("train_ce").spec
    images = CONTRACT.to_model_input(test_split.images[:64])
    feed = graph_feed(spec, images, test_split.labels[:64], None, artifact.state_dict())
    runner = EagerRunner.of_artifact(artifact)
    exact, torch_fp32 = runner.run_float64(spec, feed), runner.run(spec, feed)
    onnx_fp32 = artifact.run(spec.stem, feed)
    for name in ("next.norm.running_mean", "next.norm.running_var", "grad.norm.weight"):
        onnx_error = np.abs(onnx_fp32[name] - exact[name]).max()
        torch_error = np.abs(torch_fp32[name] - exact[name]).max()
        ulp = np.spacing(np.abs(exact[name]).max().astype(np.float32))
        assert onnx_error <= max(torch_error, ulp), (name, onnx_error, torch_error)


def test_a_batch_norm_that_reaches_the_exporter_is_refused(monkeypatch, tmp_path):
    """Without the batch-norm forward decompositions, train-mode batch norm would export as
    BatchNormalization: the export must refuse, not write an eval-mode step."""
    table = dict(backward.decompositions())
    for op in backward._TORCH_DECOMPOSITIONS:
        if "batch_norm" in str(op) and "backward" not in str(op):
            table.pop(op)
    monkeypatch.setattr(backward, "decompositions", lambda: table)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(3600, 10))
    spec = train_graph(
        parse_loss_spec("ce"), MODEL, _shapes(model), False, model_buffers(model, CONTRACT.shape)
    )
    with pytest.raises(ExportError, match="holds BatchNormalization, which ONNX Runtime runs"):
        export_graph(spec, model.eval(), tmp_path / "t.onnx")


def _shapes(model):
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _export_step(model, loss, tmp_path, input_grad=False):
    spec = train_graph(
        parse_loss_spec(loss),
        MODEL,
        _shapes(model),
        input_grad,
        model_buffers(model, CONTRACT.shape),
    )
    export_graph(spec, model.eval(), tmp_path / spec.file)  # verified on random inputs too
    session = open_session(tmp_path / spec.file, SessionOptions(threads=2))
    return spec, lambda feed: session.run(spec.output_names, feed)


class SmallNet(nn.Module):
    """Conv, batch norm, functional ReLU, max-pooling and a linear: a quick model for losses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, images):
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(images))), 2).flatten(1))


@pytest.mark.parametrize(
    "loss",
    [
        "ce", "ce(reduction=sum)", "ce(label_smoothing=0.2, ignore_index=2)",
        "ce(ignore_index=2, label_smoothing=0.3, weight=[1, 2, 3, 1, 1, 1, 1, 1, 1, 5])",
        "ce(target=probs, label_smoothing=0.1, reduction=sum)",
        "nll", "nll(reduction=sum)", "mse", "mse(reduction=sum)", "l1", "l1(reduction=sum)",
        "smooth_l1", "smooth_l1(reduction=sum, beta=0.5)", "huber", "huber(reduction=sum, delta=2)",
        "bce_logits", "bce_logits(reduction=sum, pos_weight=[1, 2, 1, 1, 1, 1, 1, 1, 1, 3])",
        "kl_div(reduction=batchmean)", "kl_div(reduction=sum)",
    ],
)  # fmt: skip
def test_every_loss_trains(loss, tmp_path, test_split):
    torch.manual_seed(0)
    model = SmallNet()
    spec, run = _export_step(model, loss, tmp_path)
    parameters = {k: v.numpy() for k, v in model.state_dict().items()}
    for batch in (1, 7):
        images = CONTRACT.to_model_input(test_split.images[:batch])
        assert_matches_autograd(spec, run, model, images, test_split.labels[:batch], parameters)


@pytest.mark.parametrize("seed", range(6))
def test_random_cnns_match_autograd(seed, tmp_path, test_split):
    """Property test: CNNs composed at random from every supported layer (see random_cnns):
    strided, dilated, grouped and depthwise convolutions with or without bias, batch norm,
    every activation as a module or a function, residual additions, concatenations, max,
    average and adaptive pooling, reshapes and linears, with the images' gradient too."""
    torch.manual_seed(seed)
    model = RandomCNN(seed)
    spec, run = _export_step(model, "ce", tmp_path, input_grad=True)
    parameters = {k: v.numpy() for k, v in model.state_dict().items()}
    for batch in BATCHES:
        images = CONTRACT.to_model_input(test_split.images[seed * 64 : seed * 64 + batch])
        labels = test_split.labels[seed * 64 : seed * 64 + batch]
        assert_matches_autograd(spec, run, model, images, labels, parameters)


def test_dsnet_trains_without_its_dropout(tmp_path, test_split):
    """The depthwise-separable net (grouped convolutions, ReLU6, average pooling) once its
    Dropout is off: Dropout itself is refused (see the refusal tests)."""
    torch.manual_seed(0)
    model = build_model("dsnet")
    model.classifier[1].p = 0.0
    spec, run = _export_step(model, "ce", tmp_path)
    parameters = {k: v.numpy() for k, v in model.state_dict().items()}
    for batch in BATCHES:
        images = CONTRACT.to_model_input(test_split.images[:batch])
        assert_matches_autograd(spec, run, model, images, test_split.labels[:batch], parameters)


def test_gradients_match_autograd_on_flat_images(train_artifact):
    """Flat image regions give exactly equal convolution outputs, so max-pooling windows tie
    exactly: ONNX Runtime must route the gradient to the first maximum, as torch does."""
    images = np.zeros((4, 3, 32, 32), np.float32)
    images[1] = 1.0
    images[2, :, :16] = 0.5
    images[3, 0] = np.linspace(0, 1, 32, dtype=np.float32)[None, :]
    labels = np.array([0, 1, 2, 3])
    spec = train_artifact.graph("train_mse").spec
    feed = graph_feed(spec, images, labels, None, train_artifact.state_dict())
    got = train_artifact.run(spec.stem, feed)
    want = EagerRunner.of_artifact(train_artifact).run(spec, feed)
    for name in spec.output_names:
        tolerance = rule_tolerance(spec.output(name).tolerance_rule, PROFILES["fp32-cpu"])
        atol = tolerance.atol_for(want[name].astype(np.float64))
        errors = element_errors(got[name], want[name], atol, tolerance.rtol)
        assert not errors.failed.any(), f"{name}: max abs error {errors.error.max():.3g}"


def test_lossx_check_gates_training_graphs(train_artifact, resnet20_artifact, test_split):
    report = check_artifact(
        train_artifact, test_split.head(300), resolve_tolerances("fp32-cpu"), "fp32-cpu"
    )
    train_outputs = [o for o in report.outputs if o.graph.startswith("train_")]
    assert len(train_outputs) == 3 * 13
    assert report.passed, [o.name for o in report.failures]
    report = check_artifact(
        resnet20_artifact, test_split.head(100), resolve_tolerances("fp32-cpu"), "fp32-cpu"
    )
    assert any(o.output == "next.blocks.8.bn2.running_var" for o in report.outputs)
    assert report.passed, [o.name for o in report.failures]


def test_wrong_parameters_are_refused(train_artifact, test_split):
    spec = train_artifact.graph("train_ce").spec
    images = CONTRACT.to_model_input(test_split.images[:2])
    feed = graph_feed(spec, images, test_split.labels[:2], None, train_artifact.state_dict())
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


class FunctionalDropout(SmallNet):
    def forward(self, images):
        return F.dropout(super().forward(images), 0.5, self.training)


class AntiAliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, images):
        x = F.interpolate(self.conv(images), size=(8, 8), mode="bilinear", antialias=True)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(
    ("model", "loss", "message"),
    [
        (SmallNet(), "ce(reduction=none)", "has no scalar loss to differentiate"),
        (build_model("dsnet"), "ce", r"classifier.1 \(Dropout\(p=0.2.*refuse Dropout"),
        (FunctionalDropout(), "ce", r"random op aten.\w+ in train mode \(functional dropout"),
        (AntiAliased(), "ce",
         r"no ONNX backward for aten._upsample_bilinear2d_aa_backward \(used by a function "
         r"in the forward of AntiAliased\)"),
    ],
)  # fmt: skip
def test_what_has_no_onnx_backward_is_refused_by_name(tmp_path, model, loss, message):
    with pytest.raises(SpecError, match=message):
        export_artifact(tmp_path / "a", model=model, losses=[loss], train=True)
    assert not (tmp_path / "a").exists()


def test_an_op_with_no_onnx_backward_is_refused_before_any_other_graph_is_exported(tmp_path):
    exported = []
    with pytest.raises(SpecError, match=r"no ONNX backward for aten\._upsample_bilinear2d_aa"):
        export_artifact(tmp_path / "aa", model=AntiAliased(), losses=["ce", "mse"], train=True,
                        progress=exported.append)  # fmt: skip
    assert exported == ["train_ce.onnx"]
    assert not (tmp_path / "aa").exists()


def test_onnxscript_still_has_the_batch_norm_fusions_export_turns_off():
    """torch.onnx's optimizer would fold batch norms into convolutions, changing the weights it
    keeps under their state_dict names; export turns those rules off (a private tuple)."""
    assert {r.name for r in batch_norm_fusions()} >= {"FuseBatchNormIntoConv"}
    assert hasattr(onnx_ir.passes.common, "DeduplicateInitializersPass")


def test_a_fresh_batch_norm_model_keeps_every_weight_by_name(resnet20_artifact, test_split):
    """A fresh resnet20's batch-norm scales are all ones: none may be merged or folded away,
    so other weights replace every one of them (and change the logits)."""
    graph = onnx.load(resnet20_artifact.path / "model.onnx")
    names = {t.name for t in graph.graph.initializer}
    state = resnet20_artifact.state_dict()
    assert {k for k, v in state.items() if v.dtype == np.float32} <= names
    changed = {k: v * 1.5 if k.endswith("bn.weight") else v for k, v in state.items()}
    images = CONTRACT.to_model_input(test_split.images[:8])
    before = resnet20_artifact.run("model", {"images": images})["logits"]
    after = resnet20_artifact.with_weights(changed).run("model", {"images": images})["logits"]
    model = EagerRunner.of_artifact(resnet20_artifact).model
    model.load_state_dict({k: torch.from_numpy(v) for k, v in changed.items()})
    with torch.no_grad():
        np.testing.assert_allclose(after, model(torch.from_numpy(images)).numpy(), atol=1e-4)
    assert not np.allclose(before, after)


def test_cli_export_train(tmp_path):
    result = run_cli("export", tmp_path / "a", "--init", "random", "--loss", "ce", "--train")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    files = [graph["file"] for graph in manifest["graphs"]]
    assert files[-3:] == ["train_ce.onnx", "optimizer_sgd.onnx", "optimizer_adamw.onnx"]
    result = run_cli("export", tmp_path / "b", "--input-grad")
    assert result.exit_code == 2 and "it needs --train" in result.stderr
    refused = run_cli("export", tmp_path / "c", "--model", "dsnet", "--init", "random", "--train")
    assert refused.exit_code == 2 and "refuse Dropout" in refused.stderr
    assert not Path(tmp_path / "c").exists()


def test_reference_step_leaves_the_model_as_it_was():
    model = build_model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = [p.detach() for p in model.parameters()] + list(model.buffers())
    spec = train_graph(
        parse_loss_spec("ce"), MODEL, _shapes(model), False, model_buffers(model, CONTRACT.shape)
    )
    ReferenceTrainingStep(model, spec)(torch.rand(3, 3, 32, 32), torch.tensor([1, 2, 3]), *tensors)
    assert not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- where fp32 cannot tell the engines apart, float64 decides ---------------------------------


def test_the_shipped_resnet20_exports_its_training_graphs(tmp_path):
    """Its batch norms' backward cancels: on random images the fp32 engines disagree by up to
    0.0027 in a batch-norm weight's gradient (more than the fp32 rule allows), and float64
    autograd shows ONNX Runtime is the one that is right (6.6e-7 from it, torch 2.7e-3). A loss
    of class indices, one of the logits themselves and one of probabilities here (each graph
    takes 20 s); all eight losses export so (docs/training.md)."""
    losses = ["ce", "bce_logits", "mse"]
    manifest = export_artifact(tmp_path / "r20", "resnet20", losses=losses, train=True)
    trains = [e.spec for e in manifest.graphs if e.spec.stem.startswith("train_")]
    assert len(trains) == len(losses)


def test_a_densenet_bc_gate_judges_by_float64_where_fp32_torch_is_off(tmp_path, test_split):
    """A small DenseNet-BC's first convolution's weight gradient: torch's fp32 is 2.6e-3 from
    float64 autograd on images 1-7 (ONNX Runtime 6.8e-7), 11 of 5,832 elements beyond the
    fp32 rule. Every gradient judged by float64 must have met it."""
    from tests.build.densenet_bc import DenseNetBC

    torch.manual_seed(0)
    model = DenseNetBC()
    export_artifact(tmp_path / "dn", model=model, losses=["ce"], train=True)
    artifact = load_artifact(tmp_path / "dn")
    report = check_artifact(artifact, test_split.head(8), resolve_tolerances(), "fp32-cpu")
    assert report.passed, report.failure_line()
    for output in report.outputs:
        if output.float64 is not None:
            judged = output.float64
            assert judged.onnx_max_abs_error <= max(
                judged.reference_max_abs_error, output.tolerance.atol
            )
