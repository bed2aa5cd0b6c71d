"""An artifact's `manifest.json`: what every graph computes (its spec), the losses, the weights
and their provenance, the precision, every file's sha256 and size. Validated against
manifest.schema.json and against the graph specs lossx writes, before anything is run."""

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lossx.errors import ArtifactError, SpecError
from lossx.files import input_folder, regular_file
from lossx.runtime.contract import ImageContract
from lossx.runtime.graphs import (
    GraphKind,
    GraphSpec,
    Role,
    TensorSpec,
    expected_spec,
    model_graph,
)
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.precisions import PRECISIONS, Precision

MANIFEST_FILE = "manifest.json"


FORMAT = "lossx-artifact"


# 2: loss specs with options, tensor value kinds; 3: tensor roles; 4: the image contract
FORMAT_VERSION = 4


@dataclass(frozen=True)
class GraphEntry:
    """One graph of an artifact: its spec and the opset/IR version it was written with."""

    spec: GraphSpec
    opset: int
    ir_version: int

    def to_dict(self) -> dict:
        return {
            "file": self.spec.file,
            "kind": str(self.spec.kind),
            "loss": self.spec.loss.to_dict() if self.spec.loss else None,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "inputs": [t.to_dict() for t in self.spec.inputs],
            "outputs": [t.to_dict() for t in self.spec.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GraphEntry":
        file = data["file"]
        if not file.endswith(".onnx"):
            raise ValueError(f"graph file {file!r} does not end in .onnx")
        spec = GraphSpec(
            stem=file.removesuffix(".onnx"),
            kind=GraphKind(data["kind"]),
            loss=LossSpec.from_dict(data["loss"]) if data["loss"] is not None else None,
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
        )
        return cls(spec, int(data["opset"]), int(data["ir_version"]))


@dataclass(frozen=True)
class Manifest:
    """Everything needed to use an artifact correctly, as written to `manifest.json`."""

    model: str  # a registry name or a MODULE:ATTR import path
    opset: int
    class_names: tuple[str, ...]
    preprocessing: dict  # ImageContract.to_manifest()
    losses: tuple[LossSpec, ...]
    weights: dict  # {"file": "weights.npz", "source": "seed" | "checkpoint", ...}
    graphs: tuple[GraphEntry, ...]
    files: dict[str, dict]  # file name -> {"sha256": ..., "bytes": ...}, every file listed
    producer: dict[str, str]  # package versions that produced the artifact
    # For a MODULE:ATTR model: {"import", "file", "sha256"} of its module's source
    model_source: dict | None = None
    # the keyword arguments the model was constructed with (--model-arg), if any
    model_args: dict = field(default_factory=dict)
    # {"name": "fp32" | "int8" | "fp16", ...how it was made}; the model and fused graphs are
    # at this precision, the loss graphs fp32 (GraphKind.follows_precision)
    precision: dict = field(default_factory=lambda: {"name": "fp32"})

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_source": self.model_source,
            "opset": self.opset,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
            "losses": [loss.to_dict() for loss in self.losses],
            "weights": self.weights,
            "graphs": [g.to_dict() for g in self.graphs],
            "files": self.files,
            "producer": self.producer,
            "precision": self.precision,
        } | ({"model_args": self.model_args} if self.model_args else {})

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """A manifest valid under manifest.schema.json and consistent in itself (see
        `check_consistency`); ValueError naming the first problem."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format version {data.get('format_version')!r}, this lossx reads version "
                f"{FORMAT_VERSION}; export the artifact again with this lossx"
            )
        import fastjsonschema

        _check_file_names(data)
        try:
            _manifest_validator()(data)
        except fastjsonschema.JsonSchemaValueException as e:
            field_name = e.name.removeprefix("data").lstrip(".") or "the manifest"
            raise ValueError(f"{field_name} {e.message.removeprefix(e.name).strip()}") from None
        manifest = cls(
            model=data["model"],
            model_source=data.get("model_source"),
            model_args=dict(data.get("model_args") or {}),
            opset=int(data["opset"]),
            class_names=tuple(data["class_names"]),
            preprocessing=dict(data["preprocessing"]),
            losses=tuple(LossSpec.from_dict(loss) for loss in data["losses"]),
            weights=dict(data["weights"]),
            graphs=tuple(GraphEntry.from_dict(g) for g in data["graphs"]),
            files={name: dict(info) for name, info in data["files"].items()},
            producer=dict(data["producer"]),
            precision=dict(data.get("precision") or {"name": "fp32"}),
        )
        manifest.check_consistency()
        return manifest

    def check_consistency(self) -> None:
        """Refuse a manifest that contradicts itself or what this lossx writes: every graph
        exactly as lossx builds it for its kind and loss, every loss with its graphs, every
        file listed, the preprocessing the runtime applies, a class name per logit."""
        contract = self.contract
        names = self.loss_names
        if len(set(names)) != len(names):
            raise ValueError(f"losses name a loss twice: {', '.join(names)}")
        expected_files = {e.spec.file for e in self.graphs} | {self.weights["file"]}
        if set(self.files) != expected_files:
            odd = sorted(set(self.files) ^ expected_files)
            raise ValueError(f"files and graphs disagree about {', '.join(odd)}")
        stems = [entry.spec.stem for entry in self.graphs]
        for entry in self.graphs:
            if stems.count(entry.spec.stem) > 1:
                raise ValueError(f"graph {entry.spec.file} is listed twice")
            if entry.opset != self.opset:
                raise ValueError(f"{entry.spec.file} has opset {entry.opset}, not {self.opset}")
        if "model" not in stems:
            raise ValueError("no model.onnx graph")
        logits = self.graph("model").named_tensor(Role.LOGITS)
        if logits.shape[1:] != (contract.num_classes,):
            raise ValueError(
                f"{contract.num_classes} class_names for a model of logits "
                f"[{', '.join(map(str, logits.shape))}]"
            )
        model = model_graph(contract.shape, contract.num_classes)
        for entry in self.graphs:
            _check_graph_spec(entry.spec, self.losses, model)
        if not self.precision_record.trains and any(
            e.spec.kind in (GraphKind.TRAIN, GraphKind.OPTIMIZER) for e in self.graphs
        ):
            raise ValueError(f"a {self.precision_name} artifact holds a training graph")
        for loss in self.losses:
            for stem in (f"loss_{loss.name}", f"model_{loss.name}"):
                if stem not in stems:
                    raise ValueError(f"loss {loss.name} has no {stem}.onnx graph")

    @functools.cached_property
    def contract(self) -> ImageContract:
        """What the model takes and what its logits mean (see lossx.runtime.contract)."""
        return ImageContract.from_manifest(self.preprocessing, self.class_names)

    def graph(self, stem: str) -> GraphSpec:
        return next(e.spec for e in self.graphs if e.spec.stem == stem)

    @property
    def precision_name(self) -> str:
        return self.precision["name"]

    @property
    def precision_record(self) -> Precision:
        return PRECISIONS[self.precision_name]

    @property
    def loss_names(self) -> list[str]:
        return [loss.name for loss in self.losses]

    def loss_graph(self, name: str) -> GraphSpec:
        """The standalone graph of loss `name`."""
        for entry in self.graphs:
            if entry.spec.kind is GraphKind.LOSS and entry.spec.loss.name == name:
                return entry.spec
        raise ArtifactError(f"the artifact has no loss graph for {name}")


@functools.cache
def _manifest_validator():
    import fastjsonschema

    schema = resources.files("lossx.runtime").joinpath("manifest.schema.json").read_text()
    return fastjsonschema.compile(json.loads(schema))


def _check_file_names(data: dict) -> None:
    """Refuse a file name that is not a plain name inside the artifact (a path, a link name
    with a NUL byte), before anything else reads the names."""
    names = list(data.get("files") or {}) if isinstance(data.get("files"), dict) else []
    names += [g.get("file") for g in data.get("graphs") or [] if isinstance(g, dict)]
    if isinstance(data.get("weights"), dict):
        names.append(data["weights"].get("file"))
    for name in names:
        if not plain_name(name):
            raise ValueError(f"file name {name!r} is not a plain file name")


def plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and "\x00" not in name
        and name == Path(name).name
        and name not in (".", "..")
    )


def _check_graph_spec(spec: GraphSpec, losses: tuple[LossSpec, ...], model: GraphSpec) -> None:
    """Refuse a graph entry that is not exactly the graph lossx builds for its kind and loss in
    an artifact whose model graph is `model` (from the image contract)."""
    if spec.loss is not None and spec.loss not in losses:
        raise ValueError(f"{spec.file}: its loss {spec.loss} is not among the manifest's losses")
    expected = expected_spec(spec, model)
    if spec != expected:
        for side in ("inputs", "outputs"):
            for got, want in zip(getattr(spec, side), getattr(expected, side), strict=False):
                if got != want:
                    raise ValueError(
                        f"{spec.file}: {side[:-1]} {got.name} is declared {_tensor_text(got)}; "
                        f"lossx writes {_tensor_text(want)}"
                    )
        raise ValueError(f"{spec.file} is not the {spec.kind} graph lossx writes for it")


def _tensor_text(tensor: TensorSpec) -> str:
    shape = ", ".join(map(str, tensor.shape))
    return f"{tensor.name} {tensor.dtype} [{shape}] ({tensor.values}, {tensor.role})"


def load_manifest(artifact_dir: Path) -> Manifest:
    """Read and parse `manifest.json` without verifying the files it lists."""
    if not isinstance(artifact_dir, str | Path):
        raise ArtifactError(
            f"artifact directory: expected a path, got {type(artifact_dir).__name__}"
        )
    artifact_dir = input_folder(Path(artifact_dir), "artifact directory", ArtifactError)
    manifest_path = artifact_dir / MANIFEST_FILE
    if not manifest_path.exists():
        raise ArtifactError(
            f"{artifact_dir}: no {MANIFEST_FILE}; not a lossx artifact (make one with lossx export)"
        )
    regular_file(manifest_path, "manifest", ArtifactError)
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({e})") from None
    try:
        return Manifest.from_dict(data)
    except KeyError as e:
        raise ArtifactError(f"{manifest_path}: missing key {e}") from None
    except (TypeError, ValueError, AttributeError, SpecError) as e:
        raise ArtifactError(f"{manifest_path}: malformed ({e})") from None
