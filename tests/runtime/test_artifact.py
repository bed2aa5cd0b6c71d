import json
import shutil

import numpy as np
import onnx
import pytest

from lossx.errors import ArtifactError, DataError
from lossx.runtime import load_artifact
from lossx.runtime.artifact import sha256_of
from lossx.runtime.manifest import FORMAT_VERSION


@pytest.fixture
def copy(artifact_dir, tmp_path):
    """A private copy of the seeded artifact to damage."""
    target = tmp_path / "artifact"
    shutil.copytree(artifact_dir, target)
    return target


def _edit_manifest(artifact_dir, change):
    path = artifact_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _rehash(artifact_dir, name):
    def update(manifest):
        manifest["files"][name]["sha256"] = sha256_of(artifact_dir / name)
        manifest["files"][name]["bytes"] = (artifact_dir / name).stat().st_size

    _edit_manifest(artifact_dir, update)


def test_artifact_loads_and_lists_its_graphs(artifact):
    stems = [g.spec.stem for g in artifact.manifest.graphs]
    assert stems == ["model", "loss_ce", "loss_mse", "loss_l1", "model_ce", "model_mse", "model_l1"]
    assert artifact.manifest.loss_names == ["ce", "mse", "l1"]


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"artifact directory .* does not exist"):
        load_artifact(tmp_path / "nothing")


def test_empty_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"no manifest.json; not a lossx artifact"):
        load_artifact(tmp_path)


def test_manifest_that_is_not_json(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json: not valid JSON"):
        load_artifact(copy)


def test_manifest_missing_a_key(copy):
    _edit_manifest(copy, lambda m: m.pop("graphs"))
    with pytest.raises(
        ArtifactError,
        match=r"manifest.json: malformed \(the manifest must contain \['graphs'\] properties\)",
    ):
        load_artifact(copy)


def test_manifest_of_another_format(copy):
    _edit_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(
        ArtifactError,
        match=rf"format version 99, this lossx reads version {FORMAT_VERSION}; export the art",
    ):
        load_artifact(copy)


def test_sha256_mismatch(copy):
    with (copy / "loss_ce.onnx").open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(ArtifactError, match=r"loss_ce.onnx: sha256 does not match the manifest"):
        load_artifact(copy)


def test_missing_graph_file(copy):
    (copy / "model_l1.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model_l1.onnx: listed in the manifest but missing"):
        load_artifact(copy)


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage", None])
def test_corrupt_graph_with_matching_sha256_fails_to_open(copy, content):
    path = copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000] if content is None else content)
    _rehash(copy, "model.onnx")
    artifact = load_artifact(copy)
    with pytest.raises(ArtifactError, match=r"model.onnx: ONNX Runtime cannot load it"):
        artifact.session("model")


def test_graph_whose_inputs_differ_from_the_manifest(copy):
    model = onnx.load(copy / "model.onnx")
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if i == "images" else i for i in node.input]
    onnx.save(model, copy / "model.onnx")
    _rehash(copy, "model.onnx")
    with pytest.raises(
        ArtifactError, match=r"graph inputs \[pixels:float32\[\?, 3, 32, 32\]\] differ"
    ):
        load_artifact(copy).session("model")


@pytest.mark.parametrize("name", ["../model.onnx", "/tmp/model.onnx", "sub/model.onnx"])
def test_file_outside_the_artifact_is_refused(copy, name):
    def point_outside(manifest):
        manifest["files"][name] = manifest["files"].pop("model.onnx")
        manifest["graphs"][0]["file"] = name

    _edit_manifest(copy, point_outside)
    with pytest.raises(ArtifactError, match=r"is not a plain file name"):
        load_artifact(copy)


def test_symlink_leading_out_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "model.onnx", outside)
    (copy / "model.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"refusing a link"):
        load_artifact(copy)


def test_weights_file_outside_the_artifact_is_refused(copy):
    def point_outside(manifest):
        manifest["files"]["../weights.npz"] = manifest["files"].pop("weights.npz")

    _edit_manifest(copy, point_outside)
    with pytest.raises(ArtifactError, match=r"'../weights.npz' is not a plain file name"):
        load_artifact(copy)


def _ce_feed(n: int = 3) -> dict:
    return {"logits": np.zeros((n, 10), np.float32), "labels": np.arange(n, dtype=np.int64)}


def test_run_returns_outputs_by_name(artifact):
    outputs = artifact.run("loss_ce", _ce_feed())
    assert outputs["loss"] == pytest.approx(np.log(10), rel=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: f.update(labels=np.array([0, 10, 1])),
            r"labels: value 10 at index \[1\] is not a class index 0..9",
        ),
        (
            lambda f: f.update(labels=np.array([0, -1, 1])),
            r"labels: value -1 at index \[1\] .*nor ignore_index -100",
        ),
        (
            lambda f: f.update(labels=f["labels"].astype(np.int32)),
            r"labels: expected an int64 array of shape \[N\], got an int32 array",
        ),
        (
            lambda f: f.update(logits=np.zeros((3, 10, 1), np.float32)),
            r"logits: expected shape \[N, C\], got \[3, 10, 1\]",
        ),
        (lambda f: f.update(labels=np.arange(4)), r"labels: dim N is 4 but logits has N = 3"),
        (
            lambda f: f.update(logits=f["logits"][:0], labels=f["labels"][:0]),
            r"logits: empty \(shape \[0, 10\]\)",
        ),
        (lambda f: f.pop("labels"), r"loss_ce.onnx takes inputs logits, labels; got logits"),
        (
            lambda f: f.update(logits=[[0.0] * 10] * 3),
            r"logits: expected a float32 array of shape \[N, C\], got a list",
        ),
    ],
)
def test_run_refuses_a_bad_feed_before_onnxruntime_sees_it(artifact, change, message):
    feed = _ce_feed()
    change(feed)
    with pytest.raises(DataError, match=message):
        artifact.run("loss_ce", feed)


def test_fused_graph_checks_labels_against_the_model_classes(artifact):
    feed = {"images": np.zeros((2, 3, 32, 32), np.float32), "labels": np.array([0, 10])}
    with pytest.raises(DataError, match=r"value 10 at index \[1\] is not a class index 0..9"):
        artifact.run("model_ce", feed)


@pytest.mark.parametrize("location", ["weights.bin", "../weights.bin", "/tmp/weights.bin"])
def test_external_data_is_refused_wherever_it_points(copy, location):
    """A tensor in an external file escapes the manifest's sha256s, even inside the folder."""
    proto = onnx.load(copy / "model.onnx")
    tensor = next(t for t in proto.graph.initializer if t.name == "model1.0.weight")
    data = tensor.raw_data
    (copy / "weights.bin").write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, copy / "model.onnx")
    _rehash(copy, "model.onnx")
    with pytest.raises(
        ArtifactError, match=rf"model1.0.weight' keeps its data in external file '{location}'"
    ):
        load_artifact(copy)


def test_a_pinned_manifest_sha256_is_required(copy):
    pinned = sha256_of(copy / "manifest.json")
    assert load_artifact(copy, pinned.upper()).manifest.model == "tudui"
    _edit_manifest(copy, lambda m: m.update(model="tudui"))  # same content, other bytes
    with pytest.raises(
        ArtifactError, match=rf"manifest.json: sha256 [0-9a-f]{{64}} is not the required {pinned}"
    ):
        load_artifact(copy, pinned)
