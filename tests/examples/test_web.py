"""examples/web: the page classifies and trains in a real browser tab (Debian's Chromium, headless,
driven by playwright-core) with onnxruntime-web's WASM backend, and reaches lossx's numbers."""

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lossx.runtime import load_packaged_sample, open_artifact, to_model_input
from tests.examples.test_node import check_trained

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "web"
CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get install -y chromium; (cd examples/web && npm ci --ignore-scripts)"
LOGITS_ATOL = 2e-5  # WASM against the Python runtime's logits; measured 7.6e-6 (fp32)
LOWER_PRECISION_ATOL = 1e-4  # the same for int8 and fp16 artifacts; measured 0.0 and 6.7e-6
PNG = base64.b64decode("iVBORw0KGgo=")


@pytest.fixture(scope="session")
def browser(tmp_path_factory) -> str:
    """The node binary, where Chromium, onnxruntime-web and playwright-core are installed."""
    node = shutil.which("node")
    missing = [what for what, ok in [
        ("node", node), ("chromium", CHROMIUM.exists()),
        ("onnxruntime-web", (EXAMPLE / "node_modules" / "onnxruntime-web").is_dir()),
        ("playwright-core", (EXAMPLE / "node_modules" / "playwright-core").is_dir()),
    ] if not ok]  # fmt: skip
    if not missing:
        return node
    reason = f"{', '.join(missing)} missing: {INSTALL}"
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the browser example: {reason}")
    pytest.skip(reason)


def run_page(node: str, artifact: Path, out: Path, plan: Path | None = None,
             steps: int | None = None, files: list[Path] = ()) -> dict:  # fmt: skip
    """Serve the artifact, drive the page, return what it reported (files land in `out`)."""
    serve = [node, str(EXAMPLE / "serve.js"), str(artifact), "--port", "0"]
    if plan:
        serve += ["--plan", str(plan)]
    server = subprocess.Popen(serve, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), server.stderr.read()
        drive = [node, str(EXAMPLE / "drive.js"), url, str(out)]
        if steps:
            drive += ["--steps", str(steps)]
        if files:
            drive += ["--files", ",".join(map(str, files))]
        result = subprocess.run(drive, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (out / "screenshot.png").read_bytes()[:8] == PNG
    return json.loads((out / "results.json").read_text())


def python_logits(artifact) -> np.ndarray:
    (logits,) = artifact.session("model").run(
        ["logits"], {"images": to_model_input(load_packaged_sample().images)}
    )
    return logits


@pytest.mark.parametrize("steps", [4, 16])
def test_page_classifies_and_trains(browser, training_plan, shipped_train_artifact_dir,
                                    shipped_artifact, tmp_path, steps):  # fmt: skip
    plan = training_plan["folder"] / f"plan{steps}.npz"
    results = run_page(browser, shipped_train_artifact_dir, tmp_path, plan)
    assert results["precision"] == "fp32"
    got = np.array(results["classify"]["logits"], dtype=np.float32)
    want = python_logits(shipped_artifact)
    assert np.abs(got - want).max() <= LOGITS_ATOL
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    labels = load_packaged_sample().labels
    assert results["classify"]["accuracy"] == pytest.approx((want.argmax(axis=1) == labels).mean())
    assert results["train"]["steps"] == steps
    check_trained(tmp_path / "weights.npz", training_plan, steps, "browser")


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_page_classifies_lower_precisions(browser, int8_artifact, fp16_artifact, tmp_path,
                                          precision):  # fmt: skip
    """The page says which precision it runs; its logits are ONNX Runtime's for that file.
    Measured against the Python runtime: int8 0.0 (identical), fp16 6.7e-6."""
    artifact = {"int8": int8_artifact, "fp16": fp16_artifact}[precision]
    results = run_page(browser, artifact.path, tmp_path)
    assert results["precision"] == precision and "train" not in results
    got = np.array(results["classify"]["logits"], dtype=np.float32)
    want = python_logits(artifact)
    assert np.abs(got - want).max() <= LOWER_PRECISION_ATOL
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()


def test_page_classifies_the_users_image_files(browser, shipped_artifact, tmp_path):
    """Files picked in the page's file chooser get lossx predict's classes. They are 32x32
    PNGs, so the browser's canvas resize keeps every pixel and the logits match within
    LOGITS_ATOL (measured: 3.3e-6)."""
    sample = load_packaged_sample()
    files = []
    for index in range(8):
        files.append(tmp_path / f"image{index}.png")
        Image.fromarray(sample.images[index]).save(files[-1])
    (tmp_path / "out").mkdir()
    results = run_page(browser, shipped_artifact.path, tmp_path / "out", files=files)
    got = results["files"]
    assert [row["file"] for row in got] == [f.name for f in files]
    want = open_artifact(shipped_artifact.path).predict_files(files).to_dict()["predictions"]
    assert [row["class"] for row in got] == [row["top_k"][0]["class"] for row in want]
    logits = np.array([row["logits"] for row in got], dtype=np.float32)
    assert np.abs(logits - python_logits(shipped_artifact)[:8]).max() <= LOGITS_ATOL
