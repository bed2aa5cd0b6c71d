"""The datasets lossx reads, by layout, as ImageSets fitted to an artifact's image contract.

`--data-dir` (and `--calibration-data`) name one of:
- a folder holding CIFAR-10's `cifar-10-batches-py` (or its batch files): splits train, test;
- an image folder in torchvision's ImageFolder layout (lossx.runtime.image_folder), with
  `train/` and `test/` (or `val/`) sub-folders as its splits, or else one split;
- an `.npz` file of `images` (uint8 [N,H,W,C], or [N,H,W] for one channel) and `labels` (integer
  class indices), with `class_names` (strings) where the classes are not the artifact's: one
  split.
With no data, the packaged sample of CIFAR-10 test images 0-999 is read. Images of another size
or channel count are fitted to the contract as image files are (lossx.runtime.images). A set
whose class names differ from the artifact's is refused: its labels would mean other classes.
"""

import zipfile
from functools import partial
from pathlib import Path

import numpy as np

from lossx.errors import DataError
from lossx.files import input_folder, regular_file
from lossx.runtime.cifar10 import (
    BATCHES_DIR,
    SPLIT_FILES,
    StreamedImages,
    load_cifar10,
)
from lossx.runtime.cifar10 import class_names as cifar10_class_names
from lossx.runtime.contract import ImageContract
from lossx.runtime.image_folder import (
    DECODE_WORKERS,
    class_folders,
    is_image_folder,
    load_image_folder,
    split_folder,
)
from lossx.runtime.image_set import ImageSet

SPLITS = tuple(SPLIT_FILES)  # "test", "train"
LAYOUTS = (
    "CIFAR-10 batches, an image folder (DIR/<class>/<image>, optionally under train/ and "
    "test/ or val/), or an .npz of images and labels"
)


def load_dataset(
    data: Path | None,
    split: str,
    contract: ImageContract,
    limit: int | None = None,
    stream: bool = False,
    strict: bool = False,
    workers: int = DECODE_WORKERS,
    classes_checked: bool = True,
) -> ImageSet:
    """Split `split` of dataset `data` (see the module docstring), its first `limit` images,
    at the contract's image size, its class names checked against the contract's (unless not
    `classes_checked`: where labels are not read). With `stream`, images are read as they are
    gone through where the layout allows."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    if data is None or is_cifar10(Path(data)):
        images = _fitted(load_cifar10(data, split, limit, stream), contract)
    elif is_npz(Path(data)):
        images = _fitted(load_npz(Path(data), contract).head(limit), contract)
    else:
        root = input_folder(Path(data), "data directory", DataError)
        if not is_image_folder(root):
            raise DataError(f"{root}: not a dataset lossx reads; give {LAYOUTS}")
        from lossx.runtime.images import load_image  # Pillow, only where files are read

        folder = split_folder(root, split) or root
        decode = partial(load_image, contract=contract)
        images = load_image_folder(folder, decode, strict, workers).head(limit)
        if not stream:
            images = images.in_memory()
    if classes_checked:
        check_class_names(images, contract.class_names)
    return images


def dataset_class_names(data: Path) -> tuple[str, ...] | None:
    """The class names dataset `data` declares: CIFAR-10's, an image folder's class folders,
    an .npz's `class_names`; None where it declares none (an .npz without them)."""
    if is_cifar10(data):
        return cifar10_class_names(data)
    if is_npz(data):
        names = _npz_arrays(data, ("class_names",)).get("class_names")
        return None if names is None else _npz_class_names(names, data)
    root = input_folder(data, "data directory", DataError)
    return class_folders(split_folder(root, "train") or root)


def is_npz(data: Path) -> bool:
    """Whether `data` names an .npz file (the one layout that is a file, not a folder)."""
    return data.suffix.lower() == ".npz" and not data.is_dir()


def has_splits(data: Path | None) -> bool:
    """Whether dataset `data` has a train and a test split (else it is one set of images)."""
    if data is None or is_cifar10(Path(data)):
        return True
    return Path(data).is_dir() and split_folder(Path(data), "train") is not None


def is_folder_of_classes(data: Path) -> bool:
    """Whether `data` is an image folder (not CIFAR-10's batches)."""
    return data.is_dir() and not is_cifar10(data) and is_image_folder(data)


def is_cifar10(data: Path) -> bool:
    return data.is_dir() and any(
        (folder / name).is_file()
        for folder in (data / BATCHES_DIR, data)
        for names in SPLIT_FILES.values()
        for name in names
    )


def _fitted(images: ImageSet, contract: ImageContract) -> ImageSet:
    """`images` at the contract's size: streamed batches fitted as they are read."""
    from lossx.runtime.images import fit

    fitter = partial(fit, contract=contract)
    if isinstance(images.images, StreamedImages):
        fitted = images.images.fitted(fitter)
    else:
        fitted = fitter(images.images)
    return ImageSet(fitted, images.labels, images.class_names, images.source, images.skipped)


def load_npz(path: Path, contract: ImageContract) -> ImageSet:
    """An .npz of `images`, `labels` and optionally `class_names` (read without pickles)."""
    arrays = _npz_arrays(path, ("images", "labels", "class_names"))
    missing = {"images", "labels"} - arrays.keys()
    if missing:
        raise DataError(f"{path}: no {' or '.join(sorted(missing))} array")
    images, labels, names = arrays["images"], arrays["labels"], arrays.get("class_names")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"{path}: images must be uint8 [N,H,W,C] (or [N,H,W]), got {images.dtype} "
            f"{list(images.shape)}"
        )
    images = images[..., None] if images.ndim == 3 else images
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: labels must be integers [N], got {labels.dtype} {list(labels.shape)}"
        )
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    class_names = contract.class_names if names is None else _npz_class_names(names, path)
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        raise DataError(
            f"{path}: label {int(labels[bad][0])} is not a class index 0..{len(class_names) - 1}"
        )
    return ImageSet(images, labels.astype(np.int64), class_names, f"{path} (.npz)")


def _npz_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Those of arrays `names` that .npz file `path` holds (read without pickles)."""
    regular_file(path, "data file", DataError)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in names if name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: not an .npz lossx can read ({e})") from None


def _npz_class_names(names: np.ndarray, path: Path) -> tuple[str, ...]:
    if names.ndim != 1 or names.dtype.kind != "U":
        raise DataError(f"{path}: class_names must be strings [K], got {names.dtype}")
    return tuple(str(n) for n in names)


def check_class_names(images: ImageSet, expected: tuple[str, ...]) -> None:
    """Refuse a set whose classes are not the artifact's, naming both."""
    if images.class_names != tuple(expected):
        raise DataError(
            f"{images.source} has classes {_names(images.class_names)}; the model's are "
            f"{_names(expected)} (labels would mean other classes)"
        )


def _names(names: tuple[str, ...], shown: int = 12) -> str:
    text = ", ".join(names[:shown])
    return f"[{text}{f', ... ({len(names)} in all)' if len(names) > shown else ''}]"
