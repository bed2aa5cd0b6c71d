"""ONNX Runtime sessions on the execution provider the user asked for, and no other.

ONNX Runtime quietly falls back to the CPU when the CUDA provider cannot load. lossx checks the
providers a session really got and refuses a silent fallback.
"""

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lossx.errors import ArtifactError, ProviderError, first_line
from lossx.runtime.options import DEFAULT_SESSION, SessionOptions

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _requested_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "cpu":
        return [_ORT_NAMES["cpu"]]
    if _ORT_NAMES["cuda"] in available:
        return [_ORT_NAMES["cuda"], _ORT_NAMES["cpu"]]
    if provider == "cuda":
        raise ProviderError(
            "provider 'cuda' requested but this onnxruntime build has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu"
        )
    return [_ORT_NAMES["cpu"]]


def open_session(
    path: Path | bytes,
    options: SessionOptions = DEFAULT_SESSION,
    initializers: dict[str, np.ndarray] | None = None,
    weights_as_inputs: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession for `path` (or a serialised model) that really runs on
    `options.provider` ("cpu", "cuda" or "auto"), with `options`' threads, optimisation level
    and TF32 setting.

    `initializers`: values that replace the graph's initializers of the same names.
    `weights_as_inputs`: the graph takes its Conv weights as inputs (a training graph). ONNX
    Runtime's NCHWc layout transformer (optimisation level all) would then reorder only its
    constant im2col Convs, which slows it down, so it is off; on the CPU provider at level all,
    lossx.runtime.nchwc gives the Convs with weight inputs the NCHWc kernels instead.
    """
    provider, optimization = options.provider, options.optimization
    providers = _requested_providers(provider)
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3  # errors only: lossx reports problems itself
    session_options.graph_optimization_level = _LEVELS[optimization]
    session_options.enable_cpu_mem_arena = options.memory_arena
    # Idle pool threads would spin between runs; with several sessions (and eager torch beside
    # them in parity checks) spinning threads starve the work on a small machine.
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if options.threads:
        session_options.intra_op_num_threads = options.threads
    cuda_options = {
        "use_tf32": "1" if options.tf32 else "0",
        # cuDNN's exhaustive search reruns for every new batch size (a dataset's last batch);
        # on an H100 the heuristic choice gave 1.4x the throughput of predict over 10,000 images.
        "cudnn_conv_algo_search": "HEURISTIC",
    }
    providers = [(name, cuda_options) if name == _ORT_NAMES["cuda"] else name for name in providers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback warning: checked below instead
            cpu_only = providers == [_ORT_NAMES["cpu"]]
            nchwc_convs = weights_as_inputs and optimization == "all" and cpu_only
            session = ort.InferenceSession(
                _model(path, initializers, nchwc_convs),
                sess_options=session_options,
                providers=providers,
                disabled_optimizers=["NchwcTransformer"] if weights_as_inputs else None,
            )
    except ArtifactError:
        raise
    except Exception as e:  # ORT raises several unrelated types for unreadable models
        what = path.name if isinstance(path, Path) else "the model"
        raise ArtifactError(f"{what}: ONNX Runtime cannot load it: {first_line(e)}") from None
    if provider == "cuda" and session.get_providers()[0] != _ORT_NAMES["cuda"]:
        raise ProviderError(
            f"provider 'cuda' requested but ONNX Runtime fell back to {session.get_providers()[0]} "
            "(CUDA or cuDNN libraries could not be loaded)"
        )
    return session


def _model(path: Path | bytes, initializers: dict[str, np.ndarray] | None, nchwc_convs: bool):
    """The model at `path` as ONNX Runtime should load it: the path itself, or the model
    serialised with these initializers replaced (SessionOptions.add_initializer is no substitute:
    at optimisation level all, ONNX Runtime's NCHWc layout transformer keeps the file's Conv
    weights and silently ignores the replacements) and its Convs with weight inputs on NCHWc."""
    if initializers is None and not nchwc_convs:
        return path if isinstance(path, bytes) else str(path)
    import onnx

    from lossx.runtime.nchwc import with_nchwc_convs

    model = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path))
    if initializers is not None:
        replace_initializers(model, initializers)
    if nchwc_convs:
        model = with_nchwc_convs(model)
    return model.SerializeToString()


def replace_initializers(model, values: dict[str, np.ndarray]) -> None:
    """Give `model`'s (an onnx ModelProto's) initializers named in `values` those values."""
    from onnx import numpy_helper

    # Every weight a graph reads is an initializer under its state_dict name (the model is
    # exported with its state as inputs, lossx.build.graph_modules.StateAsInputs); one it does
    # not read (a parameter forward never uses) changes nothing.
    present = {tensor.name: tensor for tensor in model.graph.initializer}
    for name, value in values.items():
        if name in present:
            present[name].CopyFrom(numpy_helper.from_array(value, name))


def provider_names(session: ort.InferenceSession) -> list[str]:
    """The short names ("cuda", "cpu") of the providers a session really uses, in order."""
    short = {v: k for k, v in _ORT_NAMES.items()}
    return [short.get(p, p) for p in session.get_providers()]
