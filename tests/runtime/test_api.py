"""The public runtime API: predict, loss and evaluate, with inputs checked before ONNX Runtime."""

import shutil

import numpy as np
import pytest

from lossx.errors import ArtifactError, DataError, LossxError, ProviderError
from lossx.runtime import Runtime, evaluate, open_artifact
from lossx.runtime import session as session_module
from lossx.runtime.cifar10 import CONTRACT


@pytest.fixture(scope="module")
def runtime(artifact_dir):
    return open_artifact(artifact_dir, threads=2)


def test_predict_takes_decoded_images_or_model_input(runtime, artifact, test_split):
    images = test_split.images[:300]
    from_uint8 = runtime.predict(images)
    from_float = runtime.predict(CONTRACT.to_model_input(images))
    (logits,) = artifact.session("model").run(
        ["logits"], {"images": CONTRACT.to_model_input(images)}
    )
    np.testing.assert_array_equal(from_uint8.logits, from_float.logits)
    np.testing.assert_allclose(from_uint8.logits, logits, rtol=1e-6, atol=1e-6)
    assert from_uint8.classes.tolist() == logits.argmax(axis=1).tolist()
    np.testing.assert_allclose(from_uint8.probabilities.sum(axis=1), 1, rtol=1e-6)
    single = runtime.predict(images[0])
    np.testing.assert_allclose(single.logits[0], from_uint8.logits[0], rtol=1e-6, atol=1e-6)


def test_predict_batches_large_inputs(artifact):
    small_batches = Runtime(artifact, batch_size=7)
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        small_batches.predict(images).logits,
        Runtime(artifact).predict(images).logits,
        rtol=1e-5,
        atol=1e-6,
    )


def test_top_k_is_sorted_by_probability(runtime, test_split):
    classes, probabilities = runtime.predict(test_split.images[:5]).top_k(3)
    assert classes.shape == probabilities.shape == (5, 3)
    assert (np.diff(probabilities, axis=1) <= 0).all()


def test_loss_and_evaluate_agree_with_lossx_eval(runtime, artifact, test_split):
    logits = runtime.predict(test_split.images).logits
    ce = runtime.loss("ce", logits=logits, labels=test_split.labels)
    expected = evaluate(artifact, test_split, batch_size=1000)
    assert float(ce) == pytest.approx(expected.losses["ce"], rel=1e-6)
    result = runtime.evaluate(test_split)
    assert result.top1_accuracy == expected.top1_accuracy
    assert result.losses == pytest.approx(expected.losses, rel=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 32, 32, 3), np.float64), r"images: expected uint8 RGB .* got float64"),
        (
            np.zeros((2, 64, 64, 3), np.uint8),
            r"uint8 images must be \[N, 32, 32, 3\] .* got \[2, 64",
        ),
        (np.zeros((2, 32, 32, 3), np.float32), r"float32 images must be \[N, 3, 32, 32\]"),
        (np.zeros((0, 32, 32, 3), np.uint8), r"images: an empty batch"),
        (np.full((1, 3, 32, 32), 255, np.float32), r"values from 255 to 255; expected pixels"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), r"images: nan at index \[0, 0, 0, 0\]"),
        ([[0]], r"images: expected a numpy array, got list"),
    ],
)
def test_predict_refuses_bad_images(runtime, images, message):
    with pytest.raises(DataError, match=message):
        runtime.predict(images)


def test_loss_refuses_bad_inputs(runtime):
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(DataError, match=r"the artifact has no loss 'nll'; it has ce, mse, l1"):
        runtime.loss("nll", logits=logits, labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"labels: value 12 at index \[1\]"):
        runtime.loss("ce", logits=logits, labels=np.array([0, 12]))
    with pytest.raises(DataError, match=r"logits: inf at index \[0, 3\]; expected finite"):
        runtime.loss(
            "ce",
            logits=np.where(np.eye(2, 10, 3) > 0, np.inf, logits).astype("f4"),
            labels=np.array([0, 1]),
        )
    with pytest.raises(DataError, match=r"takes inputs input, target; got logits"):
        runtime.loss("mse", logits=logits)


@pytest.mark.parametrize("optimization", ["disable", "basic", "extended"])
def test_optimisation_levels_give_the_same_answers(artifact_dir, runtime, test_split, optimization):
    other = open_artifact(artifact_dir, threads=1, optimization=optimization)
    np.testing.assert_allclose(
        other.predict(test_split.images[:64]).logits,
        runtime.predict(test_split.images[:64]).logits,
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_session_options_are_refused(artifact_dir):
    with pytest.raises(LossxError, match=r"unknown optimization level 'max'; choose disable"):
        open_artifact(artifact_dir, optimization="max")
    with pytest.raises(
        LossxError, match=r"threads must be 1\.\.\d+ \(4 per core on this machine\), got 0"
    ):
        open_artifact(artifact_dir, threads=0)
    with pytest.raises(DataError, match=r"batch size must be an integer of at least 1"):
        open_artifact(artifact_dir, batch_size=0)


def test_providers_are_honest(artifact_dir, monkeypatch):
    assert open_artifact(artifact_dir).providers == ["cpu"]
    monkeypatch.setattr(
        session_module.ort, "get_available_providers", lambda: ["CPUExecutionProvider"]
    )
    assert open_artifact(artifact_dir, provider="auto").providers == ["cpu"]
    with pytest.raises(ProviderError, match=r"provider 'cuda' requested"):
        open_artifact(artifact_dir, provider="cuda")


def test_a_tampered_artifact_is_refused(artifact_dir, tmp_path):
    copy = shutil.copytree(artifact_dir, tmp_path / "copy")
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-1] ^= 1
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 does not match the manifest"):
        open_artifact(copy)


@pytest.mark.gpu
def test_cuda_predicts_what_cpu_predicts(artifact_dir, runtime, test_split):
    """On CUDA with TF32 off (the default) and IO binding: fp32 parity with the CPU."""
    cuda = open_artifact(artifact_dir, provider="cuda")
    assert cuda.providers[0] == "cuda"
    got = cuda.predict(test_split.images)
    want = runtime.predict(test_split.images)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert (got.classes == want.classes).all()
    result = cuda.evaluate(test_split)
    assert result.providers[0] == "cuda"
    assert result.top1_accuracy == runtime.evaluate(test_split).top1_accuracy


@pytest.mark.gpu
def test_auto_picks_cuda_when_it_works(artifact_dir):
    assert open_artifact(artifact_dir, provider="auto").providers[0] == "cuda"
