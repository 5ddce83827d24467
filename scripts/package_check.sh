#!/usr/bin/env bash
# What a user of a release gets: builds the source distribution, then a CPU-only wheel from that archive alone
# (DEEPATLAS_CUDA=0: the CUDA library must not be built), installs the wheel into a scratch folder and runs an op
# from there, away from this checkout. A header missing from the archive fails the wheel's compile.
#   PY   the Python of scripts/setup_env.sh's environment (default: .venv/bin/python in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$ROOT"

echo "== source distribution"
# From a copy of the files git knows (tracked, or new and not ignored): setuptools would otherwise also pack what
# an earlier build's *.egg-info/SOURCES.txt in this checkout lists, hiding a file that MANIFEST.in misses.
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
  [ -e "$file" ] && printf '%s\0' "$file"
done | xargs -0 cp --parents -t "$work/src"
(cd "$work/src" && "$PY" -m build --sdist --no-isolation --outdir "$work/dist" . >"$work/sdist.log" 2>&1) \
  || { cat "$work/sdist.log" >&2; exit 1; }
sdist="$(ls "$work"/dist/*.tar.gz)"
echo "$sdist: $(tar tzf "$sdist" | wc -l) entries"

echo "== CPU-only wheel from the source distribution alone"
DEEPATLAS_CUDA=0 "$PY" -m pip wheel -q --no-build-isolation --no-deps --wheel-dir "$work/wheel" "$sdist" \
  >"$work/wheel.log" 2>&1 || { tail -n 40 "$work/wheel.log" >&2; echo "no wheel from $sdist (log above)" >&2; exit 1; }
wheel="$(ls "$work"/wheel/*.whl)"
members="$("$PY" -c "import sys, zipfile; print(*zipfile.ZipFile(sys.argv[1]).namelist(), sep='\n')" "$wheel")"
grep -q '^deepatlas_cuda/_C\..*\.so$' <<<"$members" || { echo "no CPU library in $wheel" >&2; exit 1; }
if grep -q '_C_cuda' <<<"$members"; then echo "DEEPATLAS_CUDA=0 still built CUDA" >&2; exit 1; fi

echo "== the installed wheel runs, away from the checkout"
"$PY" -m pip install -q --no-deps --no-index --target "$work/site" "$wheel" >"$work/install.log" 2>&1 \
  || { cat "$work/install.log" >&2; exit 1; }
cd "$work"
PYTHONPATH="$work/site" "$PY" - "$work/site" <<'PYEOF'
import sys
from pathlib import Path

import torch

import deepatlas_cuda as da
from deepatlas_cuda import reference

site = Path(sys.argv[1])
assert Path(da.__file__).is_relative_to(site), f"imported {da.__file__}, not the wheel's copy in {site}"
info = da.build_info()
assert info["loaded_from"] == "prebuilt" and info["cpu_kernels"] and not info["cuda_kernels"], info
assert all(Path(p).is_relative_to(site) for p in info["libraries"]), info["libraries"]
image, ddf = torch.randn(1, 2, 8, 9, 10), torch.randn(1, 3, 8, 9, 10)
torch.testing.assert_close(da.warp(image, ddf), reference.warp(image, ddf))
print("wheel OK:", *info["libraries"])
PYEOF

echo "== the installed wheel, built for another torch: a clear error (a wheel holds no sources to rebuild from)"
config="$work/site/deepatlas_cuda/_build_config.json"
"$PY" - "$config" <<'PYEOF'
import json, sys
config = json.load(open(sys.argv[1]))
config["torch_version"] = "0.0"
json.dump(config, open(sys.argv[1], "w"))
PYEOF
if message="$(PYTHONPATH="$work/site" "$PY" -W ignore -c "import deepatlas_cuda" 2>&1)"; then
  echo "a wheel built for another torch imported without complaint" >&2; exit 1
fi
grep -q "reinstall with" <<<"$message" || { echo "unexpected error: $message" >&2; exit 1; }
echo "error as expected: $(tail -n 1 <<<"$message")"
