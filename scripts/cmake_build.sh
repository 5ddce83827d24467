#!/usr/bin/env bash
# CPU-only CMake build of the operator libraries and the profiling driver into build/cmake, then a smoke test.
#
#   PYTHON=/path/to/venv/bin/python scripts/cmake_build.sh [extra cmake -D options]
#
# PYTHON (default: python) must have torch installed; it is only asked for torch's CMake prefix path.
# JOBS (default 2) sets the build parallelism. BUILD_DIR (default build/cmake) the build folder.
#
# A CUDA build of torch makes its CMake config look for a CUDA toolkit even for this CPU-only build (see
# CMakeLists.txt); the toolkit root is found like deepatlas_cuda/_build.py does (CUDA_HOME / CUDA_PATH, else where
# nvcc really lives, following wrapper scripts, else /usr/local/cuda) and passed on only when it exists.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python}"
BUILD_DIR="${BUILD_DIR:-build/cmake}"
JOBS="${JOBS:-2}"

TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"

cmake_args=(-S "$ROOT" -B "$BUILD_DIR" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_BUILD_TYPE=Release
            -DDEEPATLAS_CUDA=OFF)
if command -v ninja >/dev/null 2>&1; then
  cmake_args+=(-G Ninja)
elif [ -x "$(dirname "$PY")/ninja" ]; then
  cmake_args+=(-G Ninja -DCMAKE_MAKE_PROGRAM="$(cd "$(dirname "$PY")" && pwd)/ninja")
fi

find_cuda_root() {
  local var root nvcc here
  for var in CUDA_HOME CUDA_PATH; do
    root="${!var:-}"
    if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then echo "$root"; return; fi
  done
  if nvcc="$(command -v nvcc)"; then
    # nvcc may be a wrapper script: ask the real one where it lives.
    here="$("$nvcc" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*_HERE_=\([^ ]*\).*/\1/p' | head -n1)"
    if [ -n "$here" ] && [ -x "$here/nvcc" ]; then (cd "$here/.." && pwd -P); return; fi
    root="$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd -P)"
    if [ -x "$root/bin/nvcc" ]; then echo "$root"; return; fi
  fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; fi
}

if [ -n "$TORCH_CUDA" ]; then
  CUDA_ROOT="$(find_cuda_root || true)"
  if [ -n "$CUDA_ROOT" ] && [ -d "$CUDA_ROOT" ]; then
    echo "cmake_build.sh: torch is a CUDA $TORCH_CUDA build; CUDA toolkit for torch's CMake config: $CUDA_ROOT"
    cmake_args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT"
                 -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
  else
    echo "cmake_build.sh: warning: torch is a CUDA $TORCH_CUDA build but no CUDA toolkit was found;" \
         "torch's CMake config will likely fail (set CUDA_HOME, or use a CPU-only torch)" >&2
  fi
fi

cmake "${cmake_args[@]}" "$@"
cmake --build "$BUILD_DIR" -j "$JOBS"

echo "--- smoke test"
"$BUILD_DIR/deepatlas_profile" --op warp --size 32 32 32 --iters 3
"$BUILD_DIR/deepatlas_profile" --op grid_sample --size 32 32 32 --iters 3 --backward
