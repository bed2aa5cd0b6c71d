"""The precisions an artifact's model part can have, one record each (docs/precision.md).

Loss graphs and training graphs are fp32 in every artifact (GraphKind.follows_precision). The
converter of each converted precision is lossx.build.precision's CONVERTERS[name]; the
tolerances its graphs are checked under, lossx.compare.tolerances's PROFILES[profile].
Numpy-free: the command line reads it while parsing.
"""

from dataclasses import dataclass

from lossx.errors import SpecError


@dataclass(frozen=True)
class Precision:
    name: str
    # The tolerance profile its model graphs are checked under; None: the fp32 profile of the
    # provider that runs them (fp32-cpu or fp32-cuda).
    tolerance_profile: str | None
    converted: bool  # written in fp32, then converted by a maintained converter
    # How the converter may choose activation ranges from calibration images; empty: it needs
    # no calibration.
    calibration_methods: tuple[str, ...] = ()
    trains: bool = False  # training graphs may be exported beside it

    @property
    def calibrated(self) -> bool:
        """Whether the converter needs calibration images."""
        return bool(self.calibration_methods)


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", None, converted=False, trains=True),
        Precision(
            "int8",
            "int8",
            converted=True,
            calibration_methods=("minmax", "entropy", "percentile"),
        ),
        Precision("fp16", "fp16", converted=True),
    )
}
CALIBRATION_METHODS = tuple(
    dict.fromkeys(m for p in PRECISIONS.values() for m in p.calibration_methods)
)


def check_precision(precision: str, train: bool = False, calibrated: bool = False) -> Precision:
    """The record of `precision`, or a refusal of a precision lossx cannot export or of options
    that do not go with it."""
    if precision not in PRECISIONS:
        raise SpecError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    record = PRECISIONS[precision]
    if train and not record.trains:
        raise SpecError(
            f"--train needs --precision fp32: training graphs compute fp32 gradients of fp32 "
            f"weights, not of a {precision} model"
        )
    if calibrated and not record.calibrated:
        raise SpecError(
            "calibration options apply only to --precision "
            + " or ".join(p.name for p in PRECISIONS.values() if p.calibrated)
        )
    return record
