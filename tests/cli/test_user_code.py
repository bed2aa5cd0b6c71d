"""A user's model module that misbehaves: it ends the process, prints, computes NaN, returns
the wrong thing, or cannot become a graph. Each ends in one line with a documented exit code,
nothing reported as done that was not, and lossx's machine-readable output left intact."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lossx.build.export as export_module
from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.conftest import require_shared, shared_cifar10_dir

REPO = Path(__file__).resolve().parents[2]

MODELS = """
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def features(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


class NaNs(Net):
    def forward(self, x):
        return self.fc(self.features(x)) * float("nan")


class Exits(Net):
    def forward(self, x):
        sys.exit(0)


class HardExits(Net):
    def forward(self, x):
        os._exit(0)


class Prints(Net):
    def forward(self, x):
        print("hello from forward")
        os.write(1, b"written to fd 1\\n")
        return super().forward(x)


class Doubles(Net):
    def forward(self, x):
        return super().forward(x).double()


class Halves(Net):
    def forward(self, x):
        return super().forward(x).half()


class Indices(Net):
    def forward(self, x):
        return super().forward(x).argsort(1)


class Squeezes(Net):
    def forward(self, x):
        return super().forward(x).squeeze()


class Branches(Net):
    def forward(self, x):
        if x.mean() > 0.5:
            return super().forward(x)
        return -super().forward(x)


class ChangesSigmoidInPlace(Net):
    def forward(self, x):
        y = torch.sigmoid(self.conv(x))
        y.mul_(2)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class ChangesReluInPlace(Net):
    def forward(self, x):
        y = self.conv(x).relu_()
        y += 1
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class NoParameters(nn.Module):
    def forward(self, x):
        return x.mean((2, 3)).repeat(1, 4)[:, :10]


class Huge(Net):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(540_000_000))  # 2.16 GB of float32


def make_int():
    return 3
"""

# A module's source, and what it does when imported
IMPORT_TIME = {
    "lossx_exit_at_import": "import sys\nsys.exit(0)\n",
    "lossx_hard_exit_at_import": "import os\nos._exit(0)\n",
    "lossx_exit_code_at_import": "raise SystemExit('bye')\n",
    "lossx_prints_at_import": "print('importing')\nfrom lossx_models import Net\n",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    (folder / "lossx_models.py").write_text(MODELS)
    for name, source in IMPORT_TIME.items():
        (folder / f"{name}.py").write_text(source)
    return folder


@pytest.fixture(scope="module")
def artifact(project, tmp_path_factory):
    """lossx_models:Net exported with a training graph: the artifact the other modules are
    compared with (they share its state_dict)."""
    out = tmp_path_factory.mktemp("art") / "net"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        result = run_cli("export", out, "--model", "lossx_models:Net", "--init", "random",
                         "--loss", "ce", "--train")  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _lossx(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `lossx` process (its stdout a pipe, not click's test runner)."""
    return subprocess.run([sys.executable, "-m", "lossx.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# --- the user's code ends the process ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "called"),
    [
        ("lossx_exit_at_import:Net", "sys.exit(0)"),
        ("lossx_hard_exit_at_import:Net", "os._exit(0)"),
        ("lossx_exit_code_at_import:Net", "sys.exit('bye')"),
        ("lossx_models:Exits", "sys.exit(0)"),
        ("lossx_models:HardExits", "os._exit(0)"),
    ],
)
def test_an_exit_in_the_users_code_is_a_failure(project, tmp_path, monkeypatch, model, called):
    monkeypatch.chdir(project)
    out = tmp_path / "art"
    result = run_cli("export", out, "--model", model, "--init", "random", "--loss", "ce")
    assert_one_line_error(result, 2, f"called {called}; lossx stopped there")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert "wrote" not in result.stdout


def test_an_exit_during_check_and_training_is_a_failure(project, artifact, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    for model, called in (("lossx_models:Exits", "sys.exit(0)"),
                          ("lossx_models:HardExits", "os._exit(0)")):  # fmt: skip
        result = run_cli("check", artifact, "--model", model, "--limit", "8")
        assert_one_line_error(result, 2, f"lossx check ran (your model's module) called {called}")
    require_shared(shared_cifar10_dir())
    result = run_cli("train", "--model", "lossx_models:Exits", "--data-dir", shared_cifar10_dir(),
                     "--limit", "64", "--epochs", "1", "--out", tmp_path / "c.pt")  # fmt: skip
    assert_one_line_error(result, 2, "lossx train ran (your model's module) called sys.exit(0)")
    assert not (tmp_path / "c.pt").exists()


def test_os_exit_cannot_end_a_real_lossx_process_with_success(project, tmp_path):
    """The process as a shell runs it: os._exit(0) in the model's forward must not become
    exit 0 with nothing written."""
    result = _lossx("export", tmp_path / "art", "--model", "lossx_models:HardExits", "--init",
                    "random", "--loss", "ce", cwd=project)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: code lossx export ran")
    assert not (tmp_path / "art").exists()


# --- the user's code prints -----------------------------------------------------------------


def test_the_users_prints_never_reach_machine_readable_stdout(project, tmp_path):
    """print() and writes to file descriptor 1 from the model go to stderr; stdout holds the
    JSON alone, for every command that writes JSON to stdout ('-')."""
    out = tmp_path / "art"
    result = _lossx("export", out, "--model", "lossx_prints_at_import:Net", "--init", "random",
                    "--loss", "ce", cwd=project)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "importing" in result.stderr and "importing" not in result.stdout
    (project / "lossx_printing_copy.py").write_text(
        "from lossx_models import Prints as Net\n"
    )  # the same weights, a forward that prints
    commands = [
        ["eval", out, "--compare-eager", "--limit", "16", "--json", "-"],
        ["check", out, "--limit", "16", "--report-json", "-"],
        ["check", out, "--model", "lossx_printing_copy:Net", "--limit", "16",
         "--report-json", "-"],
    ]  # fmt: skip
    for command in commands:
        result = _lossx(*command, cwd=project)
        assert result.returncode == 0, (command, result.stderr)
        json.loads(result.stdout)  # nothing but the JSON
        assert "parity of" in result.stderr or "top-1 accuracy" in result.stderr
    assert "hello from forward" in result.stderr and "written to fd 1" in result.stderr


def test_dash_means_stdout_for_every_text_report_and_is_refused_for_binary_files(
    project, artifact, tmp_path
):
    for option, check in (("--report-json", json.loads), ("--junit-xml", _is_xml),
                          ("--markdown", _is_markdown)):  # fmt: skip
        result = _lossx("check", artifact, "--limit", "8", option, "-", cwd=project)
        assert result.returncode == 0, result.stderr
        check(result.stdout)
        assert "parity of" in result.stderr  # the table, on stderr
    assert not (project / "-").exists()
    both = run_cli("check", artifact, "--report-json", "-", "--markdown", "-")
    assert_one_line_error(both, 2, "only one of --report-json, --junit-xml and --markdown")
    for command in (["check", artifact, "--repro", "-"],
                    ["train", "--data-dir", tmp_path, "--out", "-"],
                    ["train", "--data-dir", tmp_path, "--write-plan", "-"]):  # fmt: skip
        assert_one_line_error(run_cli(*command), 2, "'-' (stdout) cannot take")


def _is_xml(text: str) -> None:
    assert text.startswith("<?xml") and "</testsuites>" in text


def _is_markdown(text: str) -> None:
    assert text.startswith("## ✅ lossx check PASSED")


# --- the user's model computes NaN ----------------------------------------------------------


def test_a_model_that_computes_nan_is_refused_not_verified(project, artifact, tmp_path,
                                                           monkeypatch):  # fmt: skip
    monkeypatch.chdir(project)
    out = tmp_path / "nan"
    result = run_cli("export", out, "--model", "lossx_models:NaNs", "--init", "random")
    assert_one_line_error(result, 2, "model/logits: the reference (eager PyTorch")
    assert "computes NaN or Inf, not numbers" in result.stderr
    assert "verified" not in result.stdout and not out.exists()
    # checked against an eager model that computes NaN: an input error, not a parity failure
    result = run_cli("check", artifact, "--model", "lossx_models:NaNs", "--limit", "8",
                     "--report-json", tmp_path / "r.json")  # fmt: skip
    assert_one_line_error(result, 2, "computes NaN or Inf, not numbers")
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["passed"]
    logits = next(o for o in report["outputs"] if o["graph"] == "model")
    assert logits["invalid_reference"] > 0 and logits["invalid_reference_inputs"] == "images 0-7"


# --- the user's model does not map images to float32 logits --------------------------------


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("lossx_models:Doubles", "logits must be float32, got float64"),
        ("lossx_models:Halves", "logits must be float32, got float16"),
        ("lossx_models:Indices", "logits must be float32, got int64"),
        (
            "lossx_models:Squeezes",
            "returns [10] for [1, 3, 32, 32] images; lossx needs [N, classes]",
        ),
        ("lossx_models:make_int", "returned an int, not an nn.Module"),
    ],
)
def test_a_model_is_probed_at_batch_1_and_for_its_dtype(project, tmp_path, monkeypatch, model,
                                                        message):  # fmt: skip
    monkeypatch.chdir(project)
    result = run_cli("export", tmp_path / "x", "--model", model, "--init", "random")
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "x").exists()


def test_control_flow_on_values_is_named_with_its_line(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    result = run_cli("export", tmp_path / "x", "--model", "lossx_models:Branches", "--init",
                     "random")  # fmt: skip
    assert_one_line_error(result, 2, "model.onnx: the model branches on a tensor's values at ")
    line = MODELS.splitlines().index("        if x.mean() > 0.5:") + 1
    assert f"lossx_models.py:{line} `if x.mean() > 0.5:` in the model (Branches)" in result.stderr
    assert "torch.where" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # "exporting model.onnx", the error


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("ChangesSigmoidInPlace",
         "changes output 0 of Sigmoid (made at {at} `y = torch.sigmoid(self.conv(x))`) in place"),
        ("ChangesReluInPlace",
         "changes output 0 of Relu (made at {at} `y = self.conv(x).relu_()`) in place"),
        ("NoParameters", "the model has no parameters, so there is nothing to train"),
    ],
)  # fmt: skip
def test_what_a_training_graph_cannot_hold_is_one_line(project, tmp_path, monkeypatch, model,
                                                       message):  # fmt: skip
    monkeypatch.chdir(project)
    code = message.partition("`")[2].partition("`")[0]
    line = [text.strip() for text in MODELS.splitlines()].index(code) + 1 if code else 0
    result = run_cli("export", tmp_path / "x", "--model", f"lossx_models:{model}", "--init",
                     "random", "--loss", "ce", "--train")  # fmt: skip
    assert_one_line_error(result, 2, message.format(at=f"lossx_models.py:{line}"))
    assert not (tmp_path / "x").exists()


def test_a_model_too_large_for_one_onnx_file_is_refused_before_export(project, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.chdir(project)
    result = run_cli("export", tmp_path / "x", "--model", "lossx_models:Huge", "--init", "random")
    assert_one_line_error(result, 2, "the model's weights take 2.01 GiB (540,000,314 parameters)")
    assert "1.94 GiB is the limit" in result.stderr
    assert "exporting" not in result.stderr  # refused before any graph
    # the limit is the one every export applies, whatever the model
    monkeypatch.setattr(export_module, "MAX_WEIGHT_BYTES", 1000)
    result = run_cli("export", tmp_path / "y", "--model", "lossx_models:Net", "--init", "random")
    assert_one_line_error(result, 2, "an ONNX file holds at most 2 GiB")


def test_the_torch_engine_refuses_the_same_models_in_one_line(project, tmp_path, monkeypatch):
    require_shared(shared_cifar10_dir())
    monkeypatch.chdir(project)
    recipe = ["--data-dir", shared_cifar10_dir(), "--limit", "64", "--holdout", "32",
              "--epochs", "1", "--out", tmp_path / "c.pt"]  # fmt: skip
    for model, message in (
        (
            "ChangesSigmoidInPlace",
            "--model lossx_models:ChangesSigmoidInPlace: the model changes output 0 of Sigmoid",
        ),
        ("NoParameters", "has no parameters, so there is nothing to train"),
        ("Squeezes", "returns [10] for [1, 3, 32, 32] images"),
    ):
        result = run_cli("train", "--model", f"lossx_models:{model}", *recipe)
        assert_one_line_error(result, 2, message)
        assert not (tmp_path / "c.pt").exists()
