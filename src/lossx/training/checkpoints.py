"""Checkpoint files of `lossx train`: what kind a file is, whether training may write over it,
and the ONNX Runtime engine's .npz checkpoint (the weights and buffers by state_dict name, what
`lossx export --checkpoint`, `lossx eval --weights` and `Artifact.with_weights` read; the
optimizer's state under "<state>/<name>", e.g. "exp_avg/fc.weight"; the recipe, log, optimizer
step count and artifact under "lossx/state" as JSON). The torch engine's .pt checkpoint needs
torch to read: lossx.build.torch_engine.
Checked before torch is imported, so that a wrong file is refused in a fraction of a second.
"""

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lossx.errors import CheckpointError, first_line
from lossx.files import output_file, regular_file, write_atomically
from lossx.runtime.artifact import Artifact, sha256_of
from lossx.runtime.manifest import MANIFEST_FILE
from lossx.runtime.weights import check_npz_sizes, file_kind

CHECKPOINT_FORMAT = "lossx-onnxruntime-checkpoint"
STATE_KEY = "lossx/state"


def check_checkpoint_kind(path: Path, kinds: tuple[str, ...], overwrite: bool = False) -> None:
    """Refuse a checkpoint file that is not of `kinds` by content ("npz", "torch"), before torch
    is imported; with `overwrite`, a file about to be overwritten (lossx.training.trainer then
    refuses one that is of the kind but not the engine's checkpoint)."""
    what = "--out" if overwrite else "checkpoint"
    kind = file_kind(regular_file(path, what, CheckpointError))
    if kind not in kinds:
        names = {"npz": "an .npz", "torch": "a torch checkpoint"}
        described = names.get(kind, kind)
        wanted = " or ".join(names[k] for k in kinds)
        if overwrite:
            raise CheckpointError(
                f"--out {path} exists and is {described}, not {wanted} of this engine; "
                "refusing to overwrite it (choose another --out)"
            )
        raise CheckpointError(f"checkpoint {path} is {described}; expected {wanted}")


def checkpoint_path(out: Path, is_checkpoint: Callable[[Path], bool], resume: Path | None) -> Path:
    """`out`, refused at once (not after the first epoch) if it cannot be written, or if it is
    a file other than a checkpoint of this engine (or the one being resumed): training never
    overwrites an unrelated file."""
    out = output_file(Path(out), "checkpoint")
    if out.exists() and out != resume and not is_checkpoint(out):
        raise CheckpointError(
            f"--out {out} exists and is not a checkpoint of this engine; refusing to overwrite "
            "it (choose another --out)"
        )
    return out


def write_npz_checkpoint(
    out: Path,
    weights: dict[str, np.ndarray],
    optimizer_state: dict[str, dict[str, np.ndarray]],
    state: dict,
) -> None:
    """Write an .npz checkpoint atomically: weights, each optimizer state by parameter and the
    JSON state."""
    arrays = dict(weights)
    for kind, values in optimizer_state.items():
        arrays.update({f"{kind}/{name}": value for name, value in values.items()})
    arrays[STATE_KEY] = np.array(json.dumps({"format": CHECKPOINT_FORMAT, **state}))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(out, lambda f: f.write(buffer.getvalue()))


def checkpoint_state(path: Path) -> dict | None:
    """The recipe and log an .npz checkpoint of this engine carries (None for plain weights)."""
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as npz:
            if STATE_KEY not in npz.files:
                return None
            state = json.loads(str(npz[STATE_KEY]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not an .npz checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: {STATE_KEY} is not a lossx training state")
    return state


def resume_state(artifact: Artifact, path: Path) -> dict:
    """The state of a checkpoint this engine wrote with `artifact`, or a one-line refusal."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = checkpoint_state(path)
    if state is None:
        raise CheckpointError(
            f"{path}: weights only, not a checkpoint of lossx train --engine onnxruntime; "
            "cannot resume from it"
        )
    if state.get("artifact_manifest_sha256") != sha256_of(artifact.path / MANIFEST_FILE):
        raise CheckpointError(f"{path}: was trained with another artifact than {artifact.path}")
    return state


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds a checkpoint this engine wrote (of any artifact)."""
    try:
        return file_kind(path) == "npz" and checkpoint_state(path) is not None
    except (CheckpointError, OSError):
        return False
