#!/usr/bin/env bash
# Sets everything up (scripts/setup_env.sh) and runs the DeepAtlas demo: the independent baselines and the joint
# model, one-shot, on embedded synthetic data; prints the comparison and writes outputs and figures.
# Extra arguments go to `deepatlas demo` (e.g. --quick, --long, --data mni, --output DIR, --json).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
"$VENV/bin/deepatlas" demo "$@"
