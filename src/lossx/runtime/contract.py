"""The image contract of an artifact: what its model takes and what its logits mean.

One record says it all: the channels, height and width of an image, the class names (one per
logit), how an image file is fitted to that size (the resize policy), and the per-channel mean
and std the pixels are normalised with after scaling to [0, 1], as torchvision's
`ToTensor()` then `Normalize(mean, std)` do. The manifest stores it (`preprocessing` and
`class_names`), and every consumer reads it from there: eval, predict, check, train, the runtime
API and the JavaScript examples.
"""

import math
from dataclasses import dataclass

from lossx.errors import SpecError

# How an image file of another size becomes height x width (Pillow, bilinear), by name.
RESIZE_POLICIES = {
    "stretch": "resized to height x width, the aspect ratio not kept",
    "crop": "resized so its shorter side fits, then the centre height x width cut out",
}
COLORS = {1: "L", 3: "RGB"}  # channels -> the Pillow mode image files are converted to
MAX_SIDE = 4096  # the largest height or width an artifact's model may take
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class ImageContract:
    channels: int
    height: int
    width: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # one per channel, subtracted after scaling to [0, 1]
    std: tuple[float, ...]  # one per channel, divided by after the mean
    resize: str = "stretch"  # a key of RESIZE_POLICIES

    def __post_init__(self) -> None:
        check_shape((self.channels, self.height, self.width))
        if not 1 <= len(self.class_names) <= MAX_CLASSES:
            raise SpecError(f"a model needs 1 to {MAX_CLASSES:,} classes, got {self.num_classes}")
        if len(set(self.class_names)) != len(self.class_names):
            raise SpecError(f"class names repeat a name: {', '.join(self.class_names)}")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise SpecError(
                    f"{what} has {len(values)} values for {self.channels} channels; give one per "
                    "channel"
                )
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise SpecError(f"{what} must be finite numbers, got {list(values)}")
        if not all(s > 0 for s in self.std):
            raise SpecError(f"std must be positive, got {list(self.std)}")
        if self.resize not in RESIZE_POLICIES:
            raise SpecError(
                f"unknown resize policy {self.resize!r}; choose one of {', '.join(RESIZE_POLICIES)}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image as the model takes it: (channels, height, width)."""
        return (self.channels, self.height, self.width)

    @property
    def hwc(self) -> tuple[int, int, int]:
        """One decoded image: (height, width, channels), uint8."""
        return (self.height, self.width, self.channels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalised(self) -> bool:
        return any(self.mean) or any(s != 1 for s in self.std)

    def to_model_input(self, images):
        """uint8 images [N,H,W,C] (numpy) to the model's float32 [N,C,H,W]."""
        return self.scale(images.transpose(0, 3, 1, 2))

    def scale(self, images):
        """uint8 images [N,C,H,W] (numpy) to the model's float32 values: x / 255, then
        (x - mean) / std per channel, each step rounded to float32 as torchvision's transforms
        round it."""
        import numpy as np  # not at import: the command line parses contracts without numpy

        scaled = images.astype(np.float32, order="C") / np.float32(255)
        if not self.normalised:
            return scaled
        mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (self.mean, self.std))
        return (scaled - mean) / std

    def pixel_range(self) -> tuple[float, float]:
        """The smallest and largest value a model input can hold: pixels 0 and 255 after the
        normalisation, over every channel."""
        ends = [((0 - m) / s, (1 - m) / s) for m, s in zip(self.mean, self.std, strict=True)]
        return min(e[0] for e in ends), max(e[1] for e in ends)

    def describe(self) -> str:
        """One line for people: the image size and classes, and the preprocessing."""
        color = COLORS.get(self.channels, f"{self.channels}-channel")
        steps = "x / 255"
        if self.normalised:
            steps += (
                f", then (x - mean) / std, mean {_numbers(self.mean)}, std {_numbers(self.std)}"
            )
        return (
            f"{color} {self.height}x{self.width}, {self.num_classes} classes; image files "
            f"{RESIZE_POLICIES[self.resize]}; {steps}"
        )

    def to_manifest(self) -> dict:
        """The manifest's `preprocessing` (class names are its own entry)."""
        return {
            "input": {
                "dtype": "uint8",
                "layout": "HWC",
                "channels": self.channels,
                "height": self.height,
                "width": self.width,
                "color": COLORS.get(self.channels, "none"),
            },
            "resize": self.resize,
            "scale": 255,
            "mean": list(self.mean),
            "std": list(self.std),
            "output": {"dtype": "float32", "layout": "NCHW"},
            "equivalent": self.torchvision_equivalent(),
        }

    def torchvision_equivalent(self) -> str:
        steps = ["ToTensor()"]
        if self.normalised:
            steps.append(f"Normalize({_numbers(self.mean)}, {_numbers(self.std)})")
        return f"torchvision.transforms: {', '.join(steps)}"

    @classmethod
    def from_manifest(cls, preprocessing: dict, class_names: tuple[str, ...]) -> "ImageContract":
        """The contract a manifest records; ValueError naming what is inconsistent."""
        image = preprocessing["input"]
        contract = cls(
            int(image["channels"]),
            int(image["height"]),
            int(image["width"]),
            tuple(class_names),
            tuple(float(v) for v in preprocessing["mean"]),
            tuple(float(v) for v in preprocessing["std"]),
            preprocessing["resize"],
        )
        if contract.to_manifest() != preprocessing:
            raise ValueError("preprocessing differs from what this lossx applies to images")
        return contract


def _numbers(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def check_shape(shape: tuple[int, ...]) -> None:
    channels, height, width = shape
    if not all(isinstance(v, int) for v in shape) or min(shape) < 1:
        raise SpecError(f"input shape must be three positive integers C,H,W, got {shape}")
    if max(height, width) > MAX_SIDE:
        raise SpecError(f"input shape {shape}: height and width are at most {MAX_SIDE}")
    if channels > 64:
        raise SpecError(f"input shape {shape}: at most 64 channels")


def parse_numbers(text: str, what: str, count: int | None = None) -> tuple[float, ...]:
    """A comma-separated list of numbers from the command line, e.g. "0.485,0.456,0.406"."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise SpecError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if count is not None and len(values) != count:
        raise SpecError(f"{what}: expected {count} values, got {len(values)} in {text!r}")
    return values


def parse_shape(text: str) -> tuple[int, int, int]:
    """--input-shape C,H,W, e.g. "3,64,64"."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise SpecError(f"--input-shape: expected C,H,W (three integers), got {text!r}")
    shape = tuple(int(p) for p in parts)
    check_shape(shape)
    return shape


def parse_class_names(text: str) -> tuple[str, ...]:
    """--class-names a,b,c."""
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise SpecError(f"--class-names: an empty name in {text!r}")
    return names


def default_class_names(count: int, known: tuple[str, ...]) -> tuple[str, ...]:
    """The names of a model's `count` classes where none are given: `known` (the registry's
    dataset's) when the count fits, else the class indices as text."""
    return known if len(known) == count else tuple(str(i) for i in range(count))


def contract_for(
    shape: tuple[int, int, int],
    class_names: tuple[str, ...],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    resize: str = "stretch",
) -> ImageContract:
    """A contract from command-line facts: mean 0 and std 1 where not given, one value standing
    for every channel."""
    channels = shape[0]

    def per_channel(values: tuple[float, ...] | None, default: float, what: str):
        if values is None:
            return (default,) * channels
        if len(values) == 1:
            return values * channels
        if len(values) != channels:
            raise SpecError(
                f"--{what}: {len(values)} values for {channels} channels; give {channels} or one"
            )
        return tuple(values)

    return ImageContract(
        *shape, class_names, per_channel(mean, 0.0, "mean"), per_channel(std, 1.0, "std"), resize
    )
