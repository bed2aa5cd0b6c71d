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

from lossx.runtime import load_artifact, load_packaged_sample
from lossx.runtime.cifar10 import CONTRACT
from lossx.training.recipe import TrainConfig

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
    x = CONTRACT.to_model_input(sample.images)
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


# Weights of the JavaScript examples against `lossx train --engine onnxruntime`'s after the same
# plan: the largest element difference allowed, per runtime and number of steps. Measured, AMD
# EPYC (AVX-512) / Intel Xeon (AVX-512 VNNI): Node.js 1.2e-7 / 0.0 after 4 steps and 3.3e-7 /
# 3.3e-7 after 16 (onnxruntime-node runs the same CPU kernels); the browser's WASM kernels
# 3.6e-6 / 3.0e-8 and 3.4e-4 / 3.4e-4. The 16-step bound is what float rounding alone gives in
# this max-pool network: Python itself, started from weights perturbed by 1e-7 (relative), ends
# 3.4e-4 away, as argmax choices in the pools flip. The weights move 1.75e-2 in 16 steps.
# AdamW ("adamw4", 4 steps; both update with the artifact's optimizer graph) divides each
# gradient by its running root, so gradient elements at rounding's level (Python's training
# graph runs on NCHWc kernels, the examples' on the plain ones) move by up to the learning rate:
# measured 6.0e-6 (Node.js) and 1.2e-5 (browser) on an AMD EPYC (AVX2).
WEIGHTS_ATOL = {"node": {4: 2e-6, 16: 1e-3, "adamw4": 2e-5},
                "browser": {4: 2e-5, 16: 1e-3, "adamw4": 4e-5}}  # fmt: skip


def weight_difference(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want)
    return max(float(np.abs(got[k] - want[k]).max()) for k in want)


def check_trained(weights_file: Path, plan: dict, steps: int | str, runtime: str) -> float:
    """The largest difference from Python's weights after `steps` (4, 16 or "adamw4"),
    asserted within WEIGHTS_ATOL."""
    from lossx.runtime.weights import read_weights

    got = read_weights(weights_file)
    want = plan["weights"][steps]
    moved = weight_difference(want, plan["start"])
    difference = weight_difference(got, want)
    atol = WEIGHTS_ATOL[runtime][steps]
    assert moved > 10 * atol
    assert difference <= atol, (runtime, steps, difference)
    return difference


@pytest.mark.parametrize("steps", [4, 16, "adamw4"])
def test_node_training_reaches_python_weights(node, training_plan, shipped_train_artifact_dir,
                                              tmp_path, steps):  # fmt: skip
    out = tmp_path / "weights.npz"
    plan = training_plan["folder"] / (
        f"plan{steps}.npz" if steps != "adamw4" else "plan_adamw4.npz"
    )
    command = [node, str(EXAMPLE / "train.js"), str(shipped_train_artifact_dir), "--plan",
               str(plan), "--out", str(out), "--json"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["steps"] == len(report["losses"]) == (4 if steps == "adamw4" else steps)
    check_trained(out, training_plan, steps, "node")


def test_node_trains_the_head_alone_as_python_does(node, training_plan, cifar_dir, tmp_path):
    """An artifact whose training graph trains the last layer only (--trainable): train.js feeds
    the frozen weights as they are and updates the head as lossx train --engine onnxruntime."""
    from lossx.build.export import export_artifact
    from lossx.runtime.weights import read_weights
    from lossx.training.ort_engine import train as train_onnxruntime

    artifact = tmp_path / "head"
    export_artifact(artifact, losses=["ce"], train=True, trainable=("model1.8.*",))
    config = TrainConfig(epochs=1, batch_size=64, limit=256)  # plan4's recipe
    train_onnxruntime(load_artifact(artifact), cifar_dir, tmp_path / "python.npz", config)
    out = tmp_path / "node.npz"
    command = [node, str(EXAMPLE / "train.js"), str(artifact), "--plan",
               str(training_plan["folder"] / "plan4.npz"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    got, want = read_weights(out), read_weights(tmp_path / "python.npz")
    start = read_weights(artifact / "weights.npz")
    for name, value in want.items():
        assert np.array_equal(value, start[name]) != name.startswith("model1.8."), name
        assert np.abs(got[name] - value).max() <= WEIGHTS_ATOL["node"][4], name


def test_node_trained_weights_feed_lossx(node, training_plan, shipped_train_artifact_dir,
                                         tmp_path):  # fmt: skip
    """What train.js writes, lossx eval --weights and lossx export --checkpoint read."""
    from click.testing import CliRunner

    from lossx.cli import main

    out = tmp_path / "weights.npz"
    plan = training_plan["folder"] / "plan4.npz"
    command = [node, str(EXAMPLE / "train.js"), str(shipped_train_artifact_dir), "--plan",
               str(plan), "--out", str(out)]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    result = CliRunner().invoke(main, ["eval", str(shipped_train_artifact_dir), "--weights",
                                       str(out), "--json", str(tmp_path / "e.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "e.json").read_text())["eval"]
    assert figures["top1_accuracy"] > 0.7
    from lossx.runtime.artifact import sha256_of

    assert figures["weights"] == f"{out} (sha256 {sha256_of(out)})"  # eval says what it ran
    assert any(line.split()[:2] == ["weights", str(out)] for line in result.stdout.splitlines())
    result = CliRunner().invoke(main, ["export", str(tmp_path / "art"), "--checkpoint", str(out)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing-plan", "cannot read plan"),
        ("not-a-plan", "is not a lossx training plan"),
        ("no-train-graph", "no training graph for loss ce"),
    ],
)
def test_node_training_refusals(node, training_plan, shipped_artifact, shipped_train_artifact_dir,
                                tmp_path, change, message):  # fmt: skip
    artifact = shipped_train_artifact_dir
    plan = training_plan["folder"] / "plan4.npz"
    if change == "missing-plan":
        plan = tmp_path / "absent.npz"
    elif change == "not-a-plan":
        plan = tmp_path / "sample.npz"
        shutil.copy(EXAMPLE.parents[1] / "src/lossx/runtime/data/cifar10_test_subset.npz", plan)
    else:
        artifact = shipped_artifact.path
    out = tmp_path / "w.npz"
    command = [node, str(EXAMPLE / "train.js"), str(artifact), "--plan", str(plan),
               "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --- what the examples must not read, load, report or overwrite ----------------------------


def _one_line_refusal(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr


def _edited_manifest(artifact_dir: Path, target: Path, change) -> Path:
    shutil.copytree(artifact_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    change(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _outside(manifest: dict) -> None:
    manifest["files"]["../../../../etc/passwd"] = manifest["files"].pop("model.onnx")
    next(g for g in manifest["graphs"] if g["kind"] == "model")["file"] = "../../../../etc/passwd"


def test_node_reads_no_file_outside_the_artifact_nor_a_device(node, shipped_artifact,
                                                              tmp_path):  # fmt: skip
    outside = _edited_manifest(shipped_artifact.path, tmp_path / "outside", _outside)
    _one_line_refusal(classify(node, outside), 'file name "../../../../etc/passwd" is not a plain')
    linked = tmp_path / "linked"
    shutil.copytree(shipped_artifact.path, linked)
    (linked / "manifest.json").unlink()
    (linked / "manifest.json").symlink_to("/dev/zero")
    _one_line_refusal(classify(node, linked), "is not a regular file (a FIFO, socket or device)")
    _one_line_refusal(classify(node, shipped_artifact.path, "--data", "/dev/zero"),
                      "data file /dev/zero is not a regular file")  # fmt: skip
    (linked / "manifest.json").unlink()
    shutil.copy(shipped_artifact.path / "manifest.json", linked / "manifest.json")
    (linked / "model.onnx").unlink()
    (linked / "model.onnx").symlink_to(shipped_artifact.path / "model.onnx")
    _one_line_refusal(classify(node, linked), "refusing a link; artifact files must be regular")
    huge = tmp_path / "huge"
    shutil.copytree(shipped_artifact.path, huge)
    (huge / "manifest.json").write_bytes(b" " * (16 * 1024 * 1024 + 1))
    _one_line_refusal(classify(node, huge), "over the 16,777,216 an example reads")


def test_node_refuses_graphs_onnxruntime_cannot_load_or_the_manifest_does_not_list(
    node, shipped_artifact, tmp_path
):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    from tests.conftest import rehash

    external = tmp_path / "external"
    shutil.copytree(shipped_artifact.path, external)
    proto = onnx.load(external / "model.onnx")
    convert_model_to_external_data(proto, location="weights.bin", size_threshold=0)
    onnx.save(proto, external / "model.onnx")
    rehash(external, "model.onnx")
    _one_line_refusal(classify(node, external), "model.onnx: ONNX Runtime cannot load it")
    swapped = tmp_path / "swapped"
    shutil.copytree(shipped_artifact.path, swapped)
    shutil.copy(swapped / "loss_ce.onnx", swapped / "model.onnx")
    rehash(swapped, "model.onnx")
    _one_line_refusal(classify(node, swapped), "are not the ones the manifest lists")


def test_node_refuses_logits_that_are_not_numbers(node, shipped_artifact, tmp_path):
    from tests.conftest import copy_with_nan_logits

    broken = copy_with_nan_logits(shipped_artifact.path, tmp_path / "nan")
    _one_line_refusal(classify(node, broken), "model.onnx computes NaN in the logits of image 0")


def test_train_js_overwrites_only_weights_and_reads_no_device(node, training_plan,
                                                              shipped_train_artifact_dir,
                                                              tmp_path):  # fmt: skip
    plan = training_plan["folder"] / "plan4.npz"

    def train(out, plan=plan):
        command = [node, str(EXAMPLE / "train.js"), str(shipped_train_artifact_dir), "--plan",
                   str(plan), "--out", str(out)]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    source = tmp_path / "mine.py"
    source.write_text("print('my code')\n")
    _one_line_refusal(train(source), "exists and is not an .npz of weights; refusing to overwrite")
    assert source.read_text() == "print('my code')\n"
    _one_line_refusal(train(tmp_path), "it is a folder; give a file name")
    pipe = tmp_path / "pipe.npz"
    os.mkfifo(pipe)  # never opened: a FIFO would block the check
    _one_line_refusal(train(pipe), "it is not a regular file")
    pipe.unlink()
    _one_line_refusal(train(tmp_path / "no" / "w.npz"), "does not exist")
    _one_line_refusal(
        train(tmp_path / "w.npz", plan="/dev/zero"), "plan /dev/zero is not a regular"
    )
    weights = tmp_path / "w.npz"
    shutil.copy(shipped_train_artifact_dir / "weights.npz", weights)  # weights: overwritten
    result = train(weights)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.py", "w.npz"]  # no leftovers
