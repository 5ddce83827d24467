#!/usr/bin/env bash
# Creates .venv (if missing), installs torch and the test tools, and builds deepatlas_cuda into it (editable,
# against the installed torch: --no-build-isolation). Idempotent; sourced by scripts/test.sh and scripts/demo.sh.
#   TORCH_SPEC      torch requirement (default torch==2.14.1, a CUDA 13.0 build that also runs on the CPU)
#   DEEPATLAS_CUDA  0 / 1 to force the CUDA library off / on (default: built when nvcc is found)
#   DEEPATLAS_REBUILD=1  rebuild even when the installed build is current (sources, flags and torch unchanged)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEEPATLAS_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q "${TORCH_SPEC:-torch==2.14.1}" numpy ninja scipy nibabel tqdm matplotlib pyyaml nilearn \
  pytest pytest-benchmark hypothesis SimpleITK build \
  2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "import torch" || { echo "torch failed to install" >&2; exit 1; }

# The build takes minutes (nvcc): skip it when the installed one is from these sources, flags and torch.
if [ "${DEEPATLAS_REBUILD:-0}" = "1" ] || ! "$PY" "$ROOT/deepatlas_cuda/_build.py" --is-current; then
  echo "== building deepatlas_cuda ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "${DEEPATLAS_CUDA:-}" != "0" ] && command -v nvcc >/dev/null; then
    echo "   nvcc found: the CUDA library is built for each default architecture nvcc supports (Volta on)," \
         "which takes a while; TORCH_CUDA_ARCH_LIST set to your GPU's (e.g. 9.0) builds one, DEEPATLAS_CUDA=0 none"
  fi
  "$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
fi
"$PY" -c "import deepatlas_cuda, json; print(json.dumps(deepatlas_cuda.build_info()))"
