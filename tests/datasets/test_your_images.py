"""A user's classifier and images: a 5-class 64x64 model with mean/std normalisation, on an
image folder built here from real CIFAR-10 images (PNG and JPEG, upscaled to 64x64, a few of
other sizes, a corrupt file and a stray text file), through export, check, eval, train with
both engines, predict and the Node.js example."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from lossx.errors import DataError
from lossx.runtime import load_artifact, load_dataset
from lossx.runtime.cifar10 import CLASS_NAMES
from lossx.runtime.contract import contract_for
from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.examples.test_node import EXAMPLE
from tests.examples.test_web import LOGITS_ATOL, run_page

CLASSES = CLASS_NAMES[:5]  # airplane, automobile, bird, cat, deer: already in sorted order
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
MODEL = ["--model", "tests.datasets.your_model:TinyNet", "--model-arg", "num_classes=5"]
CONTRACT_OPTIONS = ["--input-shape", "3,64,64", "--mean", "0.49,0.48,0.45",
                    "--std", "0.25,0.24,0.26"]  # fmt: skip
ODD_SIZES = {3: (48, 40), 7: (80, 64)}  # test files of other sizes, stretched by the contract


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_class: int) -> list:
    """root/<class>/<n>.png|.jpg from CIFAR-10 images of the first five classes, upscaled to
    64x64 (Pillow bilinear); returns (path, label) in the order torchvision lists them."""
    written, counts = [], dict.fromkeys(range(5), 0)
    for image, label in zip(images, labels, strict=True):
        if label >= 5 or counts[label] == per_class:
            continue
        index = counts[label]
        counts[label] += 1
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        size = ODD_SIZES.get(index, (64, 64))
        picture = Image.fromarray(image).resize(size, Image.Resampling.BILINEAR)
        path = folder / f"{index:03d}.{'png' if index % 2 == 0 else 'jpg'}"
        picture.save(path, quality=90) if path.suffix == ".jpg" else picture.save(path)
        written.append((path, int(label)))
    return sorted(written)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, train_subset, test_split):
    root = tmp_path_factory.mktemp("photos")
    write_folder(root / "train", train_subset.images, train_subset.labels, 40)
    test_files = write_folder(root / "test", test_split.images, test_split.labels, 20)
    (root / "test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (root / "test" / "cat" / "notes.txt").write_text("not an image")
    return root, test_files


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("yours") / "art"
    result = run_cli("export", out, *MODEL, *CONTRACT_OPTIONS, "--class-names", ",".join(CLASSES),
                     "--init", "random", "--train", "--loss", "ce")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "images: RGB 64x64, 5 classes" in result.stdout
    return out


def test_the_manifest_records_the_contract(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["class_names"] == list(CLASSES)
    pre = manifest["preprocessing"]
    assert pre["input"] == {"dtype": "uint8", "layout": "HWC", "channels": 3, "height": 64,
                            "width": 64, "color": "RGB"}  # fmt: skip
    assert (pre["mean"], pre["std"], pre["resize"]) == (list(MEAN), list(STD), "stretch")
    model = next(g for g in manifest["graphs"] if g["kind"] == "model")
    assert model["inputs"][0]["shape"] == ["N", 3, 64, 64]
    assert model["outputs"][0]["shape"] == ["N", 5]
    assert manifest["model_args"] == {"num_classes": 5}


def _independent_logits(artifact_dir: Path, files: list) -> np.ndarray:
    """The pipeline written out with Pillow, numpy and onnxruntime alone."""
    pixels = []
    for path, _ in files:
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR)))
    x = np.stack(pixels).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)
    x = (x - np.float32(MEAN).reshape(1, 3, 1, 1)) / np.float32(STD).reshape(1, 3, 1, 1)
    session = ort.InferenceSession(str(artifact_dir / "model.onnx"))
    return session.run(None, {"images": x.astype(np.float32)})[0]


def test_eval_on_the_folder_equals_an_independent_pipeline(exported, folder):
    root, files = folder
    result = run_cli("eval", exported, "--data-dir", root, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["eval"]
    logits = _independent_logits(exported, files)
    labels = np.array([label for _, label in files])
    assert report["images"] == len(files) == 100
    assert report["top1_accuracy"] == float(np.mean(logits.argmax(1) == labels))
    assert report["class_names"] == list(CLASSES)
    skipped = {Path(s["file"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.txt"}
    assert "skipped files" in result.stderr and "2 (the first:" in result.stderr


def test_strict_refuses_the_corrupt_file(exported, folder):
    root, _ = folder
    result = run_cli("eval", exported, "--data-dir", root, "--strict")
    assert_one_line_error(result, 2, "notes.txt: not an image file")


def test_check_passes_on_the_folder(exported, folder):
    root, _ = folder
    result = run_cli("check", exported, "--data-dir", root, "--limit", "48")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout


def test_cifar10_data_is_refused_for_other_classes(exported, cifar_dir):
    result = run_cli("eval", exported)
    assert_one_line_error(result, 2, "has classes [airplane, automobile, bird, cat, deer, dog")


def test_predict_takes_files_and_folders(exported, folder):
    root, files = folder
    result = run_cli("predict", exported, root / "test" / "bird", files[0][0], "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)["predictions"]
    birds = sorted(p for p, label in files if label == 2)
    assert [p["file"] for p in predictions] == [str(p) for p in birds] + [str(files[0][0])]
    logits = _independent_logits(exported, [(p, 2) for p in birds])
    got = [p["top_k"][0]["index"] for p in predictions[:-1]]
    assert got == logits.argmax(1).tolist()


def test_both_engines_train_on_the_folder_alike(exported, folder, tmp_path):
    root, _ = folder
    recipe = ["--epochs", "1", "--batch-size", "20", "--limit", "100", "--seed", "0"]
    torch_run = run_cli("train", "--data-dir", root, *MODEL, *CONTRACT_OPTIONS, *recipe,
                        "--out", tmp_path / "t.pt")  # fmt: skip
    assert torch_run.exit_code == 0, torch_run.output
    ort_run = run_cli("train", exported, "--engine", "onnxruntime", "--data-dir", root, *recipe,
                      "--out", tmp_path / "o.npz", "--threads", "2")  # fmt: skip
    assert ort_run.exit_code == 0, ort_run.output
    torch_state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert torch_state["config"]["class_names"] == CLASSES  # the folder's, recorded
    with np.load(tmp_path / "o.npz") as trained:
        for name, value in torch_state["model"].items():
            want = value.numpy()
            # tests/training/test_ort_engine.py's bound: float rounding over a few steps left
            # the weights within 1.05e-4 of each tensor's largest |weight| (measured), x10
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(trained[name], want, rtol=0, atol=1e-3 * scale)
    # the checkpoint records the contract: exporting it needs no contract options
    again = tmp_path / "again"
    result = run_cli("export", again, *MODEL, "--checkpoint", tmp_path / "t.pt", "--loss", "ce")
    assert result.exit_code == 0, result.output
    assert load_artifact(again).contract == load_artifact(exported).contract


def test_node_gives_python_logits_on_the_same_pixels(exported, folder, tmp_path):
    node = shutil.which("node")
    assert node is not None
    root, files = folder
    artifact = load_artifact(exported)
    data = load_dataset(root, "test", artifact.contract)
    npz = tmp_path / "test.npz"
    np.savez(npz, images=data.images, labels=data.labels)
    command = [node, str(EXAMPLE / "classify.js"), str(exported), "--data", str(npz), "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    got = np.array(json.loads(result.stdout)["logits"])
    (want,) = artifact.session("model").run(
        ["logits"], {"images": artifact.contract.to_model_input(data.images)}
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # as test_node's fp32 check
    np.testing.assert_allclose(want, _independent_logits(exported, files), rtol=1e-5, atol=1e-5)


def test_the_browser_gives_python_logits_on_the_same_files(exported, folder, tmp_path):
    """The page reads the contract from the manifest: 64x64, five classes, mean/std. Files of
    the artifact's size keep every pixel through the canvas, so the logits match Python's within
    test_web's LOGITS_ATOL."""
    node = shutil.which("node")
    assert node is not None
    root, files = folder
    artifact = load_artifact(exported)
    data = load_dataset(root, "test", artifact.contract)
    np.savez(tmp_path / "sample.npz", images=data.images, labels=data.labels)
    picked = [path for path, _ in files if path.suffix == ".png"][:6]
    (tmp_path / "out").mkdir()
    results = run_page(
        node, exported, tmp_path / "out", files=picked, sample=tmp_path / "sample.npz"
    )
    want = artifact.session("model").run(
        ["logits"], {"images": artifact.contract.to_model_input(data.images)}
    )[0]
    classified = np.array(results["classify"]["logits"], dtype=np.float32)
    assert np.abs(classified - want).max() <= LOGITS_ATOL
    got = np.array([row["logits"] for row in results["files"]], dtype=np.float32)
    expected = _independent_logits(exported, [(p, 0) for p in picked])
    assert np.abs(got - expected).max() <= LOGITS_ATOL


def test_npz_datasets_and_class_name_checks(tmp_path, test_split):
    contract = contract_for((1, 16, 16), ("a", "b"))
    images = test_split.images[:6]
    np.savez(tmp_path / "grey.npz", images=images, labels=np.arange(6) % 2,
             class_names=np.array(["a", "b"]))  # fmt: skip
    data = load_dataset(tmp_path / "grey.npz", "test", contract)
    assert data.images.shape == (6, 16, 16, 1)
    expected = np.asarray(Image.fromarray(images[0]).convert("L").resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(data.images[0, :, :, 0], expected)
    np.savez(tmp_path / "other.npz", images=images, labels=np.zeros(6, int),
             class_names=np.array(["x", "y"]))  # fmt: skip
    with pytest.raises(DataError, match=r"has classes \[x, y\]; the model's are \[a, b\]"):
        load_dataset(tmp_path / "other.npz", "test", contract)
