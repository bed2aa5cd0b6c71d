#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: put onnxruntime-gpu first on the path, run the GPU tests and
# bench/gpu_speed.py, and print the figures. Run from the repository root:
#   bash bench/gpu_check.sh            pip installs onnxruntime-gpu (needs a network)
#   bash bench/gpu_check.sh DIR        DIR holds onnxruntime-gpu wheels, or their unpacked contents
# It needs python3 with lossx's other dependencies (torch, onnx, onnxscript, numpy, click,
# pillow, pytest, hypothesis) installed; it does not touch that environment.
set -euo pipefail
site="$(mktemp -d)"
if [ -z "${1:-}" ]; then
  python3 -m pip install -q --no-deps --target "$site" onnxruntime-gpu
elif compgen -G "$1/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$site" "$1"/*.whl
else
  site="$1"
fi
export PYTHONPATH="$site:$PWD/src:$PWD"
# CUDA and cuDNN from the nvidia-* wheels (as torch installs them), where the system has none.
nvidia_libs="$(python3 -c 'import glob, nvidia; print(":".join(glob.glob(list(nvidia.__path__)[0] + "/*/lib")))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${nvidia_libs}:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime tests/parity/test_check.py
artifact="$(mktemp -d)/artifact"
python3 -m lossx.cli export "$artifact" >/dev/null
python3 bench/gpu_speed.py "$artifact"
