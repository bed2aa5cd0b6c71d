"""Weights files: the .npz of arrays by state_dict name that artifacts ship, `lossx train
--engine onnxruntime` writes and `--weights` reads. Never a pickle; every array's size is
checked against its header before numpy allocates it.
"""

import math
import zipfile
from pathlib import Path

import numpy as np

from lossx.errors import CheckpointError, first_line
from lossx.files import regular_file


def read_weights(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """The weights in an .npz file (never a pickle) by state_dict name: the arrays under
    `prefix`, which is stripped. Keys holding a further "/" (the optimizer state `lossx train
    --engine onnxruntime` keeps beside the weights) are left out."""
    path = regular_file(path, "weights file", CheckpointError)
    kind = file_kind(path)
    if kind == "torch":
        raise CheckpointError(
            f"{path}: a torch checkpoint, not an .npz of weights; export it into an artifact "
            "with lossx export --checkpoint"
        )
    if kind != "npz":
        raise CheckpointError(f"{path}: not an .npz weights file ({kind})")
    try:
        check_npz_sizes(path)
        with np.load(path, allow_pickle=False) as npz:
            return {
                name.removeprefix(prefix): npz[name]
                for name in npz.files
                if name.startswith(prefix) and "/" not in name.removeprefix(prefix)
            }
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not an .npz weights file ({first_line(e)})") from None


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def check_npz_sizes(path: Path) -> None:
    """ValueError unless every array of the .npz at `path` holds exactly the bytes its header
    declares. np.load allocates what the header declares before reading: a shape of 10^15 asks
    for petabytes, and numpy's MemoryError would be the answer."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in _NPY_HEADERS:
                    raise ValueError(f"{info.filename}: .npy format {version} is not supported")
                shape, _, dtype = _NPY_HEADERS[version](f)
                if dtype.hasobject:
                    raise ValueError(f"{info.filename}: holds Python objects (a pickle)")
                declared = math.prod(shape) * dtype.itemsize
                held = info.file_size - f.tell()
            if declared != held:
                raise ValueError(
                    f"{info.filename}: its header declares {list(shape)} {dtype} ({declared:,} "
                    f"bytes) but it holds {held:,} bytes"
                )


def file_kind(path: Path) -> str:
    """What a weights or checkpoint file holds, by its content, whatever its name: "npz" (numpy
    arrays), "torch" (torch.save's zip or legacy pickle), else a few words saying what it is."""
    with Path(path).open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            return "torch"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        return "a zip archive of neither numpy arrays nor a torch checkpoint"
    if head[:1] == b"\x80":
        return "torch"  # torch.save's legacy (non-zip) pickle format
    return "not a zip archive" if head else "an empty file"


def check_finite(weights: dict[str, np.ndarray], source: str) -> None:
    """Refuse weights holding NaN or Inf, naming the first such parameter."""
    for name, value in weights.items():
        value = np.asarray(value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise CheckpointError(f"{source}: {name} holds NaN or Inf")


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
        if value.dtype != expected[name].dtype:
            raise CheckpointError(
                f"weights: {name} is {value.dtype}, the model needs {expected[name].dtype}"
            )
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"weights: {name} has shape {list(value.shape)}, the model needs "
                f"{list(expected[name].shape)}"
            )
    check_finite(weights, "weights")
