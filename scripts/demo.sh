#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the ops demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
"$PY" "$ROOT/examples/warp_demo.py"
