"""An image folder in torchvision's `ImageFolder` layout: `DIR/<class>/<image>`, read lazily.

Class names are the sub-folders' names sorted as torchvision sorts them (Python's string
order), and the files of each class are found as torchvision's `make_dataset` finds them
(every level below the class folder, in sorted order, links followed), by suffix: PNG, JPEG,
BMP, WebP, GIF (its first frame), TIFF, PPM and PGM. Hidden files and folders (a leading dot)
are not part of the set; any other file is reported as skipped. Files are decoded by a small
pool of threads (Pillow releases the GIL while it decodes and resizes), one batch ahead of the
one asked for, so that decoding overlaps the model and memory holds two batches of images.
"""

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lossx.errors import DataError
from lossx.runtime.image_set import ImageSet, Skipped

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# The sub-folders that are a dataset's splits, where it has them; else the folder is one split.
SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}
DECODE_WORKERS = min(4, os.cpu_count() or 1)


def split_folder(root: Path, split: str) -> Path | None:
    """The folder of `split` in an image folder with split sub-folders; None where the folder
    has none of them (it is one split, a folder of classes)."""
    names = [name for names in SPLIT_FOLDERS.values() for name in names]
    if not any((root / name).is_dir() for name in names):
        return None
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no {' or '.join(SPLIT_FOLDERS[split])}/ folder for the {split} split")


def class_folders(root: Path) -> tuple[str, ...]:
    """The class names of folder `root`: its sub-folders' names, hidden ones left out, sorted
    as torchvision sorts them."""
    return tuple(
        sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    )


def is_image_folder(root: Path) -> bool:
    """Whether `root` holds class folders (or split folders that do)."""
    return bool(class_folders(root))


def walk(root: Path) -> Iterator[Path]:
    """Every file under `root` in torchvision's order (each level sorted, links followed),
    hidden files and folders left out."""
    levels = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # not walked into
        levels.append((folder, sorted(n for n in names if not n.startswith("."))))
    for folder, names in sorted(levels):
        yield from (Path(folder) / name for name in names)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def scan(root: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray, list[Skipped]]:
    """Class names, image files, their labels, and the files that are not images."""
    classes = class_folders(root)
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    files, labels, others = [], [], []
    for index, name in enumerate(classes):
        for path in walk(root / name):
            if is_image_file(path):
                files.append(path)
                labels.append(index)
            else:
                others.append(Skipped(str(path), "not an image file (by its suffix)"))
    if not files:
        raise DataError(f"{root}: no image files in its class folders ({', '.join(classes)})")
    return classes, files, np.asarray(labels, np.int64), others


class FolderImages:
    """Image files decoded by `decode` (a path to uint8 [H,W,C], DataError where it cannot)
    when a batch of them is asked for; files that fail are recorded in `skipped` and left out,
    or refused with `strict`."""

    def __init__(
        self,
        files: list[Path],
        decode: Callable[[Path], np.ndarray],
        skipped: list[Skipped],
        strict: bool = False,
        workers: int = DECODE_WORKERS,
    ) -> None:
        self.files, self.decode, self.skipped, self.strict = files, decode, skipped, strict
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[int, int], list[Future]] = {}

    def __len__(self) -> int:
        return len(self.files)

    def head(self, limit: int) -> "FolderImages":
        return FolderImages(
            self.files[:limit], self.decode, self.skipped, self.strict, self.workers
        )

    def _submit(self, start: int, stop: int) -> list[Future]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lossx-decode")
        return [self._pool.submit(self._read, path) for path in self.files[start:stop]]

    def _read(self, path: Path) -> np.ndarray | Skipped:
        try:
            return self.decode(path)
        except DataError as e:
            return Skipped(str(path), str(e).removeprefix(f"{path}: "))

    def batch(self, start: int, stop: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        stop = min(stop, len(self))
        futures = self._ahead.pop((start, stop), None) or self._submit(start, stop)
        after = (stop, min(stop + stop - start, len(self)))
        if after[0] < after[1] and after not in self._ahead:
            self._ahead = {after: self._submit(*after)}  # one batch ahead, no more
        images, kept = [], []
        for index, future in enumerate(futures):
            result = future.result()
            if isinstance(result, Skipped):
                if self.strict:
                    raise DataError(f"{result.file}: {result.reason} (--strict)")
                self.skipped.append(result)
            else:
                images.append(result)
                kept.append(index)
        if not images:
            return np.empty((0, 0, 0, 0), np.uint8), labels[:0]
        return np.stack(images), labels[kept]


def image_files(paths: list[Path]) -> list[Path]:
    """`paths` with each folder replaced by the image files under it (by suffix, at every
    level, in sorted order, hidden ones left out); files given by name are kept as given."""
    files = []
    for path in paths:
        if not Path(path).is_dir():
            files.append(Path(path))
            continue
        found = [file for file in walk(Path(path)) if is_image_file(file)]
        if not found:
            raise DataError(f"{path}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
        files += found
    return files


def load_image_folder(
    root: Path,
    decode: Callable[[Path], np.ndarray],
    strict: bool = False,
    workers: int = DECODE_WORKERS,
) -> ImageSet:
    """The images of folder `root` (one split: `root/<class>/<image>`), decoded lazily."""
    classes, files, labels, others = scan(root)
    if strict and others:
        raise DataError(f"{others[0].file}: {others[0].reason} (--strict)")
    images = FolderImages(files, decode, others, strict, workers)
    return ImageSet(images, labels, classes, f"{root} (image folder)", others)
