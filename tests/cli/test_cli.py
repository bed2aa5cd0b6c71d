import json
import pickle
import shutil
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lossx.build import build_model
from lossx.cli import main
from lossx.compare.render import schema
from lossx.runtime import evaluate, load_artifact, load_packaged_sample, open_artifact
from lossx.runtime.artifact import sha256_of
from lossx.runtime.images import as_jpeg
from tests.conftest import copy_with_eager_weights_changed, require_shared


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, exit_code: int, message: str) -> None:
    """A handled error: the documented exit code, one `Error:` line last on stderr, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()  # progress labels may come first
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], result.stderr
    assert message in lines[-1]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def cli_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    result = run_cli("export", out)
    assert result.exit_code == 0, result.output
    wrote = f"wrote {out}: 7 graphs at opset 20, model fp32, each verified against eager PyTorch"
    assert wrote in result.stdout
    assert "exporting model.onnx" in result.stderr
    return out


def test_export_then_eval_round_trip(cli_artifact, tmp_path, test_split, cifar_dir):
    data = ["--data-dir", cifar_dir] if cifar_dir else []
    result = run_cli("eval", cli_artifact, *data, "--json", tmp_path / "eval.json")
    assert result.exit_code == 0, result.output
    assert "images evaluated  1,000" in result.stdout
    assert "top-1 accuracy" in result.stdout
    assert "providers         cpu" in result.stdout
    figures = json.loads((tmp_path / "eval.json").read_text())
    expected = evaluate(load_artifact(cli_artifact), test_split)
    assert figures["eval"]["top1_accuracy"] == expected.top1_accuracy
    assert figures["eval"]["losses"] == pytest.approx(expected.losses, rel=1e-9)
    assert f"{expected.top1_accuracy:.2%}" in result.stdout
    assert figures["parity"] is None


def test_eval_session_options(cli_artifact, test_split):
    result = run_cli(
        "eval", cli_artifact, "--threads", "1", "--optimization", "basic", "--json", "-"
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["eval"]
    expected = evaluate(load_artifact(cli_artifact), load_packaged_sample())
    assert figures["top1_accuracy"] == expected.top1_accuracy
    assert figures["losses"] == pytest.approx(expected.losses, rel=1e-5)
    bad = run_cli("eval", cli_artifact, "--optimization", "max")
    assert bad.exit_code == 2 and "Invalid value for '--optimization'" in bad.stderr


def test_eval_draws_the_confusion_matrix_it_reports(cli_artifact, tmp_path):
    picture = tmp_path / "confusion.png"
    result = run_cli("eval", cli_artifact, "--limit", "100", "--confusion-png", picture,
                     "--json", tmp_path / "eval.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {picture}: the confusion matrix" in result.stderr
    confusion = json.loads((tmp_path / "eval.json").read_text())["eval"]["confusion"]
    assert sum(map(sum, confusion)) == 100
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 10 * 40
    for bad in ("-", tmp_path / "missing" / "c.png"):
        refused = run_cli("eval", cli_artifact, "--confusion-png", bad)
        assert refused.exit_code == 2 and "--confusion-png" in refused.stderr


def test_eval_without_data_dir_uses_the_packaged_sample(cli_artifact):
    result = run_cli("eval", cli_artifact, "--limit", "50", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    assert "packaged sample: CIFAR-10 test images 0-49\n" in result.stdout
    assert "images evaluated  50" in result.stdout


def test_eval_jpeg_quality_scores_the_jpeg_copies(cli_artifact, test_split):
    result = run_cli("eval", cli_artifact, "--limit", "100", "--jpeg-quality", "75", "--json", "-")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["eval"]
    expected = evaluate(load_artifact(cli_artifact), as_jpeg(test_split.head(100), 75))
    assert figures["top1_accuracy"] == expected.top1_accuracy
    assert figures["data"].endswith("test images 0-99, as JPEG quality 75 (Pillow)")
    bad = run_cli("eval", cli_artifact, "--jpeg-quality", "100")
    assert bad.exit_code == 2 and "Invalid value for '--jpeg-quality'" in bad.stderr


def test_eval_compare_eager_reports_every_graph(cli_artifact, tmp_path):
    result = run_cli("eval", cli_artifact, "--compare-eager", "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    assert "profile fp32-cpu" in result.stdout
    parity = json.loads((tmp_path / "e.json").read_text())["parity"]
    jsonschema.Draft202012Validator(schema()).validate(parity)  # lossx check's report format
    assert parity["passed"] is True
    assert len(parity["outputs"]) == 10
    assert {o["tolerance"]["atol"] for o in parity["outputs"]} == {2e-5}
    assert result.stdout.count(" ok") == 10


def test_eval_compare_eager_fails_with_exit_1_on_a_mismatch(cli_artifact, tmp_path):
    def perturb(weights):
        weights["model1.0.weight"][0, 0, 0, 0] += np.float32(0.5)

    copy = copy_with_eager_weights_changed(cli_artifact, tmp_path / "art", perturb)
    result = run_cli("eval", copy, "--compare-eager", "--limit", "64")
    assert_one_line_error(result, 1, "parity failed for 7 of 10 outputs, worst model/logits")
    assert "FAIL" in result.stdout


@pytest.mark.parametrize("args", [["--atol", "nan"], ["--rtol", "inf"], ["--atol", "-1"]])
def test_eval_refuses_a_meaningless_tolerance_before_any_work(cli_artifact, args):
    result = run_cli("eval", cli_artifact, "--compare-eager", *args)
    assert_one_line_error(result, 2, "must be a finite number >= 0")
    assert "top-1 accuracy" not in result.stdout


def test_json_to_stdout(cli_artifact):
    result = run_cli("eval", cli_artifact, "--limit", "10", "--json", "-")
    assert result.exit_code == 0, result.output
    payload = result.stdout[result.stdout.index("{") :]
    assert json.loads(payload)["eval"]["images"] == 10


def _pickle_payload_dir(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "test_batch").write_bytes(pickle.dumps({"data": Payload(), "labels": []}))
    return tmp_path / "data"


def _damaged_copy(cli_artifact, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(cli_artifact, copy)
    damage(copy)
    return copy


def _truncate_and_rehash(copy):
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes()[:5000])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"]["sha256"] = sha256_of(copy / "model.onnx")
    manifest["files"]["model.onnx"]["bytes"] = (copy / "model.onnx").stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))


EVAL_ERRORS = {
    "missing dir": (lambda a, t: [t / "nope"], 2, "does not exist"),
    "empty dir": (lambda a, t: [t], 2, "no manifest.json; not a lossx artifact"),
    "sha256 mismatch": (
        lambda a, t: [
            _damaged_copy(a, t, lambda c: (c / "loss_l1.onnx").write_bytes(b"\x00" * 10))
        ],
        2,
        "loss_l1.onnx: sha256 does not match the manifest",
    ),
    "truncated onnx": (
        lambda a, t: [_damaged_copy(a, t, _truncate_and_rehash)],
        2,
        "model.onnx: ONNX Runtime cannot load it",
    ),
    "data dir without batches": (
        lambda a, t: [a, "--data-dir", t],
        2,
        "not a dataset lossx reads; give CIFAR-10 batches, an image folder",
    ),
    "pickle payload": (
        lambda a, t: [a, "--data-dir", _pickle_payload_dir(t)],
        2,
        "refused to load builtins.print",
    ),
    "train split without data dir": (lambda a, t: [a, "--split", "train"], 2, "test images only"),
    "atol without compare": (lambda a, t: [a, "--atol", "1"], 2, "only with --compare-eager"),
    "batch size 0": (lambda a, t: [a, "--batch-size", "0"], 2, "--batch-size"),
}


@pytest.mark.parametrize("case", EVAL_ERRORS)
def test_eval_bad_input(cli_artifact, tmp_path, monkeypatch, case):
    args, code, message = EVAL_ERRORS[case]
    result = run_cli("eval", *args(cli_artifact, tmp_path))
    if code == 2 and result.exit_code == 2 and "Usage:" in result.stderr:  # click usage errors
        assert message in result.stderr and "Traceback" not in result.output
        return
    assert_one_line_error(result, code, message)
    assert "payload ran" not in result.output


def test_eval_cuda_without_cuda_exits_3(cli_artifact, monkeypatch):
    from lossx.runtime import session

    monkeypatch.setattr(session.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = run_cli("eval", cli_artifact, "--provider", "cuda")
    assert_one_line_error(result, 3, "provider 'cuda' requested")


def _checkpoint(tmp_path, state):
    torch.save(state, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


EXPORT_ERRORS = {
    "unknown loss": (lambda t: ["--loss", "focal"], "unknown loss 'focal'"),
    "unknown option": (lambda t: ["--loss", "mse(beta=1)"], "mse: unknown option 'beta'"),
    "out of range": (
        lambda t: ["--loss", "ce(label_smoothing=2)"],
        "label_smoothing=2 is out of range; expected >= 0 and <= 1",
    ),
    "weights": (lambda t: ["--loss", "nll(weight=[1, 2])"], "weights for 2 classes"),
    "twice": (lambda t: ["--loss", "ce", "--loss", "ce(reduction=sum)"], "loss ce given twice"),
    "old opset": (lambda t: ["--opset", "16"], "'--opset': 16 is not in the range 17<=x<=100"),
    "unknown model": (lambda t: ["--model", "vgg"], "unknown model 'vgg'"),
    "opset": (lambda t: ["--opset", "99"], "opset 99 is not supported"),
    "checkpoint keys": (
        lambda t: ["--checkpoint", _checkpoint(t, {"fc.weight": torch.zeros(1)})],
        "keys do not fit the model",
    ),
    "checkpoint shapes": (
        lambda t: [
            "--checkpoint",
            _checkpoint(t, {**build_model().state_dict(), "model1.7.bias": torch.zeros(3)}),
        ],
        "model1.7.bias has shape [3], the model needs [64]",
    ),
    "whole module": (
        lambda t: ["--checkpoint", _checkpoint(t, build_model())],
        "save model.state_dict() rather than the whole model",
    ),
    "missing checkpoint": (lambda t: ["--checkpoint", t / "none.pt"], "does not exist"),
}


@pytest.mark.parametrize("case", EXPORT_ERRORS)
def test_export_bad_input(tmp_path, case):
    args, message = EXPORT_ERRORS[case]
    result = run_cli("export", tmp_path / "out", *args(tmp_path))
    assert_one_line_error(result, 2, message)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = run_cli("export", tmp_path, "--loss", "ce")
    assert_one_line_error(result, 2, "not a lossx artifact; refusing to overwrite it")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_download_without_network_exits_3_and_leaves_nothing(cli_artifact, tmp_path):
    result = run_cli("eval", cli_artifact, "--data-dir", tmp_path / "cifar", "--download")
    assert_one_line_error(result, 3, "CIFAR-10 download into")
    assert not (tmp_path / "cifar").exists()


def test_console_script_reports_errors_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lossx.cli", "eval", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"Error: artifact directory {tmp_path / 'missing'} does not exist"


def test_version():
    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout.startswith("lossx, version ")


def test_unwritable_json_path_is_a_one_line_error(cli_artifact, tmp_path):
    result = run_cli("eval", cli_artifact, "--limit", "5", "--json", tmp_path / "no" / "e.json")
    assert_one_line_error(result, 2, "cannot write")


def test_compare_eager_without_torch_is_an_environment_error(cli_artifact, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    result = run_cli("eval", cli_artifact, "--limit", "5", "--compare-eager")
    assert_one_line_error(result, 3, "--compare-eager needs torch")


def test_export_with_loss_specs_records_the_options(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "export",
        out,
        "--loss",
        "ce(label_smoothing=0.1, reduction=sum)",
        "--loss",
        "kl_div",
        "--opset",
        "17",
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 5 graphs at opset 17" in result.stdout
    assert "Setting ONNX exporter" not in result.stderr  # torch.onnx's notes stay quiet
    manifest = json.loads((out / "manifest.json").read_text())
    ce = manifest["losses"][0]
    assert ce["name"] == "ce"
    assert (ce["options"]["label_smoothing"], ce["options"]["reduction"]) == (0.1, "sum")
    assert manifest["losses"][1] == {
        "name": "kl_div",
        "options": {"reduction": "mean", "log_target": False},
    }
    result = run_cli("eval", out, "--limit", "50", "--json", "-")
    figures = json.loads(result.stdout)
    assert (
        "CrossEntropyLoss ce(label_smoothing=0.1, reduction=sum) of the logits"
        in (figures["eval"]["loss_definitions"]["ce"])
    )
    assert figures["eval"]["losses"]["ce"] > 50 * 0.1  # a sum over 50 images, not a mean


def test_losses_lists_every_loss_and_option():
    result = run_cli("losses")
    assert result.exit_code == 0
    for name in ("ce", "nll", "mse", "l1", "smooth_l1", "huber", "bce_logits", "kl_div"):
        assert f"\n{name} " in "\n" + result.stdout
    assert "label_smoothing  default 0" in result.stdout
    catalogue = json.loads(run_cli("losses", "--json").stdout)
    ce = next(loss for loss in catalogue if loss["name"] == "ce")
    assert ce["torch_class"] == "torch.nn.CrossEntropyLoss"
    assert {o["name"] for o in ce["options"]} == {
        "weight",
        "ignore_index",
        "label_smoothing",
        "reduction",
        "target",
    }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, test_split):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index in range(3):
        path = folder / f"image{index}.png"
        Image.fromarray(test_split.images[index]).save(path)
        paths.append(path)
    return paths


def test_predict_classifies_image_files(cli_artifact, image_files, test_split):
    result = run_cli("predict", cli_artifact, *image_files, "--top-k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    expected = open_artifact(cli_artifact).predict(test_split.images[:3])
    for line, path, best in zip(lines, image_files, expected.classes, strict=True):
        assert line.startswith(str(path))
        assert line.split()[1] == test_split.class_names[best]
    payload = json.loads(run_cli("predict", cli_artifact, *image_files, "--json").stdout)
    assert payload["providers"] == ["cpu"]
    first = payload["predictions"][0]
    assert first["file"] == str(image_files[0])
    assert first["top_k"][0]["index"] == expected.classes[0]
    assert first["top_k"][0]["probability"] == pytest.approx(
        expected.probabilities[0].max(), rel=1e-6
    )


def test_predict_refuses_a_file_that_is_not_an_image(cli_artifact, image_files, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    result = run_cli("predict", cli_artifact, image_files[0], tmp_path / "notes.txt")
    assert_one_line_error(result, 2, "notes.txt: not an image lossx can read")
    assert result.stdout == ""  # no partial output


@pytest.mark.parametrize("command", ["eval", "check", "predict"])
def test_require_sha256_pins_the_artifact(cli_artifact, image_files, command):
    extra = [image_files[0]] if command == "predict" else ["--limit", "20"]
    pinned = sha256_of(cli_artifact / "manifest.json")
    good = run_cli(command, cli_artifact, *extra, "--require-sha256", pinned)
    assert good.exit_code == 0, good.output
    bad = run_cli(command, cli_artifact, *extra, "--require-sha256", "0" * 64)
    assert_one_line_error(bad, 2, f"manifest.json: sha256 {pinned} is not the required 000")
    assert bad.stdout == ""


def test_export_prints_the_manifest_sha256(tmp_path):
    result = run_cli("export", tmp_path / "a", "--init", "random", "--loss", "ce")
    assert result.exit_code == 0, result.output
    assert f"manifest.json sha256 {sha256_of(tmp_path / 'a' / 'manifest.json')}" in result.stdout


@pytest.mark.parametrize("command", ["eval", "check"])
def test_a_batch_size_beyond_memory_fails_before_any_output(cli_artifact, command):
    result = run_cli(command, cli_artifact, "--batch-size", "100000000")
    assert_one_line_error(result, 2, "batch size 100,000,000 needs about 22,000.0 GB of memory")
    assert result.stdout == ""


def test_train_write_plan_writes_a_plan_and_trains_nothing(tmp_path, cifar_dir):
    require_shared(cifar_dir)
    plan = tmp_path / "plan.npz"
    result = run_cli("train", "--write-plan", plan, "--data-dir", cifar_dir, "--epochs", "1",
                     "--limit", "200", "--batch-size", "64")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {plan}: 4 steps, 200 images in batches of 64")
    with np.load(plan, allow_pickle=False) as npz:
        assert npz["batch_sizes"].tolist() == [64, 64, 64, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.npz"]  # no checkpoint


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "3"], "holds 150,000 images, more than 100,000"),
        (["--accumulate", "2"], "a plan records one batch per optimizer step"),
        (["--limit", "0"], "'--limit': 0 is not in the range x>=1"),
    ],
)
def test_train_write_plan_refusals_leave_nothing(tmp_path, cifar_dir, args, message):
    require_shared(cifar_dir)
    result = run_cli("train", "--write-plan", tmp_path / "p.npz", "--data-dir", cifar_dir, *args)
    assert_one_line_error(result, 2, message)
    assert list(tmp_path.iterdir()) == []


def test_parsing_options_imports_neither_numpy_nor_onnxruntime_nor_torch():
    """`--help` and bad usage answer at once: the command line imports its heavy libraries only
    in the commands that run."""
    code = (
        "import sys, lossx.cli\n"
        "heavy = {m.split('.')[0] for m in sys.modules}\n"
        "heavy &= {'numpy', 'onnxruntime', 'onnx', 'torch'}\n"
        "print(sorted(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
