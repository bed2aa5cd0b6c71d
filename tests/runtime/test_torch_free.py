"""lossx.runtime, lossx.training, lossx.compare and `lossx eval` work where importing torch or
torchvision fails."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from lossx.runtime import evaluate

BLOCK_TORCH = """
import importlib.abc, sys
class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, BlockTorch())
"""

EVALUATE = """
import json
from pathlib import Path
from lossx.runtime import evaluate, load_artifact, load_cifar10
data_dir = None if sys.argv[2] == "-" else Path(sys.argv[2])
result = evaluate(load_artifact(sys.argv[1]), load_cifar10(data_dir, "test"), batch_size=100)
assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules)
print(json.dumps(result.to_dict()))
"""

CLI_EVAL = """
from lossx.cli import main
main(["eval", sys.argv[1], "--json", "-"], standalone_mode=True)
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + script, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_torch_is_really_blocked():
    done = _run("import torch")
    assert done.returncode != 0 and "torch is blocked" in done.stderr


IMPORT_ALL = """
import importlib, pkgutil
import lossx.compare, lossx.runtime, lossx.training
for package in (lossx.runtime, lossx.training, lossx.compare):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
import lossx.cli
assert not any(m.split(".")[0] in ("torch", "torchvision", "onnxscript") for m in sys.modules)
print("imported")
"""


def test_every_runtime_training_and_compare_module_imports_without_torch():
    done = _run(IMPORT_ALL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"


def test_runtime_evaluates_without_torch(artifact, artifact_dir, cifar_dir, test_split):
    done = _run(EVALUATE, str(artifact_dir), str(cifar_dir) if cifar_dir else "-")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = evaluate(artifact, test_split, batch_size=100)
    assert result["images"] == 1000
    assert result["top1_accuracy"] == expected.top1_accuracy
    assert result["losses"] == pytest.approx(expected.losses, rel=1e-12)


CLI_PREDICT = """
from lossx.cli import main
main(["predict", sys.argv[1], sys.argv[2], "--json"], standalone_mode=True)
"""


def test_cli_predict_runs_without_torch(artifact_dir, test_split, tmp_path):
    Image.fromarray(test_split.images[0]).save(tmp_path / "cat.png")
    done = _run(CLI_PREDICT, str(artifact_dir), str(tmp_path / "cat.png"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predictions"][0]["file"] == str(tmp_path / "cat.png")


def test_cli_eval_runs_without_torch(artifact_dir):
    done = _run(CLI_EVAL, str(artifact_dir))
    assert done.returncode == 0, done.stderr
    assert '"top1_accuracy"' in done.stdout
