"""An exported artifact: a directory of ONNX graphs, a weights file and `manifest.json`.

`load_artifact` verifies every file's sha256 against the manifest before anything runs, and
each session's inputs and outputs against the manifest's description of its graph.
"""

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lossx.errors import ArtifactError
from lossx.files import regular_file
from lossx.runtime.contract import ImageContract
from lossx.runtime.feeds import check_feed, check_outputs
from lossx.runtime.graphs import (
    GraphSpec,
)
from lossx.runtime.manifest import MANIFEST_FILE, GraphEntry, Manifest, load_manifest, plain_name
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions, check_sha256
from lossx.runtime.session import open_session
from lossx.runtime.weights import check_finite, check_weights, read_weights

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


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
        check_weights(weights, self.shipped_state_dict())
        return replace(self, weights={k: np.ascontiguousarray(v) for k, v in weights.items()},
                       weights_source=source, _sessions={})  # fmt: skip

    @property
    def contract(self) -> ImageContract:
        """The image size, channels, classes and preprocessing the model takes."""
        return self.manifest.contract

    @property
    def weights_used(self) -> str:
        """Which weights the graphs run with, in words: the artifact's own or others."""
        return self.weights_source or f"the artifact's {self.manifest.weights['file']}"

    def graph(self, stem: str) -> GraphEntry:
        for entry in self.manifest.graphs:
            if entry.spec.stem == stem:
                return entry
        raise ArtifactError(f"{self.path}: the artifact has no graph {stem}.onnx")

    def state_dict(self) -> dict[str, np.ndarray]:
        """The model's parameters and buffers by state_dict name: `weights` if set, else the
        shipped ones."""
        if self.weights is not None:
            return dict(self.weights)
        return self.shipped_state_dict()

    def shipped_state_dict(self) -> dict[str, np.ndarray]:
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

    def session(self, stem: str, options: SessionOptions = DEFAULT_SESSION) -> ort.InferenceSession:
        """An ONNX Runtime session for graph `stem` run with `options`, checked against the
        manifest."""
        key = (stem, options)
        if key not in self._sessions:
            entry = self.graph(stem)
            replaced = None
            if self.weights is not None:
                replaced = graph_initializers(entry.spec, self.weights)
            session = open_session(
                self.path / entry.spec.file,
                options,
                replaced,
                weights_as_inputs=bool(entry.spec.parameter_names),
            )
            check_signature(session, entry.spec, self.manifest)
            self._sessions[key] = session
        return self._sessions[key]

    def run(
        self, stem: str, feed: dict[str, np.ndarray], options: SessionOptions = DEFAULT_SESSION
    ) -> dict[str, np.ndarray]:
        """Graph `stem`'s outputs by name, run with `options` after checking `feed` (see
        `check_feed`), checked to be numbers where they must be (`check_outputs`)."""
        spec = self.graph(stem).spec
        check_feed(spec, feed, self.contract.pixel_range())
        outputs = self.session(stem, options).run(spec.output_names, feed)
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
    if not plain_name(name):
        raise ArtifactError(f"{root / MANIFEST_FILE}: file name {name!r} is not a plain file name")
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{path}: refusing a link; artifact files must be regular files")
    if not path.exists():
        raise ArtifactError(f"{path}: listed in the manifest but missing")
    return regular_file(path, "artifact file", ArtifactError)


def graph_initializers(spec: GraphSpec, weights: dict[str, np.ndarray]) -> dict | None:
    """`weights` under the initializer names graph `spec` holds them by (None for a graph that
    takes its weights as inputs). Integer buffers (batch norm's num_batches_tracked) are read
    by training graphs only."""
    prefix = spec.kind.weights_prefix
    if prefix is None:
        return None
    return {prefix + name: value for name, value in weights.items() if value.dtype == np.float32}


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
    artifact.shipped_state_dict()  # read now, while the sha256 just checked holds; refuses NaN
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
