"""An exported artifact: a directory of ONNX graphs, a weights file and `manifest.json`.

`load_artifact` verifies every file's sha256 against the manifest before anything runs, and
each session's inputs and outputs against the manifest's description of its graph.
"""

import functools
import hashlib
import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lossx.errors import ArtifactError, SpecError
from lossx.files import input_folder, regular_file
from lossx.runtime.feeds import check_feed, check_outputs
from lossx.runtime.graphs import (
    GraphKind,
    GraphSpec,
    TensorSpec,
    expected_spec,
    model_graph,
)
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.options import check_sha256
from lossx.runtime.precisions import PRECISIONS, Precision
from lossx.runtime.preprocessing import PREPROCESSING
from lossx.runtime.session import open_session
from lossx.runtime.weights import check_finite, check_weights, read_weights

MANIFEST_FILE = "manifest.json"
FORMAT = "lossx-artifact"
FORMAT_VERSION = 3  # 2: loss specs with options, tensor value kinds; 3: tensor roles
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}


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
    preprocessing: dict
    losses: tuple[LossSpec, ...]
    weights: dict  # {"file": "weights.npz", "source": "seed" | "checkpoint", ...}
    graphs: tuple[GraphEntry, ...]
    files: dict[str, dict]  # file name -> {"sha256": ..., "bytes": ...}, every file listed
    producer: dict[str, str]  # package versions that produced the artifact
    # For a MODULE:ATTR model: {"import", "file", "sha256"} of its module's source
    model_source: dict | None = None
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
        }

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
        if self.preprocessing != PREPROCESSING:
            raise ValueError("preprocessing differs from what this lossx applies to images")
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
            _check_graph_spec(entry.spec, self.losses)
        if "model" not in stems:
            raise ValueError("no model.onnx graph")
        if not self.precision_record.trains and any(
            e.spec.kind is GraphKind.TRAIN for e in self.graphs
        ):
            raise ValueError(f"a {self.precision_name} artifact holds a training graph")
        for loss in self.losses:
            for stem in (f"loss_{loss.name}", f"model_{loss.name}"):
                if stem not in stems:
                    raise ValueError(f"loss {loss.name} has no {stem}.onnx graph")
        classes = model_graph().outputs[0].shape[1]
        if len(self.class_names) != classes:
            raise ValueError(
                f"{len(self.class_names)} class_names for a model of {classes} classes"
            )

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
        if not _plain_name(name):
            raise ValueError(f"file name {name!r} is not a plain file name")


def _plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and "\x00" not in name
        and name == Path(name).name
        and name not in (".", "..")
    )


def _check_graph_spec(spec: GraphSpec, losses: tuple[LossSpec, ...]) -> None:
    """Refuse a graph entry that is not exactly the graph lossx builds for its kind and loss."""
    if spec.loss is not None and spec.loss not in losses:
        raise ValueError(f"{spec.file}: its loss {spec.loss} is not among the manifest's losses")
    expected = expected_spec(spec)
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Artifact:
    """A verified artifact directory. Sessions open lazily, one per graph and provider.

    `weights`, when set (see `with_weights`), replace the shipped weights in every graph."""

    path: Path
    manifest: Manifest
    weights: dict[str, np.ndarray] | None = None
    # what `weights` are, in words: a file with its sha256, or weights the caller gave
    weights_source: str | None = None
    _sessions: dict = field(default_factory=dict, repr=False)
    _shipped: dict | None = field(default=None, repr=False)  # the weights file, read once

    def with_weights(self, weights: dict[str, np.ndarray] | Path | str) -> "Artifact":
        """This artifact with other weights: a dict by state_dict name or a weights file
        (.npz, as `lossx train --engine onnxruntime` writes), checked against the shipped ones."""
        if self.manifest.precision_record.converted:
            raise ArtifactError(
                f"{self.path}: --weights needs an fp32 artifact; this one's model is "
                f"{self.manifest.precision_name}, its weights converted into the graphs (export "
                "the weights with lossx export --checkpoint --precision instead)"
            )
        source = "weights given by the caller"
        if not isinstance(weights, dict):
            path = Path(weights)
            weights = read_weights(path)
            source = f"{path} (sha256 {sha256_of(path)})"
        check_weights(weights, self.shipped_parameters())
        return replace(self, weights={k: np.ascontiguousarray(v) for k, v in weights.items()},
                       weights_source=source, _sessions={})  # fmt: skip

    @property
    def weights_used(self) -> str:
        """Which weights the graphs run with, in words: the artifact's own or others."""
        return self.weights_source or f"the artifact's {self.manifest.weights['file']}"

    def graph(self, stem: str) -> GraphEntry:
        for entry in self.manifest.graphs:
            if entry.spec.stem == stem:
                return entry
        raise ArtifactError(f"{self.path}: the artifact has no graph {stem}.onnx")

    def parameters(self) -> dict[str, np.ndarray]:
        """The model's weights by state_dict name: `weights` if set, else the shipped ones."""
        if self.weights is not None:
            return dict(self.weights)
        return self.shipped_parameters()

    def shipped_parameters(self) -> dict[str, np.ndarray]:
        """The weights in the artifact's weights file (never a pickle), read and checked once;
        each call returns fresh copies, which callers (training) may change in place."""
        if self._shipped is None:
            path = self.path / self.manifest.weights["file"]
            weights = read_weights(path)
            check_finite(weights, str(path))
            self._shipped = weights
        return {name: value.copy() for name, value in self._shipped.items()}

    def has_graph(self, stem: str) -> bool:
        return any(entry.spec.stem == stem for entry in self.manifest.graphs)

    def session(
        self,
        stem: str,
        provider: str = "cpu",
        threads: int | None = None,
        optimization: str = "all",
        tf32: bool = False,
    ) -> ort.InferenceSession:
        """An ONNX Runtime session for graph `stem`, checked against the manifest (see
        `open_session` for the options)."""
        key = (stem, provider, threads, optimization, tf32)
        if key not in self._sessions:
            entry = self.graph(stem)
            replaced = None
            prefix = entry.spec.kind.weights_prefix
            if self.weights is not None and prefix is not None:
                # integer buffers (batch-norm's num_batches_tracked) are read by training
                # graphs only
                replaced = {
                    prefix + name: value
                    for name, value in self.weights.items()
                    if value.dtype == np.float32
                }
            session = open_session(
                self.path / entry.spec.file,
                provider,
                threads,
                optimization,
                tf32,
                replaced,
                weights_as_inputs=bool(entry.spec.parameter_names),
            )
            check_signature(session, entry.spec, self.manifest)
            self._sessions[key] = session
        return self._sessions[key]

    def run(
        self, stem: str, feed: dict[str, np.ndarray], **session_options
    ) -> dict[str, np.ndarray]:
        """Graph `stem`'s outputs by name, after checking `feed` (see `check_feed`), checked
        to be numbers where they must be (`check_outputs`); `session_options` as for
        `session`."""
        spec = self.graph(stem).spec
        check_feed(spec, feed)
        outputs = self.session(stem, **session_options).run(spec.output_names, feed)
        outputs = dict(zip(spec.output_names, outputs, strict=True))
        check_outputs(spec, outputs)
        return outputs


def check_signature(
    session: ort.InferenceSession, spec: GraphSpec, manifest: "Manifest | None" = None
) -> None:
    """Refuse a session whose input/output names, dtypes or shapes differ from `spec`, or
    (given the `manifest`) whose lossx metadata, written into every graph at export,
    contradicts the manifest's account of it."""
    for role, actual, declared in (
        ("inputs", session.get_inputs(), spec.inputs),
        ("outputs", session.get_outputs(), spec.outputs),
    ):
        got = [(a.name, _ORT_DTYPES.get(a.type, a.type), _dims(a.shape)) for a in actual]
        want = [(t.name, t.dtype, _dims(t.shape)) for t in declared]
        if got != want:
            raise ArtifactError(
                f"{spec.file}: graph {role} {_describe(got)} differ from the manifest's "
                f"{_describe(want)}"
            )
    if manifest is None:
        return
    metadata = session.get_modelmeta().custom_metadata_map
    claims = {
        "lossx.graph": str(spec.kind),
        "lossx.model": manifest.model,
        "lossx.class_names": list(manifest.class_names),
        "lossx.preprocessing": manifest.preprocessing,
        "lossx.inputs": [t.to_dict() for t in spec.inputs],
        "lossx.outputs": [t.to_dict() for t in spec.outputs],
        "lossx.loss": spec.loss.to_dict() if spec.loss else None,
    }
    for key, claim in claims.items():
        try:
            written = json.loads(metadata[key]) if key != "lossx.graph" else metadata[key]
        except KeyError:
            written = None
        except json.JSONDecodeError:
            written = metadata[key]
        if written != claim:
            field_name = key.removeprefix("lossx.")
            raise ArtifactError(
                f"{spec.file}: the manifest's {field_name} is not what the graph was exported "
                "with (manifest edited, or graph from another artifact)"
            )


def _dims(shape: list | tuple) -> tuple:
    """A shape with every symbolic dim as "?": fixed sizes must agree, symbols need not."""
    return tuple(d if isinstance(d, int) else "?" for d in shape)


def _describe(signature: list[tuple[str, str, tuple]]) -> str:
    parts = (f"{name}:{dtype}[{', '.join(map(str, dims))}]" for name, dtype, dims in signature)
    return "[" + ", ".join(parts) + "]"


def _safe_member(root: Path, name: object) -> Path:
    """The path of a file the manifest lists, refusing anything that leaves the artifact."""
    if not _plain_name(name):
        raise ArtifactError(f"{root / MANIFEST_FILE}: file name {name!r} is not a plain file name")
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{path}: refusing a link; artifact files must be regular files")
    if not path.exists():
        raise ArtifactError(f"{path}: listed in the manifest but missing")
    return regular_file(path, "artifact file", ArtifactError)


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


def load_artifact(artifact_dir: Path, manifest_sha256: str | None = None) -> Artifact:
    """Load an artifact directory, verifying every file's sha256 against the manifest.

    `manifest_sha256` pins the artifact: the manifest's own sha256 (which `lossx export`
    prints) must equal it, so every file is then the one the producer wrote.
    """
    if manifest_sha256 is not None:
        check_sha256(manifest_sha256)
    manifest = load_manifest(artifact_dir)
    artifact_dir = Path(artifact_dir)
    if manifest_sha256 is not None:
        actual = sha256_of(artifact_dir / MANIFEST_FILE)
        if actual != manifest_sha256.strip().lower():
            raise ArtifactError(
                f"{artifact_dir / MANIFEST_FILE}: sha256 {actual} is not the required "
                f"{manifest_sha256}"
            )
    listed = set(manifest.files)
    for entry in manifest.graphs:
        if entry.spec.file not in listed:
            raise ArtifactError(f"{artifact_dir / MANIFEST_FILE}: {entry.spec.file} has no sha256")
    graph_files = {entry.spec.file for entry in manifest.graphs}
    for name, info in manifest.files.items():
        path = _safe_member(artifact_dir, name)
        expected = info["sha256"]
        graph = path.read_bytes() if name in graph_files else None  # read once: hash and scan
        actual = hashlib.sha256(graph).hexdigest() if graph is not None else sha256_of(path)
        if actual != expected:
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest (file changed or corrupt)"
            )
        if path.stat().st_size != info["bytes"]:
            raise ArtifactError(
                f"{path}: {path.stat().st_size:,} bytes, the manifest says {info['bytes']:,}"
            )
        if graph is not None:
            _refuse_external_data(path, graph)
    artifact = Artifact(artifact_dir, manifest)
    artifact.shipped_parameters()  # read now, while the sha256 just checked holds; refuses NaN
    return artifact


def _refuse_external_data(path: Path, data: bytes) -> None:
    """Refuse a graph whose tensors live in external files: those files are outside what the
    manifest's sha256s cover (and ONNX Runtime would read them from wherever they point).

    External data needs the key "location" in the file, so only a file holding those bytes is
    parsed (importing onnx costs 0.2 s of start-up)."""
    if b"location" not in data:
        return
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load_from_string(data)
    except Exception:  # unparsable: ONNX Runtime reports it when the session opens
        return
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            where = next((e.value for e in tensor.external_data if e.key == "location"), "?")
            raise ArtifactError(
                f"{path}: tensor {tensor.name!r} keeps its data in external file {where!r}; "
                "lossx artifacts hold every tensor inside the graph, covered by the manifest"
            )
