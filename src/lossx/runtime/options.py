"""Options checked before any work, without numpy or onnxruntime (the command line imports this
module to parse its options quickly): how ONNX Runtime sessions run, sha256s, seeds.
"""

import ast
import math
import os
import re
from dataclasses import dataclass

from lossx.errors import SpecError

PROVIDER_CHOICES = ("cpu", "cuda", "auto")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")  # ONNX Runtime's graph levels
# More intra-op threads than cores only add contention; 10,000 took minutes and 2.8 GB to start.
MAX_THREADS = 4 * (os.cpu_count() or 1)


def check_session_options(
    provider: str = "cpu", threads: int | None = None, optimization: str = "all"
) -> None:
    """Refuse an unknown provider or optimisation level, or a thread count out of range."""
    if provider not in PROVIDER_CHOICES:
        raise SpecError(
            f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}"
        )
    if optimization not in OPTIMIZATION_LEVELS:
        raise SpecError(
            f"unknown optimization level {optimization!r}; choose {', '.join(OPTIMIZATION_LEVELS)}"
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS
    ):
        raise SpecError(
            f"threads must be 1..{MAX_THREADS} (4 per core on this machine), got {threads}"
        )


@dataclass(frozen=True)
class SessionOptions:
    """How ONNX Runtime runs graphs, checked when made: the provider ("cpu", "cuda", or "auto":
    CUDA where it works), intra-op threads (None: one per core), the graph optimisation level,
    whether CUDA may use TF32 (off: it rounds fp32 inputs to 10-bit mantissas, which breaks
    parity), and whether the CPU keeps a memory arena across runs (faster on many batches of a
    size; off, a run gives its memory back: comparisons, which run eager torch in float64 beside
    it, turn it off)."""

    provider: str = "cpu"
    threads: int | None = None
    optimization: str = "all"
    tf32: bool = False
    memory_arena: bool = True

    def __post_init__(self) -> None:
        check_session_options(self.provider, self.threads, self.optimization)


DEFAULT_SESSION = SessionOptions()  # the CPU, a thread per core, every optimisation


def parse_model_args(items: tuple[str, ...]) -> dict[str, object]:
    """`--model-arg KEY=VALUE` items as constructor keyword arguments: each VALUE a Python
    literal (a number, a quoted string, True/False/None, a list or tuple of them), read with
    ast.literal_eval (nothing is run), and recordable in a manifest as JSON."""
    args = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SpecError(f"--model-arg {item!r}: write KEY=VALUE, e.g. num_classes=10")
        if key in args:
            raise SpecError(f"--model-arg {key} given twice")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise SpecError(
                f"--model-arg {item!r}: {text.strip()!r} is not a Python literal (quote a "
                f"string: {key}='{text.strip()}')"
            ) from None
        if not _json_like(value):
            raise SpecError(
                f"--model-arg {item!r}: a {type(value).__name__} cannot be recorded in the "
                "manifest; give numbers, strings, True/False/None or lists of them"
            )
        args[key] = list(value) if isinstance(value, tuple) else value
    return args


def _json_like(value: object) -> bool:
    if value is None or isinstance(value, bool | int | str):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, list | tuple) and all(map(_json_like, value))


def check_sha256(value: object) -> None:
    """Refuse a pinned sha256 that is not 64 hex digits (it could never match)."""
    if not (isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value.strip())):
        raise SpecError(
            f"a sha256 is 64 hex digits (lossx export prints the manifest's), got {value!r}"
        )


MAX_SEED = 2**63 - 1  # seeds go to numpy's and torch's generators, which take 0..2**63-1


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SpecError(f"seed must be an integer 0..2**63-1, got {seed!r}")
