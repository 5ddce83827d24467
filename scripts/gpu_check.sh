#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one command, for a machine where PyTorch with CUDA is already installed
# (a cloud box, or a lent machine with no network): builds the CPU and CUDA libraries just in time for the visible
# GPU's architecture, runs the CUDA tests, runs them again under compute-sanitizer, and measures the CUDA
# benchmark report. No pip install, no download.
#
#   scripts/gpu_check.sh [STAGE...]     stages: build test sanitize bench (default: all four, in that order)
#
#   PY        the Python that holds torch (default: python3)
#   OUT       where logs and reports go (default: .gpu-check/out); summary.txt has one "stage rc" line per stage
#   TORCH_CUDA_ARCH_LIST   default: the visible GPU's compute capability (one architecture builds fastest)
#
# The build is cached in .gpu-check/jit (ignored by git), so stages can run in separate calls on the same machine:
# e.g. `scripts/gpu_check.sh build test`, then `scripts/gpu_check.sh sanitize`, then `scripts/gpu_check.sh bench`.
# Exit status: 0 when every stage passed, 1 when one failed (a stage's rc 3 in summary.txt: its tool is missing),
# 2 when no CUDA GPU is visible, 3 when nvcc, ninja or pytest is missing or nvcc's CUDA major version is not torch's.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-python3}"
OUT="${OUT:-$ROOT/.gpu-check/out}"
mkdir -p "$OUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to check here" >&2
  exit 2
fi

# Tools from the Python's own environment (ninja, pytest) even when its venv is not activated.
PY_BIN="$(dirname "$(command -v "$PY")")"
export PATH="$PY_BIN:$PATH"

# What the stages need, checked up front so that a missing tool is named here rather than deep in a build log.
# Exit status 3 when one is missing.
preflight() {
  local missing=()
  command -v nvcc >/dev/null || missing+=("nvcc (the CUDA toolkit's compiler; put its bin/ on PATH or set CUDA_HOME)")
  command -v ninja >/dev/null || missing+=("ninja (torch.utils.cpp_extension builds with it: pip install ninja)")
  "$PY" -c "import pytest" 2>/dev/null || missing+=("pytest (pip install pytest)")
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'gpu_check: missing: %s\n' "${missing[@]}" >&2
    exit 3
  fi
  local nvcc_version torch_cuda
  nvcc_version="$(nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
  torch_cuda="$("$PY" -c "import torch; print(torch.version.cuda)")"
  echo "gpu_check: nvcc $nvcc_version ($(command -v nvcc)), torch $("$PY" -c "import torch; print(torch.__version__)")" \
    "built with CUDA $torch_cuda"
  if [ "${nvcc_version%%.*}" != "${torch_cuda%%.*}" ]; then
    echo "gpu_check: nvcc's CUDA major version ($nvcc_version) differs from torch's ($torch_cuda); torch refuses to" \
      "build extensions with a different major version: put a CUDA $torch_cuda toolkit first on PATH" >&2
    exit 3
  fi
}
preflight

export DEEPATLAS_FORCE_JIT=1 DEEPATLAS_CUDA=1 DEEPATLAS_CACHE_DIR="$ROOT/.gpu-check/jit"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
  "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
export PYTHONPATH="$ROOT/python:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# The cuda-marked tests, from the test files that import here: the model's tests need its dependencies (numpy,
# scipy, ...), which a bare GPU machine may lack; a file that cannot be imported is named and left out.
PYTEST=()
collect_cuda_tests() {
  local file error files=()
  for file in $(grep -l "pytest.mark.cuda" tests/test_*.py); do
    if error="$(cd tests && "$PY" -c "import $(basename "$file" .py)" 2>&1)"; then
      files+=("$file")
    else
      echo "gpu_check: leaving out $file, which does not import here: $(tail -n 1 <<<"$error")"
    fi
  done
  if [ ${#files[@]} -eq 0 ]; then
    echo "gpu_check: no test file imports here"
    return 1
  fi
  PYTEST=("$PY" -m pytest -q -m cuda -p no:cacheprovider "${files[@]}")
}

stage_build() {
  "$PY" - <<'EOF'
import json
import torch
import deepatlas_cuda
info = deepatlas_cuda.build_info()
print(json.dumps(info, indent=1))
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
assert info["cuda_kernels"], "the CUDA library was not built"
EOF
}

stage_test() {
  collect_cuda_tests || return 1
  "${PYTEST[@]}"
}

stage_sanitize() {
  # memcheck: out-of-bounds and misaligned device accesses; initcheck: reads of device memory never written (every
  # output element must be written). The same cuda-marked tests as stage_test.
  # Without torch's caching allocator every tensor is its own allocation, so memcheck sees an access past a tensor's
  # end and initcheck sees a read of memory that an earlier tensor (not this op) wrote.
  local tool status=0 sanitizer candidate
  local beside_nvcc
  beside_nvcc="$(dirname "$(readlink -f "$(command -v nvcc)")")/compute-sanitizer"
  for candidate in "$(command -v compute-sanitizer)" "$beside_nvcc" \
                   "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then sanitizer="$candidate"; break; fi
  done
  if [ -z "${sanitizer:-}" ]; then
    echo "compute-sanitizer not found (not on PATH, not beside nvcc, not in \$CUDA_HOME/bin): stage not run"
    return 3
  fi
  collect_cuda_tests || return 1
  for tool in memcheck initcheck; do
    echo "== $sanitizer --tool $tool"
    # The training tests exercise the same kernels through the networks, far more slowly under the sanitizer; the
    # sanitizer serialises kernels, which the test that the op does not wait for the default stream cannot pass.
    # No -x: a failing test must not keep the later files out of the sanitizer run.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 \
      "${PYTEST[@]}" -k "not tiny_training and not wait_for_the_default_stream" || status=1
  done
  return $status
}

stage_bench() {
  "$PY" benchmarks/report.py --device cuda --sizes 64 128 full --repeats 20 --peak-jobs 4 \
    --out "$OUT/benchmark_report_cuda.md"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench)
failed=0
for stage in "${stages[@]}"; do
  case "$stage" in
    build|test|sanitize|bench) ;;
    *) echo "gpu_check: unknown stage '$stage' (expected build, test, sanitize or bench)" >&2; exit 1 ;;
  esac
  echo "== $stage (log: $OUT/$stage.log)"
  start=$SECONDS
  "stage_$stage" >"$OUT/$stage.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/$stage.log"
  echo "$stage rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/summary.txt"
  [ $rc -ne 0 ] && failed=1
done
exit $failed
