import onnxruntime as ort
import pytest

from lossx.errors import ProviderError, SpecError
from lossx.runtime import session as session_module
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session, provider_names

CPU_ONLY = ["CPUExecutionProvider"]


def test_cpu_session_runs_on_cpu(artifact_dir):
    assert provider_names(open_session(artifact_dir / "model.onnx", SessionOptions("cpu"))) == [
        "cpu"
    ]


def test_cuda_without_a_cuda_build_is_refused(artifact_dir, monkeypatch):
    monkeypatch.setattr(session_module.ort, "get_available_providers", lambda: CPU_ONLY)
    with pytest.raises(ProviderError, match=r"no CUDAExecutionProvider") as error:
        open_session(artifact_dir / "model.onnx", SessionOptions("cuda"))
    assert error.value.exit_code == 3


def test_silent_fallback_to_cpu_is_refused(artifact_dir, monkeypatch):
    """A build that lists CUDA but cannot load it: ONNX Runtime falls back, lossx refuses."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine's CUDA provider really loads")
    listed = [*CPU_ONLY, "CUDAExecutionProvider"]
    monkeypatch.setattr(session_module.ort, "get_available_providers", lambda: listed)
    with pytest.raises(ProviderError, match=r"fell back to CPUExecutionProvider"):
        open_session(artifact_dir / "model.onnx", SessionOptions("cuda"))


def test_auto_uses_cpu_when_cuda_is_absent(artifact_dir, monkeypatch):
    monkeypatch.setattr(session_module.ort, "get_available_providers", lambda: CPU_ONLY)
    assert provider_names(open_session(artifact_dir / "model.onnx", SessionOptions("auto"))) == [
        "cpu"
    ]


def test_unknown_provider_is_refused(artifact_dir):
    with pytest.raises(SpecError, match=r"unknown provider 'tpu'; choose one of cpu, cuda, auto"):
        open_session(artifact_dir / "model.onnx", SessionOptions("tpu"))


@pytest.mark.gpu
def test_cuda_session_really_runs_on_cuda(artifact_dir):
    session = open_session(artifact_dir / "model.onnx", SessionOptions("cuda"))
    assert provider_names(session)[0] == "cuda"
