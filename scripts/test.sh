#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the test suite. This is the command .ci/run calls.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$PY" -m pytest tests -q "$@"
# The benchmark suite must keep running: a quick pass without timing.
"$PY" -m pytest benchmarks -q -m "not slow" --benchmark-disable
