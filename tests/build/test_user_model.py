"""A user's own model by import path (`--model MODULE:ATTR`, `export_artifact(model=...)`):
export, check against the eager model rebuilt from the manifest, train with the torch engine,
and a one-line refusal for each way the import path can be wrong."""

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from lossx.build import export_artifact
from lossx.build.models import build_model
from lossx.errors import SpecError
from lossx.runtime import load_artifact
from lossx.training.checkpoints import STATE_KEY
from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.conftest import require_shared, shared_cifar10_dir

RESNET_STYLE = '''
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """BatchNorm, functional ReLU, a residual addition, a strided conv with a 1x1 shortcut,
    adaptive average pooling: what lossx's registry does not have."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, images):
        x = F.relu(self.bn(self.stem(images)))
        x = F.relu(self.down(x) + self.shortcut(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def make():
    return Net()


NOT_A_MODEL = 3
'''


SIZED = '''
from torch import nn


class Net(nn.Module):
    """A model whose constructor takes arguments: its width and how it pools."""

    def __init__(self, width=8, pool="max"):
        super().__init__()
        pooling = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), pooling,
                                  nn.Flatten(), nn.Linear(width, 10))

    def forward(self, images):
        return self.body(images)
'''


FOLDED = '''
from torch import nn


class Net(nn.Module):
    """GroupNorm's initial affine (ones and zeros) and a zero conv bias: values torch.onnx's
    optimizer folds into constants."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 10)
        nn.init.zeros_(self.conv.bias)

    def forward(self, images):
        return self.head(self.norm(self.conv(images)).mean((2, 3)))
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")
    (folder / "lossx_user_net.py").write_text(RESNET_STYLE)
    (folder / "lossx_user_broken.py").write_text("import nosuchpackage_xyz\n")
    (folder / "lossx_user_sized.py").write_text(SIZED)
    (folder / "lossx_user_folded.py").write_text(FOLDED)
    (folder / "lossx_user_shape.py").write_text(
        "from torch import nn\nclass Wide(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.fc = nn.Linear(3 * 32 * 32, 11)\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1))\n"
    )
    return folder


def test_a_users_model_exports_checks_and_trains(project, tmp_path, monkeypatch):
    require_shared(shared_cifar10_dir())
    monkeypatch.chdir(project)
    out = tmp_path / "art"
    result = run_cli("export", out, "--model", "lossx_user_net:Net", "--init", "random",
                     "--seed", "3", "--loss", "ce", "--loss", "mse", "--train")  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "lossx_user_net:Net"
    assert manifest["model_source"]["file"] == "lossx_user_net.py"
    assert len(manifest["model_source"]["sha256"]) == 64
    assert manifest["weights"] == {"file": "weights.npz", "source": "seed", "seed": 3}
    result = run_cli("check", out, "--limit", "64")
    assert result.exit_code == 0, result.output
    assert "model lossx_user_net:Net with the artifact's weights.npz" in result.stdout
    assert "train_ce/next.bn.running_var" in result.stdout  # gradients and statistics checked
    # the torch engine trains it as ONNX Runtime does, and its checkpoint exports
    checkpoint = tmp_path / "net.pt"
    data = shared_cifar10_dir()
    recipe = ["--data-dir", data, "--limit", "448", "--holdout", "64", "--epochs", "1", "--seed",
              "3"]  # fmt: skip
    result = run_cli("train", "--model", "lossx_user_net:Net", *recipe, "--out", checkpoint)
    assert result.exit_code == 0, result.output
    result = run_cli("train", out, "--engine", "onnxruntime", *recipe, "--out", tmp_path / "o.npz")
    assert result.exit_code == 0, result.output
    torch_log = torch.load(checkpoint, weights_only=True)["history"][0]
    with np.load(tmp_path / "o.npz") as npz:
        ort_log = json.loads(str(npz[STATE_KEY]))["history"][0]
        assert int(npz["bn.num_batches_tracked"]) == 6
    assert abs(ort_log["train_loss"] - torch_log["train_loss"]) < 1e-4  # 6 steps
    assert abs(ort_log["eval_loss"] - torch_log["eval_loss"]) < 1e-4
    trained = tmp_path / "trained"
    result = run_cli("export", trained, "--model", "lossx_user_net:Net", "--checkpoint",
                     checkpoint, "--loss", "ce")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert load_artifact(trained).manifest.weights["trained"]["engine"] == "torch"


def test_check_refuses_a_model_whose_source_changed(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    (project / "lossx_user_edit.py").write_text(RESNET_STYLE)
    out = tmp_path / "art"
    assert run_cli("export", out, "--model", "lossx_user_edit:make", "--init", "random",
                   "--loss", "ce").exit_code == 0  # fmt: skip
    (project / "lossx_user_edit.py").write_text(RESNET_STYLE + "\n# edited\n")
    assert_one_line_error(run_cli("check", out), 2, "lossx_user_edit.py changed since")
    monkeypatch.chdir(tmp_path)  # the module is not importable from here
    monkeypatch.delitem(__import__("sys").modules, "lossx_user_edit")
    result = run_cli("check", out)
    assert_one_line_error(result, 2, "cannot rebuild the eager model the artifact records")
    assert "cannot import lossx_user_edit: ModuleNotFoundError" in result.stderr
    assert "run lossx from the folder that holds lossx_user_edit.py" in result.stderr
    # check --model names the eager model when the module moved
    (tmp_path / "lossx_user_moved.py").write_text(RESNET_STYLE)
    result = run_cli("check", out, "--model", "lossx_user_moved:Net", "--limit", "16")
    assert result.exit_code == 0, result.output
    assert "model lossx_user_moved:Net (--model) with the artifact's weights.npz" in result.stdout
    result = run_cli("check", out, "--model", "tudui")
    assert_one_line_error(result, 2, "weights do not fit the model: missing model1.0.weight")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("lossx_user_broken:Net", "cannot import lossx_user_broken: ModuleNotFoundError"),
        ("lossx_user_nosuch:Net", "cannot import lossx_user_nosuch: ModuleNotFoundError"),
        ("lossx_user_net:Nope", "lossx_user_net has no attribute 'Nope'"),
        ("lossx_user_net:NOT_A_MODEL", "int is not a model"),
        ("lossx_user_net:", "write MODULE:ATTR"),
        ("no/such:Net", "write MODULE:ATTR"),
        ("nosuch", "unknown model 'nosuch'"),
    ],
)
def test_a_bad_model_is_one_line(project, tmp_path, monkeypatch, model, message):
    monkeypatch.chdir(project)
    started = time.perf_counter()
    result = run_cli("export", tmp_path / "x", "--model", model, "--init", "random")
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "x").exists()
    with pytest.raises(SpecError, match="model"):
        build_model(model)
    assert time.perf_counter() - started < 10


def test_a_model_of_other_classes_gets_them_named(project, tmp_path, monkeypatch):
    """11 logits are 11 classes: named by their indices unless --class-names names them, and
    refused when --class-names names another count."""
    monkeypatch.chdir(project)
    model = ["--model", "lossx_user_shape:Wide", "--init", "random", "--loss", "ce"]
    result = run_cli("export", tmp_path / "x", *model)
    assert result.exit_code == 0, result.output
    assert load_artifact(tmp_path / "x").manifest.class_names == tuple(map(str, range(11)))
    names = ",".join(f"c{i}" for i in range(10))
    refused = run_cli("export", tmp_path / "y", *model, "--class-names", names)
    assert_one_line_error(refused, 2, "--class-names names 10 classes; --model lossx_user_shape")
    assert not (tmp_path / "y").exists()


def test_export_takes_a_model_instance(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    model = build_model("lossx_user_net:make", seed=7)
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    manifest = export_artifact(tmp_path / "art", model=model, losses=["ce"])
    assert manifest.model == "lossx_user_net:Net"
    assert manifest.weights == {"file": "weights.npz", "source": "model"}
    shipped = load_artifact(tmp_path / "art").state_dict()["head.bias"]
    assert (shipped == 0.25).all()
    with pytest.raises(SpecError, match=r"expected an nn\.Module instance"):
        export_artifact(tmp_path / "other", model=nn.Linear)


def test_constructor_arguments_are_recorded_and_rebuilt(project, tmp_path, monkeypatch):
    """--model-arg KEY=VALUE: Python literals given to the constructor, recorded in the
    manifest, and used again by check to rebuild the same model."""
    require_shared(shared_cifar10_dir())
    monkeypatch.chdir(project)
    out, model = tmp_path / "art", ["--model", "lossx_user_sized:Net"]
    result = run_cli("export", out, *model, "--model-arg", "width=4", "--model-arg",
                     "pool='avg'", "--init", "random", "--loss", "ce", "--train")  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_args"] == {"width": 4, "pool": "avg"}
    assert load_artifact(out).state_dict()["body.0.weight"].shape == (4, 3, 3, 3)
    result = run_cli("check", out, "--limit", "64")
    assert result.exit_code == 0, result.output
    narrower = run_cli("check", out, *model, "--model-arg", "width=2", "--limit", "8")
    assert_one_line_error(narrower, 2, "body.0.weight")
    assert_one_line_error(run_cli("check", out, "--model-arg", "width=4"), 2, "goes with --model")
    checkpoint = tmp_path / "c.pt"
    train = ["train", "--data-dir", shared_cifar10_dir(), *model, "--limit", "64",
             "--batch-size", "32", "--epochs", "1", "--out", checkpoint]  # fmt: skip
    result = run_cli(*train, "--model-arg", "width=4")
    assert result.exit_code == 0, result.output
    assert torch.load(checkpoint, weights_only=True)["config"]["model_args"] == {"width": 4}
    resumed = run_cli(*train[:-4], "--epochs", "2", "--model-arg", "width=6",
                      "--resume", checkpoint, "--out", checkpoint)  # fmt: skip
    assert_one_line_error(resumed, 2, "--model-arg {'width': 6} (it has {'width': 4})")


@pytest.mark.parametrize(
    "item, message",
    [
        ("width", "write KEY=VALUE"),
        ("2width=3", "write KEY=VALUE"),
        ("width=wide", "is not a Python literal (quote a string: width='wide')"),
        ("width=__import__('os')", "is not a Python literal"),
        ("width=1j", "a complex cannot be recorded in the manifest"),
        ("width=float('nan')", "is not a Python literal"),
        ("depth=3", "unexpected keyword argument 'depth'"),
    ],
)
def test_a_bad_constructor_argument_is_one_line(project, tmp_path, monkeypatch, item, message):
    monkeypatch.chdir(project)
    result = run_cli("export", tmp_path / "art", "--model", "lossx_user_sized:Net",
                     "--model-arg", item, "--init", "random")  # fmt: skip
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "art").exists()


def test_weights_torch_onnx_would_fold_into_constants_can_be_replaced(
    project, tmp_path, monkeypatch
):
    """Weights torch.onnx's optimizer folds into constants when they are initializers (a zero
    bias, GroupNorm's ones) keep their names: other weights run, equal to eager PyTorch's."""
    monkeypatch.chdir(project)
    out = tmp_path / "art"
    result = run_cli("export", out, "--model", "lossx_user_folded:Net", "--init", "random",
                     "--loss", "ce")  # fmt: skip
    assert result.exit_code == 0, result.output
    weights = {k: v + np.float32(0.01) for k, v in load_artifact(out).state_dict().items()}
    np.savez(tmp_path / "other.npz", **weights)
    result = run_cli("eval", out, "--weights", tmp_path / "other.npz", "--limit", "8",
                     "--compare-eager")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "other.npz" in result.stdout and "PASS" in result.stdout
