"""A torch-free CIFAR-10 reader: the standard `cifar-10-batches-py` layout or the packaged sample.

The batch files are Python pickles. Unpickling runs whatever a file asks for, so the reader
uses an unpickler that admits only what a CIFAR-10 batch holds (numpy array reconstruction and
plain containers) and refuses anything else before it runs.
"""

import codecs
import io
import pickle
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from lossx.errors import DataError
from lossx.files import input_folder
from lossx.runtime.contract import ImageContract
from lossx.runtime.image_set import ImageSet

CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
BATCHES_DIR = "cifar-10-batches-py"
SPLIT_FILES = {
    "test": ("test_batch",),
    "train": tuple(f"data_batch_{k}" for k in range(1, 6)),
}
SAMPLE_RESOURCE = "cifar10_test_subset.npz"
SAMPLE_SOURCE = "packaged sample: CIFAR-10 test images "
IMAGE_SHAPE = (3, 32, 32)  # CIFAR-10's images, C,H,W
# What a model trained on CIFAR-10 as it comes takes: its images scaled to [0, 1], its classes
CONTRACT = ImageContract(*IMAGE_SHAPE, CLASS_NAMES, (0.0,) * 3, (1.0,) * 3)
_PIXELS = 32 * 32 * 3


class StreamedImages:
    """The images of several batch files, read again one file at a time when sliced, so that
    going through a split in order holds one file (10,000 images, 30 MB) in memory, not all.
    `fit` turns each slice into the artifact's image size (see lossx.runtime.images.fit)."""

    def __init__(
        self,
        paths: list[Path],
        counts: list[int],
        length: int | None = None,
        fit: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.paths, self.counts, self.fit = paths, counts, fit
        self.starts = np.cumsum([0, *counts])
        self.length = int(self.starts[-1]) if length is None else length
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def head(self, limit: int) -> "StreamedImages":
        return StreamedImages(self.paths, self.counts, min(limit, self.length), self.fit)

    def fitted(self, fit: Callable[[np.ndarray], np.ndarray]) -> "StreamedImages":
        return StreamedImages(self.paths, self.counts, self.length, fit)

    def batch(self, start: int, stop: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = self[start:stop]
        return (self.fit(images) if self.fit else images), labels

    def _file(self, index: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != index:
            images = read_batch(self.paths[index])[0]
            if len(images) != self.counts[index]:
                raise DataError(f"{self.paths[index]}: changed while being read")
            self._cached = (index, images)
        return self._cached[1]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("streamed images are read by contiguous slices")
        start, stop, _ = key.indices(self.length)
        parts = []
        for index, (first, end) in enumerate(zip(self.starts[:-1], self.starts[1:], strict=True)):
            if start < end and stop > first:
                parts.append(self._file(index)[max(start, first) - first : min(stop, end) - first])
        return np.concatenate(parts) if parts else np.empty((0, 32, 32, 3), np.uint8)


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array reconstructor, whatever its module
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 pickles bytes at protocol 2
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays"
            ) from None


def _unpickle(path: Path) -> object:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # any malformed pickle: report it in one line
        raise DataError(f"{path}: not a CIFAR-10 batch ({e})") from None


def _str_keys(obj: object, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (holds {type(obj).__name__}, not dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def validated_batch(images: object, labels: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check a batch's arrays; return images as uint8 [N,32,32,3] and labels as int64 [N]."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{where}: images must be a uint8 array, got {kind}")
    if images.ndim == 2 and images.shape[1] == _PIXELS:  # official layout: R, G, B planes
        images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{where}: images must have shape [N,3072] or [N,32,32,3], got {list(images.shape)}"
        )
    try:
        label_array = np.asarray(labels)
    except Exception:
        label_array = np.empty(0, dtype=object)
    if label_array.ndim != 1 or not np.issubdtype(label_array.dtype, np.integer):
        raise DataError(f"{where}: labels must be a list of integers")
    if len(label_array) != len(images):
        raise DataError(f"{where}: {len(images)} images but {len(label_array)} labels")
    bad = (label_array < 0) | (label_array >= len(CLASS_NAMES))
    if bad.any():
        raise DataError(
            f"{where}: label {int(label_array[bad][0])} out of range 0..{len(CLASS_NAMES) - 1}"
        )
    return images, label_array.astype(np.int64)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one `cifar-10-batches-py` batch file: images uint8 [N,32,32,3], labels int64 [N]."""
    batch = _str_keys(_unpickle(path), path)
    missing = {"data", "labels"} - batch.keys()
    if missing:
        raise DataError(f"{path}: not a CIFAR-10 batch (no {', '.join(sorted(missing))} key)")
    return validated_batch(batch["data"], batch["labels"], str(path))


def _read_class_names(batches: Path) -> tuple[str, ...]:
    meta = batches / "batches.meta"
    if not meta.exists():
        return CLASS_NAMES
    names = _str_keys(_unpickle(meta), meta).get("label_names")
    if (
        not isinstance(names, list)
        or len(names) != len(CLASS_NAMES)
        or not all(isinstance(n, str) for n in names)
    ):
        raise DataError(f"{meta}: label_names must be a list of {len(CLASS_NAMES)} strings")
    return tuple(names)


def is_test_only(data_dir: Path) -> bool:
    """Whether `data_dir` holds CIFAR-10's test batch and none of its training batches."""
    batches = data_dir / BATCHES_DIR
    folder = batches if batches.is_dir() else data_dir
    return (folder / "test_batch").exists() and not any(folder.glob("data_batch_*"))


def class_names(data_dir: Path) -> tuple[str, ...]:
    """The class names of the CIFAR-10 batches in `data_dir`, from batches.meta alone."""
    return _read_class_names(_batches_dir(Path(data_dir), "train"))


def _batches_dir(data_dir: Path, split: str) -> Path:
    input_folder(data_dir, "data directory", DataError)
    for candidate in (data_dir / BATCHES_DIR, data_dir):
        if any((candidate / f).is_file() for files in SPLIT_FILES.values() for f in files):
            return candidate
    expected = "test_batch" if split == "test" else "data_batch_1..5"
    raise DataError(
        f"{data_dir}: no CIFAR-10 {split} batches (expected {data_dir / BATCHES_DIR}/{expected})"
    )


def load_cifar10(
    data_dir: Path | None = None,
    split: str = "test",
    limit: int | None = None,
    stream: bool = False,
) -> ImageSet:
    """Load a CIFAR-10 split from `data_dir` (the folder holding `cifar-10-batches-py/`).

    With `data_dir` None, the packaged sample is used: official test images 0-999. With
    `stream`, every file is read and checked now but only its labels are kept; the images are
    read again, one file at a time, as they are sliced (see StreamedImages).
    """
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_FILES)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    if data_dir is None:
        if split != "test":
            raise DataError(
                "the packaged sample holds test images only; pass --data-dir for the train split"
            )
        return load_packaged_sample().head(limit)
    batches = _batches_dir(Path(data_dir), split)
    images, labels, paths = [], [], []
    loaded = 0
    for name in SPLIT_FILES[split]:
        path = batches / name
        if not path.is_file():
            raise DataError(f"{batches}: missing {name} for the {split} split")
        batch_images, batch_labels = read_batch(path)
        if not stream:
            images.append(batch_images)
        paths.append(path)
        labels.append(batch_labels)
        loaded += len(batch_labels)
        if limit is not None and loaded >= limit:
            break
    split_images = (
        StreamedImages(paths, [len(b) for b in labels]) if stream else np.concatenate(images)
    )
    split_data = ImageSet(
        split_images,
        np.concatenate(labels),
        _read_class_names(batches),
        f"{batches} ({split})",
    )
    return split_data.head(limit)


def load_packaged_sample() -> ImageSet:
    """The 1,000 official CIFAR-10 test images 0-999 shipped inside lossx."""
    resource = resources.files("lossx.runtime").joinpath("data", SAMPLE_RESOURCE)
    with resources.as_file(resource) as path, np.load(path, allow_pickle=False) as npz:
        where = f"packaged {SAMPLE_RESOURCE}"
        images, labels = validated_batch(npz["images"], npz["labels"], where)
    return ImageSet(images, labels, CLASS_NAMES, f"{SAMPLE_SOURCE}0-{len(labels) - 1}")
