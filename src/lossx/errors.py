"""The errors lossx raises. Each carries the exit code the CLI maps it to.

Exit codes: 0 success, 1 parity failure, 2 bad usage or input, 3 environment
(e.g. a requested execution provider is not really available), 4 export failed: torch.onnx,
onnx's composition, its opset converter, a precision converter or onnx.checker could not give
a valid graph of a model lossx accepted.
"""


class LossxError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 2


class ArtifactError(LossxError):
    """An artifact directory, manifest or ONNX file is missing, corrupt or inconsistent."""


class DataError(LossxError):
    """A CIFAR-10 data source is missing, malformed or unsafe."""


class CheckpointError(LossxError):
    """A checkpoint cannot be loaded safely or does not fit the model."""


class SpecError(LossxError):
    """An unknown model or loss name, or an option value out of range."""


class ModelError(LossxError):
    """The model itself is unusable: it computes NaN or Inf where it must give numbers."""


class TrainingDiverged(LossxError):
    """The training loss became NaN or infinite; the checkpoint keeps the last whole epoch."""


class ParityError(LossxError):
    """ONNX Runtime and eager PyTorch disagree beyond tolerance."""

    exit_code = 1


class EnvironmentProblem(LossxError):
    """This machine lacks something lossx needs (a working provider, a network)."""

    exit_code = 3


class ProviderError(EnvironmentProblem):
    """A requested execution provider cannot really be used."""


class ExportError(LossxError):
    """A valid graph could not be made of a model lossx accepted: torch.onnx or make_fx tracing
    failed, the graph's signature or ops are not what lossx declares (an op ONNX Runtime runs in
    inference mode in a training graph), or onnx.compose, onnx's opset converter, a precision
    converter or onnx.checker failed."""

    exit_code = 4


def with_article(noun: str) -> str:
    """`noun` after "a" or "an", as it is said: an int64 array, a float32 array."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
