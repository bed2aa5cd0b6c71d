"""An exported artifact: a directory of ONNX graphs, a weights file and `manifest.json`.

`load_artifact` verifies every file's sha256 against the manifest before anything runs, and
each session's inputs and outputs against the manifest's description of its graph.
"""

import hashlib
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lossx.errors import ArtifactError, CheckpointError, SpecError, first_line
from lossx.runtime.graphs import GraphKind, GraphSpec, TensorSpec, check_feed
from lossx.runtime.loss_specs import LossSpec
from lossx.runtime.session import open_session

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

    model: str
    opset: int
    class_names: tuple[str, ...]
    preprocessing: dict
    losses: tuple[LossSpec, ...]
    weights: dict  # {"file": "weights.npz", "source": "seed" | "checkpoint", ...}
    graphs: tuple[GraphEntry, ...]
    files: dict[str, dict]  # file name -> {"sha256": ..., "bytes": ...}, every file listed
    producer: dict[str, str]  # package versions that produced the artifact

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "opset": self.opset,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing,
            "losses": [loss.to_dict() for loss in self.losses],
            "weights": self.weights,
            "graphs": [g.to_dict() for g in self.graphs],
            "files": self.files,
            "producer": self.producer,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format version {data.get('format_version')!r}, this lossx reads version "
                f"{FORMAT_VERSION}; export the artifact again with this lossx"
            )
        return cls(
            model=data["model"],
            opset=int(data["opset"]),
            class_names=tuple(data["class_names"]),
            preprocessing=dict(data["preprocessing"]),
            losses=tuple(LossSpec.from_dict(loss) for loss in data["losses"]),
            weights=dict(data["weights"]),
            graphs=tuple(GraphEntry.from_dict(g) for g in data["graphs"]),
            files={name: dict(info) for name, info in data["files"].items()},
            producer=dict(data["producer"]),
        )

    @property
    def loss_names(self) -> list[str]:
        return [loss.name for loss in self.losses]

    def loss_graph(self, name: str) -> GraphSpec:
        """The standalone graph of loss `name`."""
        for entry in self.graphs:
            if entry.spec.kind is GraphKind.LOSS and entry.spec.loss.name == name:
                return entry.spec
        raise ArtifactError(f"the artifact has no loss graph for {name}")


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
    _sessions: dict = field(default_factory=dict, repr=False)

    def with_weights(self, weights: dict[str, np.ndarray] | Path | str) -> "Artifact":
        """This artifact with other weights: a dict by state_dict name or a weights file
        (.npz, as `lossx train --engine onnxruntime` writes), checked against the shipped ones."""
        if not isinstance(weights, dict):
            weights = read_weights(Path(weights))
        check_weights(weights, self.shipped_parameters())
        return replace(self, weights={k: np.ascontiguousarray(v) for k, v in weights.items()},
                       _sessions={})  # fmt: skip

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
        """The weights in the artifact's weights file (never a pickle)."""
        return read_weights(self.path / self.manifest.weights["file"])

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
                replaced = {prefix + name: value for name, value in self.weights.items()}
            # A graph whose convolutions take their weights as inputs (a training graph) gains
            # nothing from NCHWc, which only reorders its constant im2col convolutions'
            # outputs: 14% (batch 64) and 9% (256) slower, measured with bench/train_step.py.
            session = open_session(
                self.path / entry.spec.file,
                provider,
                threads,
                optimization,
                tf32,
                replaced,
                nchwc=not entry.spec.parameter_names,
            )
            check_signature(session, entry.spec)
            self._sessions[key] = session
        return self._sessions[key]

    def run(
        self, stem: str, feed: dict[str, np.ndarray], **session_options
    ) -> dict[str, np.ndarray]:
        """Graph `stem`'s outputs by name, after checking `feed` (see `check_feed`);
        `session_options` as for `session`."""
        spec = self.graph(stem).spec
        check_feed(spec, feed)
        outputs = self.session(stem, **session_options).run(spec.output_names, feed)
        return dict(zip(spec.output_names, outputs, strict=True))


def check_signature(session: ort.InferenceSession, spec: GraphSpec) -> None:
    """Refuse a session whose input/output names, dtypes or ranks differ from `spec`."""
    for role, actual, declared in (
        ("inputs", session.get_inputs(), spec.inputs),
        ("outputs", session.get_outputs(), spec.outputs),
    ):
        got = [(a.name, _ORT_DTYPES.get(a.type, a.type), len(a.shape)) for a in actual]
        want = [(t.name, t.dtype, len(t.shape)) for t in declared]
        if got != want:
            raise ArtifactError(
                f"{spec.file}: graph {role} {_describe(got)} differ from the manifest's "
                f"{_describe(want)}"
            )


def _describe(signature: list[tuple[str, str, int]]) -> str:
    return "[" + ", ".join(f"{name}:{dtype}/rank {rank}" for name, dtype, rank in signature) + "]"


def _safe_member(root: Path, name: object) -> Path:
    """The path of a file the manifest lists, refusing anything that leaves the artifact."""
    if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
        raise ArtifactError(f"{root / MANIFEST_FILE}: file name {name!r} is not a plain file name")
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{path}: refusing a link; artifact files must be regular files")
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in the manifest but missing")
    return path


def load_manifest(artifact_dir: Path) -> Manifest:
    """Read and parse `manifest.json` without verifying the files it lists."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise ArtifactError(f"artifact directory {artifact_dir} does not exist")
    manifest_path = artifact_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{artifact_dir}: no {MANIFEST_FILE}; not a lossx artifact (make one with lossx export)"
        )
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
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
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
        expected = info.get("sha256") if isinstance(info, dict) else None
        graph = path.read_bytes() if name in graph_files else None  # read once: hash and scan
        actual = hashlib.sha256(graph).hexdigest() if graph is not None else sha256_of(path)
        if actual != expected:
            raise ArtifactError(
                f"{path}: sha256 does not match the manifest (file changed or corrupt)"
            )
        if graph is not None:
            _refuse_external_data(path, graph)
    return Artifact(artifact_dir, manifest)


def read_weights(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """The weights in an .npz file (never a pickle) by state_dict name: the arrays under
    `prefix`, which is stripped. Keys holding a further "/" (the optimizer state `lossx train
    --engine onnxruntime` keeps beside the weights) are left out."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not an .npz weights file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {
                name.removeprefix(prefix): npz[name]
                for name in npz.files
                if name.startswith(prefix) and "/" not in name.removeprefix(prefix)
            }
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not an .npz weights file ({first_line(e)})") from None


def check_weights(weights: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Refuse weights whose names, shapes or dtype differ from `expected`, or that are not
    finite, naming the first offending parameter."""
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
        raise CheckpointError(f"weights do not fit the model: {'; '.join(parts)}")
    for name, value in weights.items():
        value = np.asarray(value)
        if value.dtype != np.float32:
            raise CheckpointError(f"weights: {name} is {value.dtype}, the model needs float32")
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"weights: {name} has shape {list(value.shape)}, the model needs "
                f"{list(expected[name].shape)}"
            )
        if not np.isfinite(value).all():
            raise CheckpointError(f"weights: {name} holds NaN or Inf")


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
