"""Hostile and broken artifacts against every entry point that reads one: `lossx eval`,
`lossx check`, `lossx predict` and `lossx.runtime.open_artifact`.

Each case must end in a one-line error with exit code 2 (ArtifactError in the API), no
traceback, nothing on stdout and no report file written. Data, image, checkpoint and export
cases live beside their modules (test_cifar10, test_images, test_models, test_export,
test_train, test_cli).
"""

import json
import os
import shutil

import onnx
import pytest
from PIL import Image

from lossx.errors import ArtifactError
from lossx.runtime import open_artifact
from lossx.runtime.artifact import sha256_of
from tests.cli.test_cli import assert_one_line_error, run_cli


def _rehash(folder, name):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name]["sha256"] = sha256_of(folder / name)
    manifest["files"][name]["bytes"] = (folder / name).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _replace_model(content: bytes):
    def damage(folder):
        (folder / "model.onnx").write_bytes(content)
        _rehash(folder, "model.onnx")

    return damage


def _truncate(folder):
    data = (folder / "model.onnx").read_bytes()
    _replace_model(data[: len(data) // 2])(folder)


def _other_graph(folder):
    _replace_model((folder / "loss_ce.onnx").read_bytes())(folder)


def _edit_manifest(change):
    def damage(folder):
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return damage


def _list_file(name):
    def change(manifest):
        manifest["files"][name] = dict(manifest["files"]["model.onnx"])

    return _edit_manifest(change)


def _symlink_out(folder):
    outside = folder.parent / "elsewhere.onnx"
    shutil.copy(folder / "model.onnx", outside)
    (folder / "model.onnx").unlink()
    os.symlink(outside, folder / "model.onnx")


def _flip_weights_byte(folder):
    data = bytearray((folder / "weights.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "weights.npz").write_bytes(bytes(data))


def _external_data(folder):
    proto = onnx.load(folder / "model.onnx")
    tensor = proto.graph.initializer[0]
    (folder / "w.bin").write_bytes(tensor.raw_data)
    length = len(tensor.raw_data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, folder / "model.onnx")
    _rehash(folder, "model.onnx")


CASES = {
    "truncated onnx": (_truncate, "model.onnx: ONNX Runtime cannot load it"),
    "zero-byte onnx": (_replace_model(b""), "model.onnx: ONNX Runtime cannot load it"),
    "random-bytes onnx": (
        _replace_model(os.urandom(4096)),
        "model.onnx: ONNX Runtime cannot load it",
    ),
    "not onnx at all": (
        _replace_model(b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        "ONNX Runtime cannot load it",
    ),
    "other graph's inputs": (_other_graph, "model.onnx: graph inputs"),
    "manifest not json": (lambda f: (f / "manifest.json").write_text("{nope"), "not valid JSON"),
    "manifest lacks a key": (
        _edit_manifest(lambda m: m.pop("graphs")),
        "must contain ['graphs'] properties",
    ),
    "wrong sha256": (_flip_weights_byte, "weights.npz: sha256 does not match the manifest"),
    "file outside (..)": (_list_file("../model.onnx"), "is not a plain file name"),
    "absolute path": (_list_file("/tmp/model.onnx"), "is not a plain file name"),
    "symlink leading out": (_symlink_out, "refusing a link"),
    "external data": (_external_data, "keeps its data in external file 'w.bin'"),
    # The manifest is validated against its schema and against the graphs (test_rules.py's rule 5).
    "nine class names": (
        _edit_manifest(lambda m: m.update(class_names=m["class_names"][:9])),
        "9 class_names for a model of logits [N, 10]",
    ),
    "integer class names": (
        _edit_manifest(lambda m: m.update(class_names=list(range(10)))),
        "class_names[0] must be string",
    ),
    "renamed classes": (
        _edit_manifest(lambda m: m.update(class_names=m["class_names"][::-1])),
        "the manifest's class_names is not what the graph was exported with",
    ),
    "NUL in a file name": (_list_file("model\x00.onnx"), "is not a plain file name"),
    "output shape [N, 11]": (
        _edit_manifest(lambda m: m["graphs"][0]["outputs"][0].update(shape=["N", 11])),
        "10 class_names for a model of logits [N, 11]",
    ),
    "no losses": (_edit_manifest(lambda m: m.update(losses=[])), "losses must contain at least 1"),
    "preprocessing edited": (
        _edit_manifest(lambda m: m["preprocessing"].update(equivalent="ToTensor()")),
        "preprocessing differs from what this lossx applies",
    ),
    "bytes edited": (
        _edit_manifest(lambda m: m["files"]["model.onnx"].update(bytes=1)),
        "bytes, the manifest says 1",
    ),
    "model renamed": (
        _edit_manifest(lambda m: m.update(model="resnet20")),
        "the manifest's model is not what the graph was exported with",
    ),
    "unknown top-level key": (
        _edit_manifest(lambda m: m.update(extra=1)),
        "must not contain {'extra'} properties",
    ),
}


@pytest.fixture
def damaged(artifact_dir, tmp_path, request):
    folder = tmp_path / "artifact"
    shutil.copytree(artifact_dir, folder)
    damage, message = CASES[request.param]
    damage(folder)
    return folder, message


@pytest.fixture(scope="module")
def image(tmp_path_factory, test_split):
    path = tmp_path_factory.mktemp("image") / "cat.png"
    Image.fromarray(test_split.images[0]).save(path)
    return path


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
@pytest.mark.parametrize("command", ["eval", "check", "predict"])
def test_cli_refuses_a_damaged_artifact(damaged, command, image, tmp_path):
    folder, message = damaged
    report = tmp_path / "report.json"
    extra = {
        "eval": ["--json", report],
        "check": ["--report-json", report, "--repro", tmp_path / "repro.npz"],
        "predict": [image],
    }[command]
    result = run_cli(command, folder, *extra)
    assert_one_line_error(result, 2, message)
    assert result.stdout == ""
    assert not report.exists() and not (tmp_path / "repro.npz").exists()


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_runtime_api_refuses_a_damaged_artifact(damaged):
    folder, message = damaged
    with pytest.raises(ArtifactError) as error:
        open_artifact(folder)
    assert message in str(error.value) and "\n" not in str(error.value)
