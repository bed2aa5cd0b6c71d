"""An artifact written again with other weights, torch-free: what an app that fine-tuned a model
on device ships. Every graph is kept; the ones holding the weights as initializers (the model
and fused graphs) get the new values under the same names, the others (losses, training and
optimizer graphs) take weights as inputs and are copied as they are. The manifest is the old
one with the new weights record and every file's sha256 and size, and the runtime loads the
result before it replaces `out_dir`."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from lossx.errors import ArtifactError
from lossx.files import check_destination, write_folder_atomically
from lossx.runtime.artifact import Artifact, graph_initializers, load_artifact, sha256_of
from lossx.runtime.manifest import MANIFEST_FILE, Manifest
from lossx.runtime.session import replace_initializers
from lossx.runtime.weights import check_weights


def write_reweighted(
    artifact: Artifact, weights: dict[str, np.ndarray], out_dir: Path, record: dict
) -> Manifest:
    """Write `artifact` with `weights` (by state_dict name, the shipped ones' names, shapes and
    dtypes) to `out_dir`, its manifest's weights record `record` (source and what made them)."""
    if artifact.manifest.precision_record.converted:
        raise ArtifactError(
            f"{artifact.path}: its model is {artifact.manifest.precision_name}; only an fp32 "
            "artifact takes new weights"
        )
    check_weights(weights, artifact.shipped_state_dict())
    out_dir = check_destination(Path(out_dir), MANIFEST_FILE, ArtifactError)
    if out_dir == artifact.path.absolute():
        raise ArtifactError(f"{out_dir}: is the artifact being read; write to another folder")
    return write_folder_atomically(
        out_dir, lambda staged: _write(artifact, weights, staged, record), ArtifactError
    )


def _write(artifact: Artifact, weights: dict, staged: Path, record: dict) -> Manifest:
    manifest = artifact.manifest
    record = {"file": manifest.weights["file"], **record}
    for entry in manifest.graphs:
        source, target = artifact.path / entry.spec.file, staged / entry.spec.file
        initializers = graph_initializers(entry.spec, weights)
        if initializers is None:
            shutil.copyfile(source, target)
            continue
        model = onnx.load(str(source))
        replace_initializers(model, initializers)
        for prop in model.metadata_props:
            if prop.key == "lossx.weights":
                prop.value = json.dumps(record)
        onnx.save(model, str(target))
    np.savez(staged / record["file"], **weights)
    files = {
        name: {"sha256": sha256_of(staged / name), "bytes": (staged / name).stat().st_size}
        for name in manifest.files
    }
    data = manifest.to_dict() | {"weights": record, "files": files}
    (staged / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return load_artifact(staged).manifest  # the runtime must accept exactly what was written
