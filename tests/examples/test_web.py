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

from lossx.runtime import load_packaged_sample, open_artifact
from lossx.runtime.cifar10 import CONTRACT
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
             steps: int | None = None, files: list[Path] = (),
             sample: Path | None = None) -> dict:  # fmt: skip
    """Serve the artifact, drive the page, return what it reported (files land in `out`)."""
    serve = [node, str(EXAMPLE / "serve.js"), str(artifact), "--port", "0"]
    if plan:
        serve += ["--plan", str(plan)]
    if sample:
        serve += ["--sample", str(sample)]
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
        ["logits"], {"images": CONTRACT.to_model_input(load_packaged_sample().images)}
    )
    return logits


@pytest.mark.parametrize("steps", [4, 16, "adamw4"])
def test_page_classifies_and_trains(browser, training_plan, shipped_train_artifact_dir,
                                    shipped_artifact, tmp_path, steps):  # fmt: skip
    plan = training_plan["folder"] / (
        f"plan{steps}.npz" if steps != "adamw4" else "plan_adamw4.npz"
    )
    results = run_page(browser, shipped_train_artifact_dir, tmp_path, plan)
    assert results["precision"] == "fp32"
    got = np.array(results["classify"]["logits"], dtype=np.float32)
    want = python_logits(shipped_artifact)
    assert np.abs(got - want).max() <= LOGITS_ATOL
    assert (got.argmax(axis=1) == want.argmax(axis=1)).all()
    labels = load_packaged_sample().labels
    assert results["classify"]["accuracy"] == pytest.approx((want.argmax(axis=1) == labels).mean())
    assert results["train"]["steps"] == (4 if steps == "adamw4" else steps)
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


# --- the server serves the validated artifact and nothing else, and never falls over --------


def _serve(node: str, artifact: Path, *extra: str) -> subprocess.Popen:
    command = [node, str(EXAMPLE / "serve.js"), str(artifact), "--port", "0", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _get(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    """`path` sent as it is (no client-side normalising or escaping)."""
    import http.client

    host, port = address.removeprefix("http://").strip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_server_refuses_an_artifact_python_refuses(browser, shipped_artifact, tmp_path):
    from tests.examples.test_node import _edited_manifest, _outside

    cases = {
        "outside": (lambda: _edited_manifest(shipped_artifact.path, tmp_path / "o", _outside),
                    'file name "../../../../etc/passwd" is not a plain file name'),
        "malformed": (lambda: _malformed(shipped_artifact.path, tmp_path / "m"),
                      "manifest.json is not valid JSON"),
        "grown": (lambda: _changed(shipped_artifact.path, tmp_path / "g", grow=True),
                  "weights.npz: {size:,} bytes, the manifest says {listed:,}"),
        "changed": (lambda: _changed(shipped_artifact.path, tmp_path / "c", grow=False),
                    "weights.npz: sha256"),
    }  # fmt: skip
    listed = (shipped_artifact.path / "weights.npz").stat().st_size
    for make, message in cases.values():
        server = _serve(browser, make())
        stdout, stderr = server.communicate(timeout=60)
        assert server.returncode == 2, stderr
        assert stdout == "" and len(stderr.strip().splitlines()) == 1
        assert message.format(size=listed + 1, listed=listed) in stderr


def _malformed(artifact: Path, target: Path) -> Path:
    shutil.copytree(artifact, target)
    (target / "manifest.json").write_text('{"format": "lossx-artifact", ')
    return target


def _changed(artifact: Path, target: Path, grow: bool) -> Path:
    shutil.copytree(artifact, target)
    data = bytearray((target / "weights.npz").read_bytes())
    data[-100] ^= 0xFF
    (target / "weights.npz").write_bytes(data + (b"\0" if grow else b""))
    return target


def test_the_server_answers_hostile_paths_and_stays_up(browser, shipped_artifact, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(shipped_artifact.path, served)
    (tmp_path / "secret.txt").write_text("not for the page")
    server = _serve(browser, served)
    try:
        address = server.stdout.readline().strip()
        assert address.startswith("http://127.0.0.1:"), server.stderr.read()
        status, body = _get(address, "/artifact/weights.npz")
        assert status == 200 and body == (served / "weights.npz").read_bytes()
        for path, expected in [
            ("/artifact/..%2fsecret.txt", 404),
            ("/artifact/..%2F..%2F..%2F..%2Fetc%2Fpasswd", 404),
            ("/artifact/%2e%2e/secret.txt", 404),
            ("/artifact/../secret.txt", 404),
            ("/%E0%A4%A", 400),
            ("/artifact/%ZZ", 400),
            ("/artifact/model.onnx%00", 404),
            ("/ort/..%2f..%2fpackage.json", 404),
            ("/lib/..%2fclassify.js", 404),
            ("/artifact/", 404),
        ]:
            status, body = _get(address, path)
            assert status == expected, (path, status, body)
            assert b"not for the page" not in body
        assert _get(address, "/", "POST")[0] == 405
        # changes to the folder after start-up reach no one: the checked bytes are served
        (served / "weights.npz").write_bytes(b"changed")
        (served / "extra.bin").write_bytes(b"extra")
        assert _get(address, "/artifact/weights.npz")[1] != b"changed"
        assert _get(address, "/artifact/extra.bin")[0] == 404
        assert server.poll() is None  # still serving
        assert _get(address, "/artifact/manifest.json")[0] == 200
    finally:
        server.terminate()
        server.wait(timeout=10)
