"""The rules behind the hostile-input cases, each walked over every command and API entry it
applies to. A rule's test fails on the next variant of the same mistake, not only on one known
case. Damaged manifests are walked in test_bad_input_matrix.py.
"""

import io
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lossx.build import build_model
from lossx.build.graph_modules import reference_module
from lossx.build.models import load_checkpoint
from lossx.build.torch_engine import CHECKPOINT_FORMAT
from lossx.compare.tolerances import Tolerance, resolve_tolerances
from lossx.errors import (
    CheckpointError,
    DataError,
    LossxError,
    ModelError,
    SpecError,
    TrainingDiverged,
)
from lossx.runtime import load_artifact, load_packaged_sample, open_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.graphs import fused_graph, model_graph
from lossx.runtime.loss_specs import parse_loss_spec
from lossx.runtime.options import MAX_THREADS
from lossx.training.recipe import TrainConfig
from lossx.training.trainer import _check_in_range
from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.conftest import (
    copy_with_eager_weights_changed,
    copy_with_nan_logits,
    rehash,
)

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "cat.png"
    Image.fromarray(load_packaged_sample().images[3]).save(path)
    return path


def _cli(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """The real `lossx` process: exit codes, signals and start-up as a user sees them."""
    return subprocess.run(
        [sys.executable, "-m", "lossx.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def _one_line(process: subprocess.CompletedProcess, exit_code: int, message: str) -> None:
    assert process.returncode == exit_code, process.stderr
    lines = process.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and message in lines[-1], process.stderr
    assert "Traceback" not in process.stderr


# --- Rule 1: a gate never passes on a meaningless tolerance --------------------------------


def _tolerance_commands(artifact_dir):
    return [
        ["eval", artifact_dir, "--compare-eager", "--limit", "20", "--atol"],
        ["eval", artifact_dir, "--compare-eager", "--limit", "20", "--rtol"],
        ["check", artifact_dir, "--limit", "20", "--atol"],
        ["check", artifact_dir, "--limit", "20", "--rtol"],
    ]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "-1e-9"])
def test_every_tolerance_is_finite_and_not_negative(artifact_dir, tmp_path, value):
    report = tmp_path / "r.json"
    for command in _tolerance_commands(artifact_dir):
        result = run_cli(*command, value, "--json" if command[0] == "eval" else "--report-json",
                         report)  # fmt: skip
        assert_one_line_error(result, 2, "must be a finite number >= 0")
        assert result.stdout == "" and not report.exists()
    result = run_cli("check", artifact_dir, "--atol-for", f"logits={value}")
    assert_one_line_error(result, 2, "--atol-for 'logits=")
    number = float(value)
    with pytest.raises(SpecError):
        resolve_tolerances("fp32-cpu", atol=number)
    with pytest.raises(SpecError):
        resolve_tolerances("fp32-cpu", rtol=number)
    with pytest.raises(SpecError):
        Tolerance(number, 1e-5)


def test_a_tolerance_for_no_output_is_refused_naming_the_outputs(artifact_dir):
    for name in ("nosuch", "model/loss", "loss_ce/logits"):
        result = run_cli("check", artifact_dir, "--atol-for", f"{name}=1e-3")
        assert_one_line_error(result, 2, f"--atol-for {name}: no graph has an output {name}")
        assert "outputs are logits, loss" in result.stderr
    assert run_cli("check", artifact_dir, "--limit", "8", "--atol-for", "model/logits=1e-4") \
        .exit_code == 0  # fmt: skip


def test_graphs_a_baseline_lacks_are_reported(artifact_dir, tmp_path):
    baseline = tmp_path / "baseline"
    assert run_cli("export", baseline, "--init", "random", "--loss", "ce").exit_code == 0
    report = tmp_path / "r.json"
    result = run_cli("check", artifact_dir, "--baseline", baseline, "--limit", "20",
                     "--report-json", report, "--junit-xml", tmp_path / "r.xml")  # fmt: skip
    assert result.exit_code == 0, result.output
    for graph in ("loss_mse.onnx", "model_l1.onnx"):
        assert f"not compared: {graph} (the baseline has no such graph)" in result.stdout
    written = json.loads(report.read_text())
    assert sorted(written["not_compared"]) == sorted(
        ["loss_mse.onnx", "loss_l1.onnx", "model_mse.onnx", "model_l1.onnx"]
    )
    assert 'skipped="4"' in (tmp_path / "r.xml").read_text()


# --- Rule 2: numbers are checked for range before any work ---------------------------------


def test_threads_are_bounded_on_every_command(artifact_dir, image, tmp_path, data_dir):
    too_many = str(MAX_THREADS + 1)
    commands = [
        ["eval", artifact_dir],
        ["check", artifact_dir],
        ["predict", artifact_dir, image],
        ["train", artifact_dir, "--engine", "onnxruntime", "--data-dir", data_dir],
    ]
    for command in commands:
        for threads in (too_many, "100000", "0"):
            result = run_cli(*command, "--threads", threads)
            assert_one_line_error(result, 2, "Invalid value for '--threads'")
    for threads in (MAX_THREADS + 1, 0, 10**5):
        with pytest.raises(SpecError, match=r"threads must be 1\.\."):
            open_artifact(artifact_dir, threads=threads)


@pytest.mark.parametrize("value", ["99999999999999999999999999", "9223372036854775808",
                                   "-9223372036854775809"])  # fmt: skip
def test_integer_loss_options_are_int64(tmp_path, data_dir, value):
    spec = f"ce(ignore_index={value})"
    with pytest.raises(SpecError, match="outside the int64 range"):
        parse_loss_spec(spec)
    started = time.perf_counter()
    for command in (["export", tmp_path / "x", "--loss"], ["train", "--data-dir", data_dir,
                                                           "--loss"]):  # fmt: skip
        result = run_cli(*command, spec)
        assert_one_line_error(result, 2, "ignore_index")
        assert "int64 range" in result.stderr
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "x").exists()
    assert parse_loss_spec("ce(ignore_index=9223372036854775807)")["ignore_index"] == 2**63 - 1


def test_seeds_are_in_range_on_every_command(artifact_dir, tmp_path, data_dir):
    for seed in ("-1", str(2**63)):
        for command in (["export", tmp_path / "x"], ["check", artifact_dir],
                        ["train", "--data-dir", data_dir]):  # fmt: skip
            assert_one_line_error(run_cli(*command, "--seed", seed), 2, "'--seed'")
    with pytest.raises(SpecError, match="seed must be"):
        TrainConfig(seed=-1).validate()


def test_batch_size_and_top_k_are_refused_not_clamped(artifact_dir, image):
    runtime = open_artifact(artifact_dir)
    split = load_packaged_sample().head(8)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DataError, match="batch size must be an integer of at least 1"):
            runtime.evaluate(split, batch_size=bad)
    prediction = runtime.predict(split.images)
    for k in (0, -1, 11, 2.0):
        with pytest.raises(SpecError, match=r"top-k must be 1\.\.10"):
            prediction.top_k(k)
    assert prediction.top_k(10)[0].shape == (8, 10)
    assert_one_line_error(run_cli("predict", artifact_dir, image, "--top-k", "11"), 2,
                          "top-k must be 1..10")  # fmt: skip
    assert_one_line_error(run_cli("predict", artifact_dir, image, "--top-k", "0"), 2, "--top-k")


# --- Rule 3: non-finite weights never reach an artifact ------------------------------------


@pytest.fixture(scope="module")
def nan_state(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan")
    state = build_model().state_dict()
    state["model1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, folder / "nan.pt")
    np.savez(folder / "nan.npz", **{k: v.numpy() for k, v in state.items()})
    return folder


def test_nan_weights_are_refused_however_they_come_in(artifact_dir, nan_state, tmp_path,
                                                      data_dir):  # fmt: skip
    message = "model1.0.weight holds NaN or Inf"
    pt, npz = nan_state / "nan.pt", nan_state / "nan.npz"
    assert_one_line_error(run_cli("export", tmp_path / "x", "--checkpoint", pt), 2, message)
    assert_one_line_error(run_cli("export", tmp_path / "x", "--checkpoint", npz), 2, message)
    assert not (tmp_path / "x").exists()
    assert_one_line_error(run_cli("check", artifact_dir, "--checkpoint", pt), 2, message)
    assert_one_line_error(run_cli("eval", artifact_dir, "--weights", npz), 2, "NaN or Inf")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(build_model(), pt)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        open_artifact(artifact_dir, weights=npz)
    # a training checkpoint to resume, and an artifact whose own weights file was replaced
    state = torch.load(pt, weights_only=True)
    resume = tmp_path / "resume.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": state, "optimizer": {},
                "config": TrainConfig(limit=256).to_dict(), "history": []}, resume)  # fmt: skip
    result = run_cli("train", "--data-dir", data_dir, "--resume", resume, "--out", resume)
    assert_one_line_error(result, 2, message)
    shipped = copy_with_eager_weights_changed(
        artifact_dir, tmp_path / "art", lambda w: w["model1.2.weight"].__setitem__(0, np.inf)
    )
    assert_one_line_error(run_cli("eval", shipped, "--limit", "8"), 2, "NaN or Inf")
    assert_one_line_error(run_cli("check", shipped, "--limit", "8"), 2, "NaN or Inf")


# --- Rule 4: a loss receives the input form it is defined on, in training too ---------------


@pytest.mark.parametrize("loss", ["nll", "kl_div(reduction=batchmean)"])
def test_losses_of_log_probabilities_train_on_log_probabilities(loss, tmp_path, data_dir):
    out = tmp_path / "c.pt"
    result = run_cli("train", "--data-dir", data_dir, "--loss", loss, "--limit", "512",
                     "--holdout", "128", "--epochs", "2", "--out", out,
                     "--log-json", tmp_path / "log.jsonl")  # fmt: skip
    assert result.exit_code == 0, result.output
    epochs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(0 <= e["train_loss"] < 10 for e in epochs), epochs
    spec = parse_loss_spec(loss)
    model = build_model()
    images = torch.rand(4, 3, 32, 32)
    target = torch.tensor([1, 2, 3, 4])
    if spec.name == "kl_div":
        target = torch.nn.functional.one_hot(target, 10).float()
    _, value = reference_module(fused_graph(spec, MODEL), model)(images, target)
    log_probs = torch.log_softmax(model(images), 1)
    if spec.name == "nll":
        expected = torch.nn.functional.nll_loss(log_probs, target)
    else:
        expected = torch.nn.functional.kl_div(log_probs, target, reduction="batchmean")
    torch.testing.assert_close(value, expected)


def test_the_divergence_guard_catches_a_loss_below_its_floor():
    nll = parse_loss_spec("nll")
    _check_in_range(0.0, nll, 0, 1, 0.02)
    _check_in_range(-1e-7, nll, 0, 1, 0.02)  # float rounding of a zero loss
    for value in (-17482.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(TrainingDiverged, match="training diverged at step 1"):
            _check_in_range(value, nll, 0, 1, 0.02)
    _check_in_range(-3.0, parse_loss_spec("nll(weight=[-1,1,1,1,1,1,1,1,1,1])"), 0, 1, 0.02)


# --- Rule 5 (what the matrix does not walk): edits that agree with each other -----------------


def test_a_loss_edited_consistently_in_the_manifest_is_caught_by_the_graph(artifact_dir,
                                                                           tmp_path):  # fmt: skip
    folder = tmp_path / "art"
    folder.mkdir()
    for path in artifact_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in [manifest["losses"][0], *(g["loss"] for g in manifest["graphs"] if g["loss"])]:
        if entry["name"] == "ce":
            entry["options"]["label_smoothing"] = 0.1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    message = "the manifest's loss is not what the graph was exported with"
    for command in ("eval", "check"):
        assert_one_line_error(run_cli(command, folder, "--limit", "8"), 2, message)
    with pytest.raises(LossxError, match=message):
        open_artifact(folder).evaluate(load_packaged_sample().head(8))


# --- Rule 6: nothing is left behind, whatever the interruption ------------------------------


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("signum", "exit_code", "message"),
    [(signal.SIGTERM, 143, "terminated (SIGTERM)"), (signal.SIGINT, 130, "interrupted")],
)
def test_an_interrupted_export_leaves_nothing(tmp_path, signum, exit_code, message):
    process = subprocess.Popen(
        [sys.executable, "-m", "lossx.cli", "export", tmp_path / "art", "--init", "random"],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stderr:
        if line.startswith("exporting model.onnx"):
            break
    time.sleep(1)  # inside torch.onnx, which wraps exceptions in its own
    process.send_signal(signum)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == exit_code, rest
    assert rest.strip().splitlines()[-1] == f"Error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_exports_leftovers_are_removed_by_the_next(tmp_path):
    dead = _finished_pid()
    for name in (f".art.{dead}-x1.partial", f".art.{dead}-x2.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"half")
    alive = tmp_path / f".art.{os.getpid()}-x3.partial"  # a write still running: kept
    alive.mkdir()
    assert run_cli("export", tmp_path / "art", "--init", "random", "--loss", "ce").exit_code == 0
    assert _hidden(tmp_path) == [alive.name]


def _finished_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_read_only_destinations_are_refused_before_any_work(tmp_path):
    for empty in (True, False):
        folder = tmp_path / f"ro-{empty}"
        folder.mkdir()
        if not empty:
            (folder / "manifest.json").write_text("{}")
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            started = time.perf_counter()
            _one_line(_cli("export", folder), 2, "is read-only; refusing to replace it")
            assert time.perf_counter() - started < 5
        finally:
            folder.chmod(stat.S_IRWXU)
        assert _hidden(tmp_path) == [] and sorted(p.name for p in folder.iterdir()) == (
            [] if empty else ["manifest.json"]
        )


def test_output_paths_are_checked_before_the_work(artifact_dir, tmp_path, data_dir):
    nowhere = tmp_path / "nodir" / "out"
    cases = [
        (["check", artifact_dir, "--report-json"], "--report-json"),
        (["check", artifact_dir, "--junit-xml"], "--junit-xml"),
        (["check", artifact_dir, "--markdown"], "--markdown"),
        (["check", artifact_dir, "--repro"], "--repro"),
        (["eval", artifact_dir, "--json"], "--json"),
        (["train", "--data-dir", data_dir, "--out"], "--out"),
        (["train", "--data-dir", data_dir, "--log-json"], "--log-json"),
    ]
    for command, option in cases:
        started = time.perf_counter()
        result = run_cli(*command, nowhere)
        assert_one_line_error(result, 2, f"Invalid value for '{option}'")
        assert f"folder {nowhere.parent} does not exist" in result.stderr
        assert "compared" not in result.stderr and result.stdout == ""
        assert time.perf_counter() - started < 5
        result = run_cli(*command, tmp_path)  # a folder where a file is expected
        assert_one_line_error(result, 2, "Invalid value")
        assert "is a folder" in result.stderr or "is a directory" in result.stderr


def test_train_never_overwrites_an_unrelated_file(tmp_path, data_dir, seeded_train_artifact_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    weights_only = tmp_path / "w.npz"
    np.savez(weights_only, x=np.zeros(3))
    state_dict = tmp_path / "s.pt"
    torch.save(build_model().state_dict(), state_dict)
    for engine, out in (("torch", notes), ("torch", weights_only), ("torch", state_dict),
                        ("onnxruntime", notes), ("onnxruntime", weights_only),
                        ("onnxruntime", state_dict)):  # fmt: skip
        artifact = [seeded_train_artifact_dir] if engine == "onnxruntime" else []
        result = run_cli("train", *artifact, "--engine", engine, "--data-dir", data_dir,
                         "--limit", "256", "--epochs", "1", "--out", out)  # fmt: skip
        assert_one_line_error(result, 2, "refusing to overwrite it")
    assert notes.read_text() == "keep me"


# --- Rule 7: files are recognised by content, and never block -------------------------------


def test_checkpoints_are_read_by_content_not_name(tmp_path, artifact_dir):
    state = {k: v.numpy() for k, v in build_model(seed=5).state_dict().items()}
    disguised = tmp_path / "weights.pt"
    with disguised.open("wb") as f:
        np.savez(f, **state)
    model = build_model()
    load_checkpoint(model, disguised)
    assert all(np.array_equal(v.numpy(), state[k]) for k, v in model.state_dict().items())
    torch_file = tmp_path / "state.npz"
    torch.save(build_model().state_dict(), torch_file)
    load_checkpoint(build_model(), torch_file)
    assert_one_line_error(run_cli("eval", artifact_dir, "--weights", torch_file), 2,
                          "a torch checkpoint, not an .npz of weights")  # fmt: skip


def test_fifos_are_refused_not_read(tmp_path, artifact_dir):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for command in (["predict", artifact_dir, fifo], ["eval", artifact_dir, "--weights", fifo],
                    ["check", artifact_dir, "--checkpoint", fifo]):  # fmt: skip
        _one_line(_cli(*command, timeout=60), 2, "is not a regular file")


# --- Rule 8: messages say what is wrong ------------------------------------------------------


def test_messages_name_the_real_problem(tmp_path, artifact_dir, data_dir, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(run_cli("eval", a_file), 2, "is a file, not a folder")
    assert_one_line_error(run_cli("eval", artifact_dir, "--data-dir", a_file), 2,
                          "is a file, not a folder")  # fmt: skip
    for command in (["export", ""], ["eval", ""], ["predict", artifact_dir, ""]):
        assert_one_line_error(run_cli(*command), 2, "an empty path")
    result = run_cli("train", "--data-dir", data_dir, "--out", tmp_path / "nodir" / "x.pt")
    assert_one_line_error(result, 2, "folder")
    assert "does not exist" in result.stderr
    runtime = open_artifact(artifact_dir)
    with pytest.raises(DataError, match="got a numpy float32 scalar, not an array"):
        runtime.loss("ce", logits=np.float32(1), labels=np.zeros(1, np.int64))
    with pytest.raises(LossxError, match="expected a path, got NoneType"):
        open_artifact(None)
    with pytest.raises(DataError, match="expected an ImageSet"):
        runtime.evaluate(None)
    result = run_cli("eval", artifact_dir, "--limit", "1")
    assert "packaged sample: CIFAR-10 test images 0-0\n" in result.stdout
    for usage in (["eval", artifact_dir, "--split", "nosuch"], ["export"], ["nosuch"]):
        result = run_cli(*usage)
        assert result.exit_code == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--help)" in result.stderr


def test_export_into_the_current_empty_directory(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run_cli("export", ".", "--init", "random", "--loss", "ce")
    assert result.exit_code == 0, result.output
    assert (here / "manifest.json").is_file() and _hidden(here) == []
    load_artifact(here)
    again = run_cli("export", ".", "--init", "random", "--loss", "ce")
    assert_one_line_error(again, 2, "is the current directory")


def test_bad_values_are_reported_before_torch_is_imported(tmp_path, artifact_dir, data_dir):
    """A torch that cannot be imported: every bad value must be reported first, at once."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch imported too early')")
    (fake / "onnxscript").mkdir()
    (fake / "onnxscript" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO / 'src'}"}
    cases = [
        (["export", tmp_path / "x", "--loss", "ce(label_smoothing=2)"], "out of range"),
        (["export", tmp_path / "x", "--loss", "nosuch"], "unknown loss"),
        (["export", tmp_path / "x", "--input-grad"], "needs --train"),
        (["export", tmp_path / "x", "--checkpoint", tmp_path / "none.pt"], "does not exist"),
        (["export", artifact_dir.parent], "not a lossx artifact"),
        (["check", artifact_dir, "--atol", "nan"], "finite"),
        (["check", artifact_dir, "--atol-for", "nosuch=1"], "no graph has an output"),
        (["check", tmp_path / "none"], "does not exist"),
        (["check", artifact_dir, "--batch-size", "0"], "'--batch-size'"),
        (["train", "--data-dir", data_dir, "--epochs", "0"], "'--epochs': 0 is not in the range"),
        (["train", "--data-dir", data_dir, "--lr", "nan"], "lr must be"),
        (["train", "--data-dir", data_dir, "--loss", "ce(reduction=none)"], "no scalar loss"),
        (["train", "--data-dir", tmp_path / "none"], "does not exist"),
        (["train", "--data-dir", data_dir, "--resume", tmp_path / "none.pt"], "does not exist"),
        (["train", "--data-dir", data_dir, "--limit", "10", "--holdout", "10"], "holdout"),
    ]
    for command, message in cases:
        started = time.perf_counter()
        _one_line(_cli(*command, env=env), 2, message)
        assert time.perf_counter() - started < 5, command


# --- Rule 9: the repro file reruns as it says ------------------------------------------------


def test_the_repro_snippet_runs(artifact_dir, tmp_path):
    broken = copy_with_eager_weights_changed(
        artifact_dir, tmp_path / "art", lambda w: w["model1.8.bias"].__setitem__(0, 5.0)
    )
    repro = tmp_path / "case.npz"
    result = run_cli("check", broken, "--limit", "16", "--repro", repro)
    assert result.exit_code == 1
    with np.load(repro) as case:
        about = str(case["about"])
        onnx_outputs = {k: case[k] for k in case.files if k.startswith("onnx.")}
    snippet = about.split("Rerun it in Python:\n", 1)[1]
    assert len(snippet.splitlines()) == 2
    script = snippet.splitlines()[0] + "\nprint(repr(" + snippet.splitlines()[1] + "[0].tolist()))"
    rerun = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           cwd=tmp_path.parent, timeout=60)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    first = next(iter(onnx_outputs.values()))
    np.testing.assert_array_equal(np.array(eval(rerun.stdout)), first)


# --- Rule 10: what the README and the output say is what a user gets -------------------------


def test_export_prints_each_files_whole_sha256(tmp_path):
    result = run_cli("export", tmp_path / "a", "--init", "random", "--loss", "ce")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        assert f"sha256 {info['sha256']}" in result.stdout, name


def test_predict_json_is_valid_utf8_for_any_file_name(artifact_dir, image, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    odd.write_bytes(image.read_bytes())
    result = _cli("predict", artifact_dir, odd, "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    name = payload["predictions"][0]["file"]
    assert name.endswith("caf\\xe9.png")
    name.encode("utf-8")  # no lone surrogates


def test_adamw_has_its_own_default_learning_rate():
    assert TrainConfig().lr == 0.02
    assert TrainConfig(optimizer="adamw").lr == 0.003
    assert TrainConfig(optimizer="adamw", lr=0.01).lr == 0.01
    assert TrainConfig.from_dict(TrainConfig(optimizer="adamw").to_dict()).lr == 0.003


def test_the_quick_starts_outputs_are_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "art/" in ignored and "trained.npz" in ignored


# --- Rule 10: a model that computes NaN has no classes and no accuracy -----------------------


def test_logits_that_are_not_numbers_are_an_error_wherever_they_are_read(artifact_dir, image,
                                                                         tmp_path):  # fmt: skip
    broken = copy_with_nan_logits(artifact_dir, tmp_path / "nan")
    message = "model.onnx computes nan in logits (at index [0, 0]), not a number"
    assert_one_line_error(run_cli("eval", broken, "--limit", "8"), 2, message)
    assert_one_line_error(run_cli("predict", broken, image), 2, message)
    runtime = open_artifact(broken)
    with pytest.raises(ModelError, match="the model or its weights are broken"):
        runtime.predict(load_packaged_sample().images[:2])
    with pytest.raises(ModelError, match="not a number"):
        runtime.evaluate(load_packaged_sample().head(4))
    # against eager PyTorch the ONNX graph is wrong: a parity failure, named
    result = run_cli("check", broken, "--limit", "8")
    assert_one_line_error(result, 1, "parity failed for")
    assert "model/logits" in result.stderr


# --- Rule 11: a file declares no more than it holds, and no image is decoded without limit -----


def test_npy_headers_that_promise_more_than_the_file_holds_are_refused(artifact_dir, tmp_path):
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**15,)}
    )
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as archive:
        archive.writestr("model1.0.weight.npy", header.getvalue() + b"\0" * 16)
    message = "declares [1000000000000000] float32 (4,000,000,000,000,000 bytes) but it holds 16"
    assert_one_line_error(run_cli("eval", artifact_dir, "--weights", bomb), 2, message)
    assert_one_line_error(run_cli("export", tmp_path / "x", "--checkpoint", bomb), 2, message)
    shipped = tmp_path / "shipped"
    shutil.copytree(artifact_dir, shipped)
    shutil.copy(bomb, shipped / "weights.npz")
    rehash(shipped, "weights.npz")
    assert_one_line_error(run_cli("eval", shipped), 2, message)


def test_an_image_over_the_pixel_cap_is_refused_before_it_is_decoded(artifact_dir, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (10_000, 10_000)).save(huge)  # 100 megapixels, a few kB of PNG
    result = _cli("predict", artifact_dir, huge)
    _one_line(result, 2, "10,000x10,000 is 100,000,000 pixels, more than the 89,478,485")
    assert "DecompressionBombWarning" not in result.stderr


def test_predict_prints_one_line_per_file_whatever_its_name(artifact_dir, image, tmp_path):
    odd = tmp_path / "two\nlines\t.png"
    odd.write_bytes(image.read_bytes())
    result = run_cli("predict", artifact_dir, odd, image)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "two\\nlines\\t.png" in lines[0]
    assert json.loads(run_cli("predict", artifact_dir, odd, "--json").stdout)["predictions"][0][
        "file"
    ].endswith("two\nlines\t.png")  # JSON escapes it itself


def test_a_pinned_sha256_must_be_64_hex_digits(artifact_dir):
    for value in ("zz", "ab" * 31, "g" * 64, ""):
        for command in ("eval", "check", "predict"):
            args = [command, artifact_dir, "--require-sha256", value]
            args += ["x.png"] if command == "predict" else []
            assert_one_line_error(run_cli(*args), 2, "a sha256 is 64 hex digits")
        with pytest.raises(SpecError, match="64 hex digits"):
            load_artifact(artifact_dir, value)


def test_outputs_that_cannot_be_created_are_refused_before_the_work(tmp_path, data_dir):
    """/proc is writable to root by its mode bits, yet no file can be made there: the check
    makes one, rather than asking os.access."""
    started = time.perf_counter()
    for option, path in (("--write-plan", "/proc/plan.npz"), ("--out", "/proc/c.pt"),
                         ("--log-json", "/proc/log.jsonl")):  # fmt: skip
        _one_line(_cli("train", "--data-dir", data_dir, option, path), 2, "cannot write")
    _one_line(_cli("export", "/proc/art"), 2, "no folder can be made in /proc")
    assert time.perf_counter() - started < 15


def test_calibration_data_is_checked_before_torch_is_imported(tmp_path):
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch imported too early')")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{REPO / 'src'}"}
    empty = tmp_path / "empty"
    empty.mkdir()
    not_cifar = tmp_path / "not-cifar" / "cifar-10-batches-py"
    not_cifar.mkdir(parents=True)
    (not_cifar / "data_batch_1").write_text("hello")
    few = tmp_path / "few" / "cifar-10-batches-py"
    few.mkdir(parents=True)
    sample = load_packaged_sample()
    batch = {"data": sample.images[:3].transpose(0, 3, 1, 2).reshape(3, 3072),
             "labels": sample.labels[:3].tolist()}  # fmt: skip
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (few / name).write_bytes(pickle.dumps(batch, protocol=2))
    for folder, message in ((empty, "not a dataset lossx reads"),
                            (not_cifar.parent, "not a CIFAR-10 batch"),
                            (few.parent, "holds 15 training images; int8 calibration reads 15 of "
                                         "them, at least 256")):  # fmt: skip
        result = _cli("export", tmp_path / "x", "--precision", "int8", "--calibration-data",
                      folder, env=env)  # fmt: skip
        _one_line(result, 2, message)
        assert "test_batch" not in result.stderr
