"""The training recipe as data: what `lossx train` runs, checked without numpy (the command line
builds one while parsing). Its steps in numpy are lossx.training.schedule's.
"""

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields

from lossx.errors import SpecError
from lossx.runtime.contract import ImageContract
from lossx.runtime.graphs import DEFAULT_MODEL
from lossx.runtime.loss_specs import LossSpec, parse_loss_spec
from lossx.runtime.options import check_seed

OPTIMIZERS = ("sgd", "adamw")
FROZEN_BN = ("eval", "train")  # what a batch norm whose parameters are all frozen does
CONTRACT_FIELDS = ("input_shape", "mean", "std", "class_names", "resize")
MAX_EPOCHS, MAX_TRAIN_BATCH, MAX_ACCUMULATE = 10_000, 4096, 1024
# Peak one-cycle LR per optimizer (docs/training.md): AdamW at SGD's 0.02 diverges.
DEFAULT_LR = {"sgd": 0.02, "adamw": 0.003}


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. `holdout` keeps the last N training images out, for choosing recipes."""

    model: str = DEFAULT_MODEL
    model_args: dict = field(default_factory=dict)  # the model's constructor's keywords
    epochs: int = 30
    batch_size: int = 64
    lr: float | None = None  # peak of the one-cycle schedule; None: the optimizer's DEFAULT_LR
    optimizer: str = "sgd"  # sgd: Nesterov momentum, cycled by the schedule
    weight_decay: float = 5e-4
    loss: str = "ce"  # a loss spec; targets are the labels or their one-hot vectors
    clip_norm: float = 5.0  # 0: no clipping
    accumulate: int = 1  # batches whose mean gradient one optimizer step takes
    augment: bool = True
    jpeg_augment: bool = False  # JPEG-compress half the training images (recipe.jpeg_augment)
    seed: int = 0
    limit: int | None = None  # train on the first N training images only
    holdout: int = 0
    # The image contract (lossx.runtime.contract); None: the model's default input shape, no
    # normalisation, the dataset's class names
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    resize: str = "stretch"
    # Which parameters train (state_dict names, shell globs): the ones `trainable` matches, or
    # all but the ones `frozen` matches; None: all
    trainable: tuple[str, ...] | None = None
    frozen: tuple[str, ...] | None = None
    frozen_bn: str = "eval"

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """A recipe saved in a checkpoint, including those of lossx versions that stored the
        loss as `label_smoothing` and a `momentum` the schedule always overrode."""
        data = dict(data)
        data.pop("momentum", None)
        smoothing = data.pop("label_smoothing", None)
        if smoothing:
            data.setdefault("loss", f"ce(label_smoothing={smoothing!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(data.keys() - known)
        if unknown:
            raise SpecError(f"unknown recipe keys {', '.join(unknown)}")
        return cls(**data)

    def __post_init__(self) -> None:
        if self.lr is None and self.optimizer in DEFAULT_LR:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        for name in (*CONTRACT_FIELDS[:-1], "trainable", "frozen"):  # JSON gives lists
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def contract_options(self) -> dict:
        """The image contract's facts the recipe sets (the ones that are not None)."""
        return {n: getattr(self, n) for n in CONTRACT_FIELDS if getattr(self, n) is not None}

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_spec(self) -> LossSpec:
        spec = parse_loss_spec(self.loss)
        if spec["reduction"] == "none":
            raise SpecError(f"cannot train on {spec}: it has no scalar loss; use mean or sum")
        return spec

    def validate(self) -> None:
        checks = [
            (
                1 <= self.epochs <= MAX_EPOCHS,
                f"epochs must be 1..{MAX_EPOCHS}, got {self.epochs}",
            ),
            (
                1 <= self.batch_size <= MAX_TRAIN_BATCH,
                f"batch size must be 1..{MAX_TRAIN_BATCH}, got {self.batch_size}",
            ),
            (
                isinstance(self.lr, int | float) and 0 < self.lr <= 10 and math.isfinite(self.lr),
                f"lr must be in (0, 10], got {self.lr}",
            ),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (
                isinstance(self.accumulate, int) and 1 <= self.accumulate <= MAX_ACCUMULATE,
                f"accumulate must be 1..{MAX_ACCUMULATE} batches, got {self.accumulate}",
            ),
            (
                0 <= self.weight_decay < 1,
                f"weight decay must be in [0, 1), got {self.weight_decay}",
            ),
            (
                self.clip_norm >= 0 and math.isfinite(self.clip_norm),
                f"clip norm must be at least 0, got {self.clip_norm}",
            ),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
            (self.holdout >= 0, f"holdout must be at least 0, got {self.holdout}"),
            (
                self.trainable is None or self.frozen is None,
                "give --trainable or --frozen, not both",
            ),
            (
                self.frozen_bn in FROZEN_BN,
                f"frozen batch norms run in {' or '.join(FROZEN_BN)} mode, not {self.frozen_bn}",
            ),
            (
                self.limit is None or self.holdout < self.limit,
                f"holdout {self.holdout} leaves none of the {self.limit} images to train on",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise SpecError(message)
        check_seed(self.seed)
        self.loss_spec()


def frozen_parameters(
    names: list[str], trainable: tuple[str, ...] | None, frozen: tuple[str, ...] | None
) -> frozenset[str]:
    """The parameters (of `names`, state_dict names) that do not train: all but the ones a
    `trainable` glob matches, or the ones a `frozen` glob matches. Refuses a glob that matches
    no parameter and a choice that leaves none to train."""
    if trainable is None and frozen is None:
        return frozenset()
    if trainable is not None and frozen is not None:
        raise SpecError("give --trainable or --frozen, not both")
    option, globs = ("--trainable", trainable) if trainable is not None else ("--frozen", frozen)
    if not globs:
        raise SpecError(f"{option}: no patterns given")
    matched = set()
    for glob in globs:
        hits = [name for name in names if fnmatch.fnmatchcase(name, glob)]
        if not hits:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise SpecError(f"{option} {glob!r} matches no parameter (they are {shown})")
        matched.update(hits)
    chosen = (
        frozenset(n for n in names if n not in matched)
        if trainable is not None
        else (frozenset(matched))
    )
    if len(chosen) == len(names):
        raise SpecError(f"{option} {','.join(globs)} leaves no parameter to train")
    return chosen


def contract_recipe(contract: ImageContract) -> dict:
    """The recipe fields that record `contract` (TrainConfig's CONTRACT_FIELDS)."""
    return {
        "input_shape": contract.shape,
        "mean": contract.mean,
        "std": contract.std,
        "class_names": contract.class_names,
        "resize": contract.resize,
    }
