import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import lossx
from lossx import files as files_module
from lossx.build import artifact_writer, graph_export, torch_onnx
from lossx.build.export import export_artifact, export_loss
from lossx.build.graph_modules import Together
from lossx.build.losses import reference_loss
from lossx.build.models import Tudui
from lossx.build.self_check import verify_graph
from lossx.compare.inputs import sample_feed
from lossx.errors import ArtifactError, ExportError, ParityError, SpecError
from lossx.runtime import load_artifact
from lossx.runtime.artifact import sha256_of
from lossx.runtime.cifar10 import CLASS_NAMES, CONTRACT
from lossx.runtime.graphs import artifact_graphs, loss_graph, model_graph
from lossx.runtime.loss_specs import parse_loss_spec

MODEL = model_graph(CONTRACT.shape, CONTRACT.num_classes)

GRAPH_FILES = [
    "model.onnx",
    "loss_ce.onnx",
    "loss_mse.onnx",
    "loss_l1.onnx",
    "model_ce.onnx",
    "model_mse.onnx",
    "model_l1.onnx",
]


def _shape(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def test_artifact_holds_every_graph_weights_and_manifest(artifact_dir):
    assert sorted(p.name for p in artifact_dir.iterdir()) == sorted(
        [*GRAPH_FILES, "weights.npz", "manifest.json"]
    )


@pytest.mark.parametrize(
    ("file", "inputs", "outputs"),
    [
        ("model.onnx", {"images": (1, ["N", 3, 32, 32])}, {"logits": (1, ["N", 10])}),
        ("loss_ce.onnx", {"logits": (1, ["N", "C"]), "labels": (7, ["N"])}, {"loss": (1, [])}),
        ("loss_mse.onnx", {"input": (1, ["N", "D"]), "target": (1, ["N", "D"])}, {"loss": (1, [])}),
        ("loss_l1.onnx", {"input": (1, ["N", "D"]), "target": (1, ["N", "D"])}, {"loss": (1, [])}),
        (
            "model_ce.onnx",
            {"images": (1, ["N", 3, 32, 32]), "labels": (7, ["N"])},
            {"logits": (1, ["N", 10]), "loss": (1, [])},
        ),
        (
            "model_mse.onnx",
            {"images": (1, ["N", 3, 32, 32]), "targets": (1, ["N", 10])},
            {"logits": (1, ["N", 10]), "loss": (1, [])},
        ),
        (
            "model_l1.onnx",
            {"images": (1, ["N", 3, 32, 32]), "targets": (1, ["N", 10])},
            {"logits": (1, ["N", 10]), "loss": (1, [])},
        ),
    ],
)
def test_graph_inputs_and_outputs(artifact_dir, file, inputs, outputs):
    """Names, element types (1 float32, 7 int64) and shapes with symbolic dims."""
    model = onnx.load(artifact_dir / file)
    for values, expected in ((model.graph.input, inputs), (model.graph.output, outputs)):
        assert {v.name: (v.type.tensor_type.elem_type, _shape(v)) for v in values} == expected


@pytest.mark.parametrize("file", GRAPH_FILES)
def test_graphs_pass_the_full_onnx_check(artifact_dir, file):
    onnx.checker.check_model(str(artifact_dir / file), full_check=True)


@pytest.mark.parametrize("file", GRAPH_FILES)
def test_graph_metadata_carries_the_key_facts(artifact_dir, file):
    meta = {p.key: p.value for p in onnx.load(artifact_dir / file).metadata_props}
    assert meta["lossx.model"] == "tudui"
    assert json.loads(meta["lossx.class_names"]) == list(CLASS_NAMES)
    assert "ToTensor" in json.loads(meta["lossx.preprocessing"])["equivalent"]
    assert meta["producer.lossx"] == lossx.__version__
    assert meta["producer.torch"] == torch.__version__
    assert meta["producer.onnx"] == onnx.__version__
    assert json.loads(meta["lossx.weights"]) == {"file": "weights.npz", "source": "seed", "seed": 0}
    if file != "model.onnx":
        loss = file.removesuffix(".onnx").split("_")[1]
        assert json.loads(meta["lossx.loss"]) == parse_loss_spec(loss).to_dict()


def test_manifest_lists_every_file_with_its_sha256(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted([*GRAPH_FILES, "weights.npz"])
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha256_of(artifact_dir / name)
        assert info["bytes"] == (artifact_dir / name).stat().st_size


def test_manifest_describes_how_to_use_the_artifact(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert manifest["model"] == "tudui"
    assert manifest["class_names"] == list(CLASS_NAMES)
    assert manifest["preprocessing"]["scale"] == 255
    assert (manifest["preprocessing"]["mean"], manifest["preprocessing"]["std"]) == (
        [0] * 3,
        [1] * 3,
    )
    assert manifest["preprocessing"]["equivalent"] == "torchvision.transforms: ToTensor()"
    assert [loss["name"] for loss in manifest["losses"]] == ["ce", "mse", "l1"]
    assert manifest["losses"][0]["options"] == {
        "weight": None,
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "reduction": "mean",
        "target": "index",
    }
    assert manifest["producer"]["torch"] == torch.__version__
    assert manifest["producer"]["onnx"] == onnx.__version__
    assert manifest["producer"]["lossx"] == lossx.__version__
    for graph in manifest["graphs"]:
        proto = onnx.load(artifact_dir / graph["file"])
        assert graph["opset"] == manifest["opset"] == proto.opset_import[0].version == 20
        assert graph["ir_version"] == proto.ir_version
        assert [i["name"] for i in graph["inputs"]] == [i.name for i in proto.graph.input]
        assert [i["shape"] for i in graph["inputs"]] == [_shape(i) for i in proto.graph.input]


def test_weights_file_holds_the_exported_weights(artifact_dir):
    proto = onnx.load(artifact_dir / "model.onnx")
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    with np.load(artifact_dir / "weights.npz") as npz:
        assert sorted(npz.files) == sorted(k for k in initializers if k.startswith("model1."))
        for key in npz.files:
            np.testing.assert_array_equal(npz[key], initializers[key])


def _counted_exports(monkeypatch) -> list[list[str]]:
    """The input names of every torch.onnx.export call from now on."""
    calls = []
    export = torch.onnx.export

    def counted(*args, **kwargs):
        calls.append(kwargs["input_names"])
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counted)
    return calls


def test_the_model_and_the_losses_take_two_exports(tmp_path, monkeypatch):
    """torch.onnx exports model.onnx, then every loss graph in one call, split apart after;
    each model+loss graph is composed from them (a loss of log-probabilities behind a
    LogSoftmax), and every graph is verified like the others."""
    calls = _counted_exports(monkeypatch)
    out = tmp_path / "a"
    export_artifact(out, init="random", losses=["ce", "nll"])
    state = list(Tudui().state_dict())  # inputs while exporting, initializers after
    assert calls == [
        ["images", *state],
        ["loss_ce.logits", "loss_ce.labels", "loss_nll.log_probs", "loss_nll.labels"],
    ]
    stems = ("model", "loss_ce", "loss_nll", "model_ce", "model_nll")
    ops = {f: [n.op_type for n in onnx.load(out / f"{f}.onnx").graph.node] for f in stems}
    assert ops["model"] == ["Conv", "MaxPool"] * 3 + ["Reshape", "Gemm", "Gemm"]
    assert ops["model_ce"] == ops["model"] + ops["loss_ce"]
    assert ops["model_nll"] == ops["model"] + ["LogSoftmax"] + ops["loss_nll"]


def test_graphs_are_exported_alone_where_exporting_them_together_fails(tmp_path, monkeypatch):
    def untraceable(self, *inputs):
        raise RuntimeError("not today")

    monkeypatch.setattr(Together, "forward", untraceable)
    calls = _counted_exports(monkeypatch)
    export_artifact(tmp_path / "a", init="random", losses=["ce", "mse"])
    assert calls[0][0] == "images" and calls[2:] == [["logits", "labels"], ["input", "target"]]
    assert load_artifact(tmp_path / "a").manifest.loss_names == ["ce", "mse"]


class _Histogram(nn.Module):
    """Runs eagerly, but torch.onnx has no ONNX function for torch.histc."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3 * 32 * 32, 10)

    def forward(self, images):
        return self.linear(images.flatten(1)) + torch.histc(images, bins=4).sum() * 0


def test_a_graph_torch_onnx_cannot_export_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"^model.onnx: torch.onnx.export failed: "):
        export_artifact(tmp_path / "a", model=_Histogram(), losses=["ce"])
    assert not (tmp_path / "a").exists()


def test_torch_onnx_builds_its_function_table_once(tmp_path, monkeypatch):
    """torch.onnx.export builds its ATen-to-ONNX table on every call unless export reuses it,
    which patches a private of torch.onnx (pinned in pyproject.toml)."""
    from torch.onnx._internal.exporter import _registration

    builds = []
    build = _registration.ONNXRegistry.from_torchlib

    def counted(_, *args, **kwargs):
        builds.append(kwargs)
        return build(*args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counted))
    monkeypatch.setattr(torch_onnx, "_torchlib_registries", {})
    export_loss("ce", tmp_path / "ce.onnx")
    export_loss("mse", tmp_path / "mse.onnx")
    assert len(builds) == 1


def test_fused_graphs_hold_the_model_weights_under_model(artifact_dir):
    """As the fused module's state_dict names them, which is what --weights replaces."""
    model = onnx.load(artifact_dir / "model.onnx").graph.initializer
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model if t.name.startswith("model1.")}
    for file in ("model_ce.onnx", "model_mse.onnx", "model_l1.onnx"):
        fused = onnx.load(artifact_dir / file).graph.initializer
        fused = {t.name: onnx.numpy_helper.to_array(t) for t in fused}
        for name, value in weights.items():
            np.testing.assert_array_equal(fused[f"model.{name}"], value)


def test_export_is_reproducible(tmp_path):
    export_artifact(tmp_path / "a", init="random", losses=["ce"])
    export_artifact(tmp_path / "b", init="random", losses=["ce"])
    assert (tmp_path / "a" / "manifest.json").read_text() == (
        tmp_path / "b" / "manifest.json"
    ).read_text()


def test_checkpoint_weights_are_exported(tmp_path, trained_checkpoint, trained_artifact):
    state = torch.load(trained_checkpoint, weights_only=True)
    with np.load(trained_artifact.path / "weights.npz") as npz:
        for key, tensor in state.items():
            np.testing.assert_array_equal(npz[key], tensor.numpy())
    assert trained_artifact.manifest.weights["checkpoint_sha256"] == sha256_of(trained_checkpoint)


@pytest.mark.parametrize("opset", [17, 23])
def test_other_opsets_export_and_run(tmp_path, opset):
    export_artifact(tmp_path / "a", init="random", losses=["ce"], opset=opset)
    artifact = load_artifact(tmp_path / "a")
    assert {g.opset for g in artifact.manifest.graphs} == {opset}
    (logits,) = artifact.session("model").run(None, {"images": np.zeros((3, 3, 32, 32), "f4")})
    assert logits.shape == (3, 10)


@pytest.mark.parametrize("opset", [16, 24])
def test_unsupported_opset_is_refused(tmp_path, opset):
    with pytest.raises(SpecError, match=f"opset {opset} is not supported; choose 17..23 "):
        export_artifact(tmp_path / "a", opset=opset)
    assert not (tmp_path / "a").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch.onnx notes on shared axis names
def test_self_check_catches_a_graph_that_ignores_an_input(tmp_path):
    """The tutorial's L1 example aliases input and target; that export ignores its target."""
    spec = loss_graph(parse_loss_spec("l1"))
    module = reference_loss(spec.loss)
    aliased = torch.randn(4, 10)
    n, d = torch.export.Dim("N"), torch.export.Dim("D")
    program = torch.onnx.export(
        module,
        (aliased, aliased),
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_shapes=({0: n, 1: d}, {0: n, 1: d}),
        dynamo=True,
        verbose=False,
    )
    program.save(str(tmp_path / "loss_l1.onnx"))
    with pytest.raises(ParityError, match=r"loss_l1.onnx: .* worst loss_l1/loss .* random N="):
        verify_graph(spec, None, tmp_path / "loss_l1.onnx")


def test_self_check_inputs_are_distinct_tensors():
    for spec in artifact_graphs([parse_loss_spec(n) for n in ("ce", "mse", "l1")], MODEL):
        arrays = list(sample_feed(spec, {"N": 4, "C": 10, "D": 10}, seed=0).values())
        for i, a in enumerate(arrays):
            assert not any(np.shares_memory(a, b) for b in arrays[i + 1 :])


def test_failed_export_leaves_the_previous_artifact_intact(tmp_path, monkeypatch):
    out = tmp_path / "art"
    export_artifact(out, init="random", losses=["ce"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_verify(spec, model, path, contract):
        calls.append(spec.file)
        if len(calls) == 2:
            raise ParityError(f"export self-check failed: {spec.file}")

    monkeypatch.setattr(graph_export, "verify_graph", failing_verify)
    with pytest.raises(ParityError):
        export_artifact(out, init="random", losses=["ce"], seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial directory left


def test_export_replaces_a_previous_artifact(tmp_path):
    out = tmp_path / "art"
    export_artifact(out, init="random", losses=["ce"], seed=0)
    export_artifact(out, init="random", losses=["mse"], seed=1)
    assert load_artifact(out).manifest.loss_names == ["mse"]
    assert not (out / "loss_ce.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_export_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match=r"not a lossx artifact; refusing to overwrite"):
        export_artifact(tmp_path / "notes", init="random", losses=["ce"])
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_disk_full_during_export_leaves_the_previous_artifact(tmp_path, monkeypatch):
    out = tmp_path / "art"
    export_artifact(out, init="random", losses=["ce"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_writer.np, "savez", full_disk)
    with pytest.raises(ArtifactError, match=r"cannot write the artifact to .*No space left"):
        export_artifact(out, init="random", losses=["ce"], seed=3)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_unwritable_destination_is_reported(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files_module.tempfile, "mkdtemp", denied)
    with pytest.raises(ArtifactError, match=r"cannot write .*art.*Permission denied"):
        export_artifact(tmp_path / "art", init="random", losses=["ce"])
    assert not (tmp_path / "art").exists()


def test_two_racing_exports_leave_one_complete_artifact(tmp_path):
    """Two processes export different weights to one directory at once: the directory ends
    as one whole artifact, never a mix; the second to start writing is refused in one line
    (the first holds the folder's lock), unless the first was done by then."""
    out = tmp_path / "art"
    command = [
        sys.executable,
        "-m",
        "lossx.cli",
        "export",
        str(out),
        "--init",
        "random",
        "--loss",
        "ce",
    ]
    racers = [
        subprocess.Popen(
            [*command, "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in racers]
    for code, stderr in results:
        assert code in (0, 2), stderr
        assert "Traceback" not in stderr
        if code:
            assert "is being written by another process right now" in stderr.splitlines()[-1]
    assert 0 in [code for code, _ in results]
    artifact = load_artifact(out)  # every file matches the one manifest
    seed = artifact.manifest.weights["seed"]
    fresh = tmp_path / "fresh"
    export_artifact(fresh, init="random", losses=["ce"], seed=seed)
    for name in ("model.onnx", "model_ce.onnx", "weights.npz"):
        assert sha256_of(out / name) == sha256_of(fresh / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "fresh"]  # no staging left
