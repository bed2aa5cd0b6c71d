"""`pip install lossx` without extras: the runtime and the CLI, no torch. eval, predict, losses
and train --engine onnxruntime work; export, check and --compare-eager stop with one line that
names the extra (exit 3)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, require_shared


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with lossx installed from this checkout, no extras."""
    root = tmp_path_factory.mktemp("runtime-install")
    source = root / "lossx"  # a copy: pip's in-tree build would leave build/ in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def lossx(venv: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "lossx"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def test_the_plain_install_has_no_torch(venv):
    probe = (
        "import importlib.util as u; "
        "print([m for m in ('torch', 'torchvision', 'onnxscript') if u.find_spec(m)])"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_eval_predict_and_losses_run(venv, artifact_dir, test_split, tmp_path):
    evaluated = lossx(venv, "eval", artifact_dir, "--limit", "100", "--json", tmp_path / "e.json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "top-1 accuracy" in evaluated.stdout
    Image.fromarray(test_split.images[3]).save(tmp_path / "image.png")
    predicted = lossx(venv, "predict", artifact_dir, tmp_path / "image.png", "--top-k", "3")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.count("%") == 3
    listed = lossx(venv, "losses")
    assert listed.returncode == 0 and "torch.nn.CrossEntropyLoss" in listed.stdout


def test_onnxruntime_training_runs(venv, seeded_train_artifact_dir, cifar_dir, tmp_path):
    require_shared(cifar_dir)
    out = tmp_path / "trained.npz"
    trained = lossx(
        venv, "train", seeded_train_artifact_dir, "--engine", "onnxruntime",
        "--data-dir", cifar_dir, "--epochs", "1", "--limit", "256", "--out", out,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert out.is_file()
    evaluated = lossx(venv, "eval", seeded_train_artifact_dir, "--weights", out, "--limit", "50")
    assert evaluated.returncode == 0, evaluated.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["export", "{tmp}/out"],
        ["check", "{artifact}"],
        ["eval", "{artifact}", "--compare-eager"],
        ["train", "--data-dir", "{tmp}"],
    ],
    ids=["export", "check", "compare-eager", "train-torch"],
)
def test_torch_commands_name_the_extra(venv, artifact_dir, tmp_path, args):
    args = [a.format(tmp=tmp_path, artifact=artifact_dir) for a in args]
    done = lossx(venv, *args)
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "pip install 'lossx[export]'" in done.stderr
    assert not (tmp_path / "out").exists()
