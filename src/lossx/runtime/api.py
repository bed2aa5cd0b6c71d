"""The runtime an application embeds: load an artifact, predict, compute losses, evaluate.

    runtime = open_artifact("out/", provider="auto")
    prediction = runtime.predict(images)   # uint8 [N,H,W,C], or float32 [N,C,H,W] preprocessed
    prediction.classes, prediction.probabilities, runtime.class_names, runtime.providers
    runtime.loss("ce", logits=logits, labels=labels)
    runtime.evaluate(runtime.dataset(data_dir, "test"))

The image size, channels, classes and preprocessing are the artifact's image contract
(runtime.contract, lossx.runtime.contract).

Every input is checked before ONNX Runtime sees it, with an error that names the input and
what was expected. torch is never imported.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lossx.errors import DataError, SpecError
from lossx.runtime.artifact import Artifact, load_artifact
from lossx.runtime.contract import COLORS, ImageContract
from lossx.runtime.datasets import load_dataset
from lossx.runtime.evaluation import EvalResult, evaluate
from lossx.runtime.feeds import check_batch_size, check_feed, check_outputs, softmax
from lossx.runtime.graphs import Role
from lossx.runtime.image_folder import DECODE_WORKERS
from lossx.runtime.image_set import ImageSet
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions
from lossx.runtime.session import provider_names


@dataclass(frozen=True)
class Prediction:
    """The model's answer for a batch of images."""

    logits: np.ndarray  # float32 [N, classes]
    probabilities: np.ndarray  # float32 [N, classes], the softmax of the logits
    classes: np.ndarray  # int64 [N], the most probable class of each image

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable classes of each image, best first, and their probabilities;
        k from 1 to the number of classes."""
        check_top_k(k, self.probabilities.shape[1])
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.probabilities, order, axis=1)


def check_top_k(k: int, classes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= classes:
        raise SpecError(f"top-k must be 1..{classes} (the model's classes), got {k!r}")


@dataclass(frozen=True)
class FilePredictions:
    """`lossx predict`'s answer: the k most probable classes of each image file."""

    artifact: str
    providers: list[str]
    predictions: list[dict]  # {"file", "top_k": [{"class", "index", "probability"}, ...]}

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "providers": self.providers,
                "predictions": self.predictions}  # fmt: skip

    def to_text(self) -> str:
        """One line per file: its name (control characters such as a newline escaped, as
        `\\n`) and each class with its probability, best first."""
        names = [_escaped(p["file"]) for p in self.predictions]
        width = max(len(name) for name in names)
        return "\n".join(
            f"{name:<{width}}  "
            + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in p["top_k"])
            for name, p in zip(names, self.predictions, strict=True)
        )


class Runtime:
    """A verified artifact with its ONNX Runtime sessions, all opened with the same options."""

    def __init__(
        self,
        artifact: Artifact,
        options: SessionOptions = DEFAULT_SESSION,
        batch_size: int = 256,
    ) -> None:
        check_batch_size(batch_size)
        self.artifact = artifact
        self.batch_size = batch_size
        self.options = options
        self.session("model")  # a provider that cannot really be used is refused here

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.artifact.manifest.class_names

    @property
    def contract(self) -> ImageContract:
        """The image size, channels, classes and preprocessing the model takes."""
        return self.artifact.contract

    def dataset(
        self,
        data: Path | str | None,
        split: str = "test",
        limit: int | None = None,
        strict: bool = False,
    ) -> ImageSet:
        """Split `split` of dataset `data` (CIFAR-10 batches, an image folder or an .npz; the
        packaged sample where None) at this model's image size, streamed where it can be."""
        return load_dataset(
            None if data is None else Path(data), split, self.contract, limit, True, strict
        )

    @property
    def providers(self) -> list[str]:
        """The execution providers ONNX Runtime really uses, e.g. ["cuda", "cpu"]."""
        return provider_names(self.session("model"))

    def session(self, stem: str) -> ort.InferenceSession:
        return self.artifact.session(stem, self.options)

    def run(self, stem: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph `stem`'s outputs by name, after checking `feed` against the manifest."""
        if self.providers[0] != "cuda":
            return self.artifact.run(stem, feed, self.options)
        spec = self.artifact.graph(stem).spec
        check_feed(spec, feed, self.contract.pixel_range())
        session = self.session(stem)
        # IO binding: each input is copied to the GPU once and outputs stay there until the one
        # copy back, instead of ONNX Runtime staging every tensor through host buffers.
        binding = session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for name in spec.output_names:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        outputs = dict(zip(spec.output_names, binding.copy_outputs_to_cpu(), strict=True))
        check_outputs(spec, outputs)
        return outputs

    def predict(self, images: np.ndarray) -> Prediction:
        """Classify `images`: uint8 [N,H,W,C] as decoded (or one [H,W,C] image) at the
        contract's size, or float32 [N,C,H,W] already preprocessed as the contract says."""
        batch = model_input(images, self.contract)
        spec = self.artifact.graph("model").spec
        name, output = spec.named(Role.IMAGES), spec.named(Role.LOGITS)
        logits = np.concatenate(
            [
                self.run("model", {name: batch[start : start + self.batch_size]})[output]
                for start in range(0, len(batch), self.batch_size)
            ]
        )
        return Prediction(logits, softmax(logits), logits.argmax(axis=1))

    def predict_files(self, paths: list[Path], k: int = 1) -> FilePredictions:
        """Classify image files, read and fitted as the contract says (by a pool of threads, a
        batch at a time); any file that cannot be read is refused before anything is
        reported."""
        from concurrent.futures import ThreadPoolExecutor

        from lossx.runtime.images import load_image  # Pillow, only where files are read

        check_top_k(k, self.contract.num_classes)  # before any file is read
        chunks = []
        with ThreadPoolExecutor(DECODE_WORKERS) as pool:
            for start in range(0, len(paths), self.batch_size):
                chunk = paths[start : start + self.batch_size]
                batch = np.stack(list(pool.map(lambda p: load_image(p, self.contract), chunk)))
                chunks.append(self.predict(batch).top_k(k))
        classes = np.concatenate([c[0] for c in chunks])
        probabilities = np.concatenate([c[1] for c in chunks])
        predictions = [
            {
                "file": _printable(path),
                "top_k": [
                    {"class": self.class_names[c], "index": int(c), "probability": float(p)}
                    for c, p in zip(row_classes, row_probabilities, strict=True)
                ],
            }
            for path, row_classes, row_probabilities in zip(
                paths, classes, probabilities, strict=True
            )
        ]
        return FilePredictions(str(self.artifact.path), self.providers, predictions)

    def loss(self, name: str, **inputs: np.ndarray) -> np.ndarray:
        """Run loss graph `loss_<name>` on its named inputs, e.g. `loss("ce", logits=...,
        labels=...)`; labels outside the classes are refused as torch refuses them."""
        if name not in self.artifact.manifest.loss_names:
            known = ", ".join(self.artifact.manifest.loss_names)
            raise DataError(f"the artifact has no loss {name!r}; it has {known}")
        graph = self.artifact.manifest.loss_graph(name)
        return self.run(graph.stem, inputs)[graph.named(Role.LOSS)]

    def evaluate(
        self,
        split: ImageSet,
        batch_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> EvalResult:
        """Accuracy, every loss and throughput over `split`, as `lossx eval` reports them."""
        batch_size = self.batch_size if batch_size is None else batch_size
        return evaluate(self.artifact, split, batch_size, self.options, progress)


def _escaped(name: str) -> str:
    """`name` on one line: control characters written as Python writes them in a string."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], name)


def _printable(path: Path) -> str:
    """A file name as valid Unicode: bytes that are not UTF-8 (kept by Python as lone
    surrogates, which JSON parsers refuse) are shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def model_input(images: np.ndarray, contract: ImageContract) -> np.ndarray:
    """`images` as the model takes them, float32 [N,C,H,W] preprocessed, or DataError saying
    what was expected."""
    hwc, chw = list(contract.hwc), list(contract.shape)
    layouts = {
        np.dtype(np.uint8): (
            hwc,
            f"uint8 images must be [N, {', '.join(map(str, hwc))}] or {hwc} "
            f"{COLORS.get(contract.channels, '')} (HWC)",
            " (resize and convert first, as lossx predict does)",
        ),
        np.dtype(np.float32): (
            chw,
            f"float32 images must be [N, {', '.join(map(str, chw))}] (NCHW) or {chw}",
            "",
        ),
    }
    if not isinstance(images, np.ndarray):
        raise DataError(f"images: expected a numpy array, got {type(images).__name__}")
    if images.dtype not in layouts:
        raise DataError(
            f"images: expected uint8 {COLORS.get(contract.channels, '')} "
            f"[N, {', '.join(map(str, hwc))}] or float32 "
            f"[N, {', '.join(map(str, chw))}], got {images.dtype}"
        )
    shape, rule, hint = layouts[images.dtype]
    batch = images[None] if images.ndim == 3 else images
    if batch.ndim != 4 or list(batch.shape[1:]) != shape:
        raise DataError(f"images: {rule}; got {list(images.shape)}{hint}")
    if len(batch) == 0:
        raise DataError("images: an empty batch; nothing to predict")
    return contract.to_model_input(batch) if batch.dtype == np.uint8 else batch


def open_artifact(
    path: Path | str,
    provider: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    tf32: bool = False,
    batch_size: int = 256,
    manifest_sha256: str | None = None,
    weights: dict[str, np.ndarray] | Path | str | None = None,
) -> Runtime:
    """Load the artifact at `path` (every file's sha256 checked against the manifest, and the
    manifest's against `manifest_sha256` if given) and open its model on `provider` ("cpu",
    "cuda" or "auto"); see `open_session` for the options. `weights` (a dict by state_dict
    name, or an .npz file) replace the shipped weights (see `Artifact.with_weights`)."""
    artifact = load_artifact(path, manifest_sha256)
    if weights is not None:
        artifact = artifact.with_weights(weights)
    return Runtime(artifact, SessionOptions(provider, threads, optimization, tf32), batch_size)
