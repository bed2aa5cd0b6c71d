"""examples/node/classify.js: a Node.js app uses the artifact with onnxruntime-node alone.

Its logits and classes must match the Python runtime's on the packaged CIFAR-10 sample.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lossx.runtime import load_packaged_sample, to_model_input

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
INSTALL = "(cd examples/node && npm ci --ignore-scripts --no-audit --no-fund)"


@pytest.fixture(scope="session")
def node() -> str:
    """The node binary; CI must have node and onnxruntime-node, a user's clone may lack them.

    Tests list it before shipped_artifact, so a skip comes before the export.
    """
    found = shutil.which("node")
    if found is None:
        reason = f"node is not on PATH: install Node.js 20, then run {INSTALL}"
    elif not (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir():
        reason = f"onnxruntime-node is not installed: run {INSTALL}"
    else:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"CI needs the Node.js example: {reason}")
    pytest.skip(reason)


def classify(node: str, artifact_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [node, str(EXAMPLE / "classify.js"), str(artifact_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(params=["fp32", "int8", "fp16"])
def any_precision(request, shipped_artifact, int8_artifact, fp16_artifact):
    return {"fp32": shipped_artifact, "int8": int8_artifact, "fp16": fp16_artifact}[request.param]


def test_node_matches_python_runtime(node, any_precision):
    """The same app takes int8 and fp16 artifacts unchanged (float32 inputs and outputs)."""
    shipped_artifact = any_precision
    result = classify(node, shipped_artifact.path, "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)

    sample = load_packaged_sample()
    x = to_model_input(sample.images)
    (logits,) = shipped_artifact.session("model").run(["logits"], {"images": x})
    classes = logits.argmax(axis=1)

    assert got["images"] == len(sample.labels) == 1000
    np.testing.assert_array_equal(got["classes"], classes)
    # Different ONNX Runtime builds may order float sums differently: allow float32 rounding.
    np.testing.assert_allclose(np.array(got["logits"]), logits, rtol=1e-5, atol=1e-5)
    assert got["accuracy"] == float(np.mean(classes == sample.labels))
    assert got["onnxruntime_node"]
    assert got["precision"] == shipped_artifact.manifest.precision_name


def test_node_refuses_a_tampered_model(node, shipped_artifact, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(shipped_artifact.path, tampered)
    model = bytearray((tampered / "model.onnx").read_bytes())
    model[len(model) // 2] ^= 0xFF
    (tampered / "model.onnx").write_bytes(bytes(model))

    result = classify(node, tampered)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "sha256" in result.stderr
