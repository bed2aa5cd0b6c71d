"""`lossx check`: exit codes, reports, the layer finder and tolerance edge cases."""

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lossx.compare.elementwise import element_errors
from lossx.compare.render import schema
from lossx.compare.tolerances import resolve_tolerances
from lossx.errors import SpecError
from lossx.parity.check import check_artifact
from lossx.runtime import load_artifact, load_packaged_sample
from lossx.runtime.artifact import sha256_of
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.graphs import fused_graph, model_graph
from lossx.runtime.loss_specs import parse_loss_spec
from tests.cli.test_cli import assert_one_line_error, run_cli

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)


def perturbed_copy(artifact_dir, target, initializer: str, delta: float, files=("model.onnx",)):
    """Copy an artifact and add `delta` to one weight inside its ONNX graphs (re-hashed, so it
    loads): the graphs then differ from the eager model built from weights.npz."""
    shutil.copytree(artifact_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for file in files:
        proto = onnx.load(target / file)
        for tensor in proto.graph.initializer:
            if tensor.name.endswith(initializer):
                array = numpy_helper.to_array(tensor).copy()
                array.flat[0] += delta
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        onnx.save(proto, target / file)
        manifest["files"][file]["sha256"] = sha256_of(target / file)
        manifest["files"][file]["bytes"] = (target / file).stat().st_size
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def validate(report: dict) -> None:
    import jsonschema  # a dev dependency; the GPU machine's test run lacks it and needs none

    jsonschema.Draft202012Validator(schema()).validate(report)


def data_args(cifar_dir):
    return ["--data-dir", cifar_dir] if cifar_dir else []


def test_a_fresh_export_passes_with_every_report(artifact_dir, cifar_dir, tmp_path):
    result = run_cli(
        "check", artifact_dir, *data_args(cifar_dir), "--limit", "300",
        "--report-json", tmp_path / "r.json", "--junit-xml", tmp_path / "r.xml",
        "--markdown", tmp_path / "r.md", "--repro", tmp_path / "repro.npz",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    validate(report)
    assert report["passed"] and report["profile"] == "fp32-cpu"
    outputs = {o["graph"] + "/" + o["output"] for o in report["outputs"]}
    assert len(outputs) == 10 and "model_ce/loss" in outputs
    assert report["inputs"][-3:] == ["random N=1 seed 0", "random N=7 seed 1", "random N=64 seed 2"]
    assert any("alone" in label for label in report["inputs"])
    logits = next(o for o in report["outputs"] if o["graph"] == "model")
    assert logits["argmax_agreement"] == 1.0
    assert logits["accuracy_onnx"] == logits["accuracy_reference"]
    assert report["fingerprint"]["providers"] == ["cpu"]
    assert report["fingerprint"]["graphs"]["model.onnx"] == sha256_of(artifact_dir / "model.onnx")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("10", "0")
    assert "PASSED" in (tmp_path / "r.md").read_text()
    assert not (tmp_path / "repro.npz").exists()  # written on failure only


@pytest.fixture(scope="module")
def corrupted(artifact_dir, tmp_path_factory):
    """model.onnx with one weight of the second convolution (model1.2) moved by 0.5."""
    return perturbed_copy(
        artifact_dir, tmp_path_factory.mktemp("bad") / "a", "model1.2.weight", 0.5
    )


def test_a_corrupted_graph_fails_and_the_layer_is_named(corrupted, cifar_dir, tmp_path):
    result = run_cli(
        "check", corrupted, *data_args(cifar_dir), "--limit", "100",
        "--junit-xml", tmp_path / "r.xml", "--report-json", tmp_path / "r.json",
        "--repro", tmp_path / "repro.npz",
    )  # fmt: skip
    assert_one_line_error(result, 1, "parity failed for 1 of 10 outputs, worst model/logits")
    assert "first failing node model1.2 (Conv2d): aten.conv2d.default;" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["first_failing_layer"] == "model1.2 (Conv2d)"
    validate(report)
    rows = {row["layer"]: row["passed"] for row in report["layers"]}
    assert rows["model1.0 (Conv2d)"] and rows["model1.1 (MaxPool2d)"]
    assert not rows["model1.2 (Conv2d)"] and not rows["model1.8 (Linear)"]
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    failed = [
        c.get("classname") + "/" + c.get("name") for c in suite if c.find("failure") is not None
    ]
    assert failed == ["lossx.check.model/logits"]
    with np.load(tmp_path / "repro.npz") as repro:
        assert {"input.images", "onnx.logits", "reference.logits", "about"} <= set(repro.files)
        session = load_artifact(corrupted).session("model")
        (rerun,) = session.run(None, {"images": repro["input.images"]})
        np.testing.assert_array_equal(rerun, repro["onnx.logits"])
        assert np.abs(rerun - repro["reference.logits"]).max() > 1e-3


def test_task_level_checks_catch_what_a_loose_tolerance_lets_through(artifact_dir, tmp_path):
    """With atol 100 every logit passes elementwise, but flipped classes fail the gate."""
    bad = perturbed_copy(artifact_dir, tmp_path / "a", "model1.8.bias", 50.0)
    artifact = load_artifact(bad)
    report = check_artifact(
        artifact,
        load_packaged_sample().head(200),
        resolve_tolerances("fp32-cpu", atol=100),
        "custom",
    )
    logits = next(o for o in report.outputs if o.name == "model/logits")
    assert logits.mismatches == 0
    assert logits.task_failures and "argmax agreement" in logits.task_failures[0]
    assert not report.passed


def test_baseline_compares_two_exports(artifact_dir, tmp_path):
    same = run_cli("check", artifact_dir, "--baseline", artifact_dir, "--limit", "50")
    assert same.exit_code == 0, same.output
    assert "baseline artifact" in same.stdout
    drifted = perturbed_copy(
        artifact_dir, tmp_path / "new", "model1.7.bias", 1e-3,
        files=("model.onnx", "model_ce.onnx", "model_mse.onnx", "model_l1.onnx"),
    )  # fmt: skip
    result = run_cli("check", drifted, "--baseline", artifact_dir, "--limit", "50",
                     "--repro", tmp_path / "repro.npz")  # fmt: skip
    assert_one_line_error(result, 1, "parity failed for ")
    assert "first failing layer" not in result.stderr  # layers need the eager model
    assert "loss_ce/loss" not in result.stderr


def test_checkpoint_is_the_eager_side(trained_artifact, trained_checkpoint, tmp_path):
    good = run_cli(
        "check", trained_artifact.path, "--checkpoint", trained_checkpoint, "--limit", "50"
    )
    assert good.exit_code == 0, good.output
    state = torch.load(trained_checkpoint, weights_only=True)
    state["model1.8.bias"] += 0.1
    torch.save(state, tmp_path / "other.pt")
    bad = run_cli("check", trained_artifact.path, "--checkpoint", tmp_path / "other.pt",
                  "--limit", "50", "--repro", tmp_path / "repro.npz")  # fmt: skip
    assert_one_line_error(bad, 1, "first failing node model1.8 (Linear): aten.linear.default")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--atol-for", "logits"], 2, "--atol-for 'logits': write OUTPUT=X"),
        (["--atol-for", "logits=-1"], 2, "write OUTPUT=X or GRAPH/OUTPUT=X, X >= 0"),
        (["--atol", "-1"], 2, "--atol must be a finite number >= 0"),
        (["--tolerance-profile", "fp64"], 2, "Invalid value for '--tolerance-profile'"),
        (["--checkpoint", "x.pt", "--baseline", "."], 2, "--checkpoint and --baseline exclude"),
        (["--provider", "cuda"], 3, "provider 'cuda' requested"),
    ],
)
def test_usage_and_environment_errors(artifact_dir, args, code, message):
    result = run_cli("check", artifact_dir, *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_missing_artifact_exits_2(tmp_path):
    assert_one_line_error(run_cli("check", tmp_path / "none"), 2, "does not exist")


def test_per_output_tolerances():
    tolerances = resolve_tolerances("fp16", atol_for=("logits=0.5", "model_ce/logits=2"))
    model, fused = MODEL, fused_graph(parse_loss_spec("ce"), MODEL)
    assert tolerances.of(model, "logits").atol == 0.5
    assert tolerances.of(fused, "logits").atol == 2
    assert tolerances.of(fused, "loss").atol == 1e-2
    assert tolerances.of(model, "logits").rtol == 1e-2
    with pytest.raises(SpecError, match="unknown tolerance profile 'fp64'"):
        resolve_tolerances("fp64")


@pytest.mark.parametrize(
    ("onnx_value", "reference", "fails"),
    [
        (1.5, 1.0, False),  # exactly at atol + rtol * |reference| = 0.5
        (1.5000001, 1.0, True),
        (-0.5, -1e-9, True),  # a bound of 0.25 + 0.25e-9
        (np.nan, np.nan, False),
        (np.nan, 1.0, True),
        (1.0, np.nan, True),
        (np.inf, np.inf, False),
        (np.inf, -np.inf, True),
        (-np.inf, 1e30, True),
        (0.0, -0.0, False),
    ],
)
def test_tolerance_edge_cases(onnx_value, reference, fails):
    errors = element_errors(np.array([onnx_value]), np.array([reference]), 0.25, 0.25)
    assert bool(errors.failed[0]) is fails


@pytest.mark.gpu
def test_cuda_passes_the_fp32_cuda_profile(artifact_dir, tmp_path):
    result = run_cli(
        "check", artifact_dir, "--provider", "cuda", "--report-json", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["profile"] == "fp32-cuda"
    assert report["fingerprint"]["providers"][0] == "cuda"


def test_a_failing_case_is_saved_beside_the_reports_never_unasked(corrupted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bare = run_cli("check", corrupted, "--limit", "20")
    assert_one_line_error(bare, 1, "parity failed for 1 of 10 outputs")
    assert "saved" not in bare.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory
    reports = tmp_path / "reports"
    reports.mkdir()
    beside = run_cli("check", corrupted, "--limit", "20", "--junit-xml", reports / "check.xml")
    assert_one_line_error(beside, 1, f"failing case saved to {reports / 'lossx-check-failure.npz'}")
    assert sorted(p.name for p in reports.iterdir()) == ["check.xml", "lossx-check-failure.npz"]


RESIDUAL = """
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()
        self.head = nn.Linear(8, 10)

    def forward(self, images):
        x = self.block(F.relu(self.stem(images)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
"""


def test_the_first_failing_node_is_a_functional_op_where_that_op_changed(tmp_path, monkeypatch):
    """An eager model whose residual addition changed: no module's own output is the sum, so
    layers alone name the next module; nodes name the addition and its line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lossx_residual.py").write_text(RESIDUAL)
    changed = RESIDUAL.replace("F.relu(self.conv(x) + x)", "F.relu(self.conv(x) + 1.01 * x)")
    (tmp_path / "lossx_residual_changed.py").write_text(changed)
    out = tmp_path / "art"
    result = run_cli("export", out, "--model", "lossx_residual:Net", "--init", "random",
                     "--loss", "ce")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("check", out, "--model", "lossx_residual_changed:Net", "--limit", "16")
    line = changed.splitlines().index("        return F.relu(self.conv(x) + 1.01 * x)") + 1
    assert_one_line_error(
        result,
        1,
        f"first failing node block (Block): aten.add.Tensor at lossx_residual_changed.py:{line} "
        "`return F.relu(self.conv(x) + 1.01 * x)`",
    )
