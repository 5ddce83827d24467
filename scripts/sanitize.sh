#!/usr/bin/env bash
# Builds the CPU library with AddressSanitizer + UndefinedBehaviorSanitizer (DEEPATLAS_SANITIZE=1, a JIT build into
# a fresh temporary cache) and runs the op tests and the fuzz tests against it. Any sanitizer report aborts the
# process, so the script fails on the first one. Needs the environment of scripts/setup_env.sh (torch, ninja,
# pytest, hypothesis) and gcc with its libasan / libubsan.
#   PY             the Python to use (default: .venv/bin/python in the repository root)
#   MAX_JOBS       parallel compile jobs (default 2)
#   extra arguments are passed to pytest, e.g. `scripts/sanitize.sh -k warp`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
CACHE="$(mktemp -d)"
trap 'rm -rf "$CACHE"' EXIT
cd "$ROOT"

export DEEPATLAS_FORCE_JIT=1 DEEPATLAS_CUDA=0 DEEPATLAS_SANITIZE=1 DEEPATLAS_CACHE_DIR="$CACHE"
export MAX_JOBS="${MAX_JOBS:-2}"
# Python and torch are not instrumented, so the runtimes are preloaded (ASan must come first in the process, which
# also satisfies its link-order check). Leak checking is off: Python and torch keep memory until exit by design.
ASAN_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

echo "== building the sanitized CPU library into $CACHE"
# The compiler must not inherit the preloaded runtimes: the build process drops LD_PRELOAD before it starts them.
LD_PRELOAD="$ASAN_PRELOAD" "$PY" - <<'EOF'
import os
os.environ.pop("LD_PRELOAD")
import deepatlas_cuda

info = deepatlas_cuda.build_info()
assert info["loaded_from"] == "jit" and not info["cuda_kernels"], info
print("loaded", *info["libraries"])
EOF

LIBRARY="$(find "$CACHE" -name 'deepatlas_cuda_C.so')"
echo "== checking that $LIBRARY is instrumented"
# Captured first: `ldd | grep -q` would fail under pipefail when grep stops reading early.
DEPENDENCIES="$(ldd "$LIBRARY")"
SYMBOLS="$(nm -D "$LIBRARY")"
grep -q libasan <<<"$DEPENDENCIES" || { echo "not linked against libasan" >&2; exit 1; }
grep -q libubsan <<<"$DEPENDENCIES" || { echo "not linked against libubsan" >&2; exit 1; }
grep -q __asan_report_load <<<"$SYMBOLS" || { echo "no ASan instrumentation" >&2; exit 1; }
grep -q __ubsan_handle_ <<<"$SYMBOLS" || { echo "no UBSan instrumentation" >&2; exit 1; }

echo "== running the op and fuzz tests under the sanitizers"
# --capture=sys leaves file descriptor 2 alone, so a report reaches the terminal before the process aborts.
LD_PRELOAD="$ASAN_PRELOAD" "$PY" -m pytest -q -p no:cacheprovider --capture=sys \
  tests/test_grid_sample.py tests/test_warp.py tests/test_warp_labels.py tests/test_jacobian.py \
  tests/test_warped_dice.py tests/test_all_ops.py tests/test_cpu_row_loops.py tests/test_fuzz.py \
  tests/test_thread_safety.py "$@"
echo "== no sanitizer reports"
