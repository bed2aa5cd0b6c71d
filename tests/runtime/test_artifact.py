import json
import shutil

import onnx
import pytest

from lossx.errors import ArtifactError
from lossx.runtime import load_artifact
from lossx.runtime.artifact import sha256_of


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
    with pytest.raises(ArtifactError, match=r"manifest.json: missing key 'graphs'"):
        load_artifact(copy)


def test_manifest_of_another_format(copy):
    _edit_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(
        ArtifactError,
        match=r"format version 99, this lossx reads version 2; export the artifact again",
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
    with pytest.raises(ArtifactError, match=r"graph inputs \[pixels:float32/rank 4\] differ"):
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
