"""`lossx train --engine onnxruntime`: training in ONNX Runtime with the optimizer's update
graph, checked against the torch engine, and the weights it writes read back by export, eval
and the API."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from lossx.build.export import export_artifact
from lossx.build.torch_engine import train as train_torch
from lossx.cli import main
from lossx.errors import CheckpointError, SpecError, TrainingDiverged
from lossx.runtime import load_artifact, open_artifact
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.options import SessionOptions
from lossx.training.checkpoints import STATE_KEY
from lossx.training.ort_engine import train as train_onnxruntime
from lossx.training.recipe import DEFAULT_LR, TrainConfig
from tests.runtime.test_torch_free import BLOCK_TORCH

SMALL = TrainConfig(epochs=2, batch_size=64, limit=512)  # 16 steps of the default recipe


@pytest.fixture(scope="module")
def train_artifact(seeded_train_artifact_dir):
    return seeded_train_artifact_dir


def _both_engines(data_dir, artifact_dir, config, tmp_path):
    curves = {"torch": [], "onnxruntime": []}
    torch_log = train_torch(data_dir, tmp_path / "t.pt", config,
                            on_step=lambda _, v: curves["torch"].append(v))  # fmt: skip
    ort_log = train_onnxruntime(
        load_artifact(artifact_dir),
        data_dir,
        tmp_path / "o.npz",
        config,
        on_step=lambda _, v: curves["onnxruntime"].append(v),
        options=SessionOptions(threads=2),
    )
    return curves, torch_log, ort_log


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_onnxruntime_training_reproduces_torch_training(data_dir, train_artifact, tmp_path, loss):
    """Measured over 16 steps (bench/train_parity.py, seeds 0 and 1, ce/mse/l1): per-step
    losses within 4.8e-7, test losses within 1.8e-7, final weights within 1.05e-4 of each
    tensor's largest |weight|, identical test accuracy. Asserted with about 10x margin."""
    config = replace(SMALL, loss=loss)
    curves, torch_log, ort_log = _both_engines(data_dir, train_artifact, config, tmp_path)
    assert len(curves["torch"]) == len(curves["onnxruntime"]) == 16
    np.testing.assert_allclose(curves["onnxruntime"], curves["torch"], rtol=0, atol=1e-5)
    assert curves["torch"][-1] < curves["torch"][0]  # it trained
    for mine, theirs in zip(ort_log, torch_log, strict=True):
        assert mine.lr == theirs.lr
        assert abs(mine.train_loss - theirs.train_loss) < 1e-5
        assert abs(mine.eval_loss - theirs.eval_loss) < 1e-5
        assert abs(mine.eval_accuracy - theirs.eval_accuracy) <= 0.002
    expected = torch.load(tmp_path / "t.pt", weights_only=True)["model"]
    with np.load(tmp_path / "o.npz") as got:
        for name, tensor in expected.items():
            reference = tensor.numpy()
            gap = np.abs(got[name] - reference).max() / np.abs(reference).max()
            assert gap < 1e-3, name


def test_adamw_in_onnxruntime_follows_torch_adamw(data_dir, train_artifact, tmp_path):
    """AdamW divides each gradient by the root of its running square (plus eps 1e-8), so a
    gradient element at float rounding's level (1e-10 in the seed CNN's Linear(1024, 64), where
    the two engines' gradients differ by 20%) takes a step of up to the learning rate. After
    one step the weights differ by at most 9.3e-10 (measured); over 16 steps the step losses
    drift apart by up to 1.1e-2 (SGD: 7e-7). Asserted: the first step's loss to 1e-5 (measured
    4.3e-6 over the first three), the drift to 0.05, both runs training alike."""
    config = replace(SMALL, optimizer="adamw", lr=DEFAULT_LR["adamw"])
    curves, torch_log, ort_log = _both_engines(data_dir, train_artifact, config, tmp_path)
    gaps = np.abs(np.array(curves["onnxruntime"]) - np.array(curves["torch"]))
    assert len(gaps) == 16 and gaps[0] < 1e-5 and gaps.max() < 0.05, gaps
    assert curves["torch"][-1] < curves["torch"][0] - 0.2  # it trained (measured 2.30 -> 1.96)
    assert abs(ort_log[-1].eval_loss - torch_log[-1].eval_loss) < 0.05
    assert abs(ort_log[-1].eval_accuracy - torch_log[-1].eval_accuracy) <= 0.03


def test_accumulated_batches_step_as_torch_does(data_dir, train_artifact, tmp_path):
    """--accumulate 4: one optimizer step per 4 batches of 16 (and one for the epoch's last
    batch), on the mean of their gradients. Measured: step losses 4.8e-7 apart over 17 batches,
    weights 4.2e-7 of each tensor's largest; asserted at 1e-5 and 1e-4."""
    config = replace(SMALL, epochs=1, batch_size=16, limit=17 * 16, accumulate=4)
    curves, _, _ = _both_engines(data_dir, train_artifact, config, tmp_path)
    gaps = np.abs(np.array(curves["onnxruntime"]) - np.array(curves["torch"]))
    assert len(gaps) == 17 and gaps.max() < 1e-5, gaps
    expected = torch.load(tmp_path / "t.pt", weights_only=True)
    assert len(expected["optimizer"]["state"]) == 10  # every parameter took steps
    with np.load(tmp_path / "o.npz") as got:
        assert json.loads(str(got[STATE_KEY]))["optimizer_steps"] == 5
        for name, tensor in expected["model"].items():
            reference = tensor.numpy()
            assert np.abs(got[name] - reference).max() / np.abs(reference).max() < 1e-4, name


def test_onnxruntime_trains_resnet20_as_torch_does(data_dir, resnet20_train_artifact_dir, tmp_path):
    """Batch norm's buffers carried from step to step (next.* back in as inputs). A deep net
    with batch norm amplifies float rounding: over these 16 steps the torch engine run with 1
    thread instead of 2 drifts from itself by up to 1.7e-2 in the step loss, and ONNX Runtime
    from torch by up to 1.8e-2 (measured). So the first two steps are held to 2e-5 (measured:
    4.8e-6), the rest to the drift torch shows against itself, times 3."""
    config = replace(SMALL, model="resnet20")
    curves, torch_log, ort_log = _both_engines(data_dir, resnet20_train_artifact_dir, config,
                                               tmp_path)  # fmt: skip
    gaps = np.abs(np.array(curves["onnxruntime"]) - np.array(curves["torch"]))
    assert len(gaps) == 16 and gaps[:2].max() < 2e-5 and gaps.max() < 0.05, gaps
    assert curves["torch"][-1] < curves["torch"][0] - 0.5  # it trained
    assert abs(ort_log[-1].eval_accuracy - torch_log[-1].eval_accuracy) <= 0.02  # 0.001
    assert abs(ort_log[-1].eval_loss - torch_log[-1].eval_loss) < 0.25  # measured 0.075
    with np.load(tmp_path / "o.npz") as got:
        assert int(got["bn.num_batches_tracked"]) == 16


def test_resnet20_weights_and_statistics_after_two_steps_equal_torch_s(
    data_dir, resnet20_train_artifact_dir, tmp_path
):
    """Before rounding grows (see above): every weight and buffer after two steps, within
    2e-4 of each tensor's largest value or of 1 (measured: 5.4e-5, a running variance)."""
    config = replace(SMALL, model="resnet20", epochs=1, limit=128)
    _both_engines(data_dir, resnet20_train_artifact_dir, config, tmp_path)
    expected = torch.load(tmp_path / "t.pt", weights_only=True)["model"]
    with np.load(tmp_path / "o.npz") as got:
        assert set(got.files) - {STATE_KEY} >= set(expected)
        for name, tensor in expected.items():
            reference = tensor.numpy()
            gap = np.abs(got[name] - reference).max() / max(np.abs(reference).max(), 1)
            assert gap < 2e-4, name


@pytest.fixture(scope="module")
def ort_run(data_dir, train_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-run") / "trained.npz"
    return out, train_onnxruntime(
        load_artifact(train_artifact), data_dir, out, SMALL, SessionOptions(threads=2)
    )


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(
    data_dir, train_artifact, ort_run, tmp_path
):
    """The optimizer's state (SGD's momentum buffers) and step count are in the checkpoint."""
    straight, straight_log = ort_run
    artifact = load_artifact(train_artifact)
    partial = tmp_path / "partial.npz"
    train_onnxruntime(artifact, data_dir, partial, SMALL, SessionOptions(threads=2), stop_after=1)
    resumed = train_onnxruntime(
        artifact, data_dir, tmp_path / "r.npz", options=SessionOptions(threads=2), resume=partial
    )
    assert [e.eval_loss for e in resumed] == [e.eval_loss for e in straight_log]
    with np.load(straight) as a, np.load(tmp_path / "r.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            if name != STATE_KEY:  # the log's timings differ
                np.testing.assert_array_equal(a[name], b[name])


def test_adamw_resumes_with_its_moments_and_step_count(data_dir, train_artifact, tmp_path):
    """AdamW's bias correction needs the step count, its moments both states."""
    config = replace(SMALL, optimizer="adamw", lr=DEFAULT_LR["adamw"], limit=256)
    artifact = load_artifact(train_artifact)
    options = SessionOptions(threads=2)
    train_onnxruntime(artifact, data_dir, tmp_path / "straight.npz", config, options)
    train_onnxruntime(artifact, data_dir, tmp_path / "p.npz", config, options, stop_after=1)
    with np.load(tmp_path / "p.npz") as partial:
        assert json.loads(str(partial[STATE_KEY]))["optimizer_steps"] == 4
        assert {"exp_avg/model1.0.weight", "exp_avg_sq/model1.0.weight"} <= set(partial.files)
    train_onnxruntime(artifact, data_dir, tmp_path / "r.npz", options=options,
                      resume=tmp_path / "p.npz")  # fmt: skip
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "r.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            if name != STATE_KEY:
                np.testing.assert_array_equal(a[name], b[name])


def test_an_artifact_without_optimizer_graphs_trains_with_graphs_built_at_once(
    data_dir, train_artifact, tmp_path
):
    """An artifact exported without optimizer graphs: the engine builds the same graph."""
    bare = tmp_path / "bare"
    shutil.copytree(train_artifact, bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    for entry in [g for g in manifest["graphs"] if g["kind"] == "optimizer"]:
        manifest["graphs"].remove(entry)
        del manifest["files"][entry["file"]]
        (bare / entry["file"]).unlink()
    (bare / "manifest.json").write_text(json.dumps(manifest))
    config = replace(SMALL, optimizer="adamw", lr=DEFAULT_LR["adamw"], epochs=1, limit=128)
    for artifact, out in ((train_artifact, "with.npz"), (bare, "without.npz")):
        train_onnxruntime(load_artifact(artifact), data_dir, tmp_path / out, config)
    with np.load(tmp_path / "with.npz") as a, np.load(tmp_path / "without.npz") as b:
        for name in a.files:
            if name != STATE_KEY:
                np.testing.assert_array_equal(a[name], b[name])


def test_trained_weights_run_in_the_runtime_and_export(data_dir, train_artifact, ort_run, tmp_path):
    weights, log = ort_run
    runtime = open_artifact(train_artifact, weights=weights)
    shipped = open_artifact(train_artifact)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert not np.allclose(runtime.predict(images).logits, shipped.predict(images).logits)

    export_artifact(tmp_path / "exported", losses=["ce"], checkpoint=weights)
    exported = load_artifact(tmp_path / "exported")
    assert exported.manifest.weights["trained"]["engine"] == "onnxruntime"
    assert exported.manifest.weights["recipe"]["limit"] == 512
    np.testing.assert_array_equal(
        runtime.predict(images).logits, open_artifact(tmp_path / "exported").predict(images).logits
    )

    cli = CliRunner().invoke(
        main, ["eval", str(train_artifact), "--weights", str(weights), "--json", "-"]
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout)["eval"]["losses"]["ce"] == pytest.approx(log[-1].eval_loss, 1e-5)


def test_every_graph_with_weights_runs_on_them(train_artifact, ort_run, test_split):
    artifact = load_artifact(train_artifact).with_weights(ort_run[0])
    from lossx.build.eager import EagerRunner
    from lossx.compare.inputs import sample_feed
    from lossx.runtime.feeds import graph_feed, iter_batches

    images, labels = next(iter_batches(test_split, 16, CONTRACT))
    eager = EagerRunner.of_artifact(artifact)
    logits = eager.run(artifact.graph("model").spec, {"images": images})["logits"]
    for entry in artifact.manifest.graphs:
        spec = entry.spec
        if spec.takes_data:
            feed = graph_feed(spec, images, labels, logits, artifact.state_dict())
        else:  # an optimizer's: random gradients and state
            feed = sample_feed(spec, {}, 0, parameters=artifact.state_dict())
        got = artifact.run(spec.stem, feed)
        for name, want in eager.run(spec, feed).items():
            if name not in spec.gradients.values():
                np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("model1.0.bias"), "missing model1.0.bias"),
        (lambda w: w.update(extra=np.zeros(1, np.float32)), "unexpected extra"),
        (lambda w: w.update({"model1.8.bias": np.zeros(3, np.float32)}), "has shape [3]"),
        (lambda w: w.update({"model1.8.bias": np.zeros(10)}), "is float64"),
        (lambda w: w.update({"model1.8.bias": np.full(10, np.nan, np.float32)}), "NaN or Inf"),
    ],
)
def test_weights_that_do_not_fit_are_refused(train_artifact, tmp_path, change, message):
    artifact = load_artifact(train_artifact)
    weights = artifact.state_dict()
    change(weights)
    np.savez(tmp_path / "w.npz", **weights)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        artifact.with_weights(tmp_path / "w.npz")
    result = CliRunner().invoke(
        main, ["eval", str(train_artifact), "--weights", str(tmp_path / "w.npz")]
    )
    assert result.exit_code == 2 and message in result.stderr and not result.stdout
    assert "Traceback" not in result.output


def test_a_file_that_is_not_an_npz_is_refused(train_artifact):
    with pytest.raises(CheckpointError, match=r"not an \.npz weights file"):
        load_artifact(train_artifact).with_weights(train_artifact / "model.onnx")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (replace(SMALL, loss="l1"), "no training graph for loss l1"),
        (replace(SMALL, loss="ce(label_smoothing=0.1)"), "its training graph computes ce, not"),
        (replace(SMALL, epochs=0), "epochs must be 1..10000"),
    ],
)
def test_recipes_the_engine_cannot_run_are_refused(
    data_dir, train_artifact, tmp_path, config, message
):
    with pytest.raises(SpecError, match=re.escape(message)):
        train_onnxruntime(load_artifact(train_artifact), data_dir, tmp_path / "o.npz", config)
    assert not (tmp_path / "o.npz").exists()


def test_resume_needs_a_checkpoint_of_this_engine_and_artifact(
    data_dir, train_artifact, ort_run, tmp_path
):
    artifact = load_artifact(train_artifact)
    weights_only = tmp_path / "weights.npz"
    np.savez(weights_only, **artifact.state_dict())
    with pytest.raises(CheckpointError, match="weights only, not a checkpoint"):
        train_onnxruntime(artifact, data_dir, tmp_path / "o.npz", resume=weights_only)
    export_artifact(tmp_path / "other", losses=["ce"], init="random", seed=1, train=True)
    with pytest.raises(CheckpointError, match="was trained with another artifact"):
        train_onnxruntime(
            load_artifact(tmp_path / "other"), data_dir, tmp_path / "o.npz", resume=ort_run[0]
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "onnxruntime"], "--engine onnxruntime needs ARTIFACT_DIR"),
        (["ARTIFACT"], "ARTIFACT_DIR is for --engine onnxruntime"),
    ],
)
def test_cli_train_engine_usage(data_dir, train_artifact, args, message):
    args = [str(train_artifact) if a == "ARTIFACT" else a for a in args]
    result = CliRunner().invoke(main, ["train", "--data-dir", str(data_dir), *args])
    assert result.exit_code == 2 and message in result.stderr


TRAIN_CLI = """
from lossx.cli import main
main(sys.argv[1:], standalone_mode=True)
"""


def test_cli_trains_in_onnxruntime_without_torch(data_dir, train_artifact, tmp_path):
    out, log = tmp_path / "w.npz", tmp_path / "log.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + TRAIN_CLI, "train", str(train_artifact),
         "--engine", "onnxruntime", "--data-dir", str(data_dir), "--epochs", "1",
         "--limit", "128", "--batch-size", "32", "--out", str(out), "--log-json", str(log)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"wrote {out}: epoch 1/1")
    assert json.loads(log.read_text())["epoch"] == 1
    assert sorted(load_artifact(train_artifact).with_weights(out).state_dict()) == sorted(
        load_artifact(train_artifact).state_dict()
    )


def test_cli_check_and_predict_run_with_trained_weights(train_artifact, ort_run, tmp_path):
    weights = str(ort_run[0])
    result = CliRunner().invoke(
        main, ["check", str(train_artifact), "--weights", weights, "--limit", "64"]
    )
    assert result.exit_code == 0, result.output
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(image)
    outputs = [
        json.loads(CliRunner().invoke(main, ["predict", str(train_artifact), str(image), "--json",
                                             *extra]).stdout)["predictions"][0]["top_k"][0]
        for extra in ([], ["--weights", weights])
    ]  # fmt: skip
    assert outputs[0]["probability"] != outputs[1]["probability"]


def test_both_engines_stop_where_training_diverges(data_dir, train_artifact, tmp_path):
    config = replace(SMALL, lr=10.0, clip_norm=0.0)
    messages = []
    for run in (
        lambda out: train_torch(data_dir, out, config),
        lambda out: train_onnxruntime(load_artifact(train_artifact), data_dir, out, config),
    ):
        with pytest.raises(TrainingDiverged, match="the loss is nan; try a lower --lr") as error:
            run(tmp_path / "c")
        messages.append(str(error.value))
        assert not (tmp_path / "c").exists()
    assert messages[0] == messages[1]


@pytest.mark.gpu
def test_onnxruntime_training_on_cuda_takes_the_cpu_steps(
    data_dir, train_artifact, ort_run, tmp_path
):
    """The same 16 steps on CUDA (TF32 off) as on the CPU, within the engines' tolerance."""
    cpu_weights, cpu_log = ort_run
    log = train_onnxruntime(
        load_artifact(train_artifact),
        data_dir,
        tmp_path / "cuda.npz",
        SMALL,
        SessionOptions("cuda"),
    )
    for mine, theirs in zip(log, cpu_log, strict=True):
        assert abs(mine.eval_loss - theirs.eval_loss) < 1e-5
    with np.load(tmp_path / "cuda.npz") as got, np.load(cpu_weights) as want:
        for name in want.files:
            if "/" not in name:
                gap = np.abs(got[name] - want[name]).max() / np.abs(want[name]).max()
                assert gap < 1e-3, name
