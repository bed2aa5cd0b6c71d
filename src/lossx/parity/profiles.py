"""Which tolerance profile a comparison of an artifact follows: its precision's, and for the graphs
it keeps fp32 the fp32 profile of the provider ONNX Runtime really uses. Torch-free."""

from typing import TYPE_CHECKING

from lossx.compare.tolerances import default_profile
from lossx.runtime.options import SessionOptions

if TYPE_CHECKING:  # the command line imports this module while parsing: no onnxruntime yet
    from lossx.runtime.artifact import Artifact
from lossx.runtime.precisions import PRECISIONS


def fp32_profile(artifact: "Artifact", options: SessionOptions) -> str:
    """The fp32 profile of the provider ONNX Runtime really uses (exit 3 when it cannot)."""
    from lossx.runtime.session import provider_names

    return default_profile(provider_names(artifact.session("model", options))[0])


def tolerance_profiles(
    artifact: "Artifact", options: SessionOptions, chosen: str | None = None
) -> tuple[str, str | None]:
    """The tolerance profile of the artifact's precision (`chosen` if given), and the fp32
    profile of the graphs it keeps fp32 (None where that is the same profile)."""
    fp32 = fp32_profile(artifact, options)
    if chosen is not None:
        return chosen, None
    profile = PRECISIONS[artifact.manifest.precision_name].tolerance_profile
    return (fp32, None) if profile is None else (profile, fp32)
