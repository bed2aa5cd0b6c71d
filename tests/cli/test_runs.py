"""Long runs as a user meets them: a resumed run follows its checkpoint or says why not, one
process writes an output at a time, and progress shows where no terminal draws a bar."""

import json
import subprocess
import sys
import time

import pytest

from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.conftest import require_shared, shared_cifar10_dir

SHORT = ["--limit", "128", "--holdout", "64", "--epochs", "1", "--batch-size", "32"]


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def finished(request, data_dir, seeded_train_artifact_dir, tmp_path_factory):
    """A run of each engine that finished all its epochs: (engine arguments, checkpoint)."""
    engine = (
        ["--engine", "onnxruntime", seeded_train_artifact_dir] if request.param != "torch" else []
    )
    out = tmp_path_factory.mktemp("finished") / ("c.pt" if not engine else "c.npz")
    result = run_cli("train", *engine, "--data-dir", data_dir, *SHORT, "--out", out)
    assert result.exit_code == 0, result.output
    return engine, out


def test_resuming_a_finished_run_is_refused_and_writes_nothing(finished, data_dir, tmp_path):
    engine, checkpoint = finished
    target = tmp_path / f"x{checkpoint.suffix}"
    result = run_cli("train", *engine, "--data-dir", data_dir, "--resume", checkpoint,
                     "--out", target)  # fmt: skip
    assert_one_line_error(result, 2, "that run already finished (epoch 1 of 1); nothing to resume")
    assert "wrote" not in result.stdout and not target.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--epochs", "2"], "--epochs 2 (it has 1)"),
        (["--limit", "256", "--lr", "0.5"], "--limit 256 (it has 128), --lr 0.5 (it has 0.02)"),
        (["--seed", "3"], "--seed 3 (it has 0)"),
    ],
)
def test_a_resumed_run_refuses_options_its_checkpoint_overrides(finished, data_dir, tmp_path,
                                                                flags, named):  # fmt: skip
    engine, checkpoint = finished
    result = run_cli("train", *engine, "--data-dir", data_dir, "--resume", checkpoint, *flags,
                     "--out", tmp_path / f"x{checkpoint.suffix}")  # fmt: skip
    assert_one_line_error(result, 2, f"would change: {named}; leave them out")


def test_resume_names_the_model_the_user_gave_against_the_checkpoints(data_dir, tmp_path):
    partial = tmp_path / "partial.pt"
    args = ["--data-dir", data_dir, *SHORT[:4], "--epochs", "2"]
    result = run_cli("train", *args, "--out", partial, "--model", "resnet20", "--batch-size", "64")
    assert result.exit_code == 0, result.output
    payload = __import__("torch").load(partial, weights_only=True)
    payload["history"] = payload["history"][:1]  # as if stopped after its first epoch
    __import__("torch").save(payload, partial)
    result = run_cli("train", "--data-dir", data_dir, "--resume", partial, "--model", "tudui",
                     "--out", tmp_path / "x.pt")  # fmt: skip
    assert_one_line_error(result, 2, "--model tudui (it has resnet20)")
    # the same options as the checkpoint's are no conflict: the run continues and says so
    result = run_cli("train", "--data-dir", data_dir, "--resume", partial, "--model", "resnet20",
                     "--epochs", "2", "--out", tmp_path / "x.pt")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote " in result.stdout and "epoch 2/2" in result.stdout
    assert (tmp_path / "x.pt").exists()


def test_a_checkpoint_whose_log_is_not_a_list_is_refused(finished, data_dir, tmp_path):
    engine, checkpoint = finished
    odd = tmp_path / f"odd{checkpoint.suffix}"
    if engine:  # the onnxruntime engine's state: JSON inside the .npz
        import numpy as np

        from lossx.training.checkpoints import STATE_KEY

        with np.load(checkpoint) as npz:
            arrays = {k: npz[k] for k in npz.files}
        state = json.loads(str(arrays[STATE_KEY]))
        arrays[STATE_KEY] = np.array(json.dumps({**state, "history": 5}))
        np.savez(odd, **arrays)
    else:
        import torch

        payload = torch.load(checkpoint, weights_only=True)
        torch.save({**payload, "history": 5}, odd)
    result = run_cli("train", *engine, "--data-dir", data_dir, "--resume", odd,
                     "--out", tmp_path / f"x{checkpoint.suffix}")  # fmt: skip
    assert_one_line_error(result, 2, "its log of epochs is not a list")


def _train_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lossx.cli", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_second_writer_of_the_same_output_is_refused(data_dir, tmp_path):
    out = tmp_path / "same.pt"
    first = _train_process("--data-dir", data_dir, "--limit", "4096", "--epochs", "1", "--out", out)
    lock = tmp_path / ".same.pt.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lock.read_text().strip() == str(first.pid)
    second = run_cli("train", "--data-dir", data_dir, "--limit", "64", "--epochs", "1",
                     "--out", out)  # fmt: skip
    assert_one_line_error(second, 2, f"same.pt is being written by another process right now "
                                     f"(pid {first.pid})")  # fmt: skip
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert f"wrote {out}" in stdout
    assert not lock.exists()  # removed by its holder
    # an export into a folder another export is writing: refused in one line
    first = subprocess.Popen([sys.executable, "-m", "lossx.cli", "export", tmp_path / "art",
                              "--init", "random", "--loss", "ce"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = tmp_path / ".art.lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.05)
    second = run_cli("export", tmp_path / "art", "--init", "random", "--loss", "ce")
    assert_one_line_error(second, 2, "art is being written by another process right now")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert (tmp_path / "art" / "manifest.json").is_file() and not lock.exists()


def test_progress_shows_every_ten_seconds_without_a_terminal(data_dir, tmp_path, monkeypatch):
    """Where stderr is a pipe (CI logs), a progress line replaces the bar."""
    import lossx.cli.progress

    monkeypatch.setattr(lossx.cli.progress, "PROGRESS_SECONDS", 0.0)
    result = run_cli("train", "--data-dir", data_dir, *SHORT, "--out", tmp_path / "c.pt",
                     "--log-json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch 1: ")]
    assert lines[-1].startswith("epoch 1: 64/64 images (100%), ")
    assert lines[-1].endswith(" images/s")
    # --log-json -: stdout holds the JSON lines alone, the epoch lines go to stderr
    log = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in log] == [1]
    assert "epoch   1/1" in result.stderr and "epoch   1/1" not in result.stdout


def test_train_draws_its_curve_when_the_run_ends(tmp_path):
    require_shared(shared_cifar10_dir())
    picture = tmp_path / "curve.png"
    result = run_cli("train", "--data-dir", shared_cifar10_dir(), *SHORT, "--out",
                     tmp_path / "c.pt", "--curve-png", picture)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {picture}: the training curve" in result.stderr
    assert picture.read_bytes().startswith(b"\x89PNG")
    refused = run_cli("train", "--data-dir", shared_cifar10_dir(), *SHORT, "--curve-png", "-")
    assert_one_line_error(refused, 2, "'-' (stdout) cannot take a picture")
