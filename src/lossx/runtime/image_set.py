"""A labelled set of decoded images, held in memory or read as it is gone through.

Every dataset layout lossx reads (CIFAR-10 batches, an image folder, an .npz) becomes an
ImageSet of uint8 [N,H,W,C] images at the artifact's size, with int64 labels indexing
`class_names`. A set read lazily (LazyImages) decodes a slice when it is asked for one and may
drop files it cannot decode; `batch` hands out images and labels together so that they stay
paired, and `skipped` lists what was dropped.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class LazyImages(Protocol):
    """Images read when sliced (CIFAR-10 batch files, image files)."""

    def __len__(self) -> int: ...

    def head(self, limit: int) -> "LazyImages": ...

    def batch(self, start: int, stop: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images [start, stop) and their labels, without any that could not be read."""
        ...


@dataclass(frozen=True)
class Skipped:
    """A file left out of a set, and why (it could not be decoded, or is not an image)."""

    file: str
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """Decoded images, uint8 [N,H,W,C], with int64 labels [N] indexing `class_names`."""

    images: np.ndarray | LazyImages
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str  # where the images are from, for reports
    skipped: list[Skipped] = field(default_factory=list)  # grows as a lazy set is read

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, limit: int | None) -> "ImageSet":
        """The first `limit` images (all of them when `limit` is None)."""
        if limit is None or limit >= len(self):
            return self
        images = (
            self.images[:limit] if isinstance(self.images, np.ndarray) else self.images.head(limit)
        )
        return ImageSet(
            images,
            self.labels[:limit],
            self.class_names,
            first_of(self.source, limit),
            self.skipped,
        )

    def batch(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Images [start, stop) and their labels (fewer where a lazy set skipped a file)."""
        if isinstance(self.images, np.ndarray):
            return self.images[start:stop], self.labels[start:stop]
        return self.images.batch(start, stop, self.labels[start:stop])

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            images, labels = self.batch(start, start + batch_size)
            if len(labels):
                yield images, labels

    def in_memory(self) -> "ImageSet":
        """The set with every image decoded into one array (files that fail are dropped)."""
        if isinstance(self.images, np.ndarray):
            return self
        images, labels = self.batch(0, len(self))
        return ImageSet(images, labels, self.class_names, self.source, self.skipped)

    def renamed(self, source: str) -> "ImageSet":
        return ImageSet(self.images, self.labels, self.class_names, source, self.skipped)

    def tail(self, start: int, source: str) -> "ImageSet":
        """Images from `start` on, in memory (a holdout)."""
        images = self.in_memory()
        return ImageSet(
            images.images[start:], images.labels[start:], self.class_names, source, self.skipped
        )


def first_of(source: str, limit: int) -> str:
    """What the first `limit` images of `source` are: its numbered range cut short ("images
    0-999" becomes "images 0-63"), or the count added."""
    numbered = re.fullmatch(r"(.* )(\d+)-(\d+)", source)
    if numbered:
        return f"{numbered[1]}{numbered[2]}-{int(numbered[2]) + limit - 1}"
    return f"{source}, first {limit:,} images"
