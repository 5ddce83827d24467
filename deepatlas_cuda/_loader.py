"""Loads the native libraries: the prebuilt ones next to this file when they match the installed torch, otherwise
a just-in-time build with ninja into a cache keyed by torch version, CUDA version, C++ ABI and a hash of the
sources and flags."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from . import _build

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_FILE = "_build_config.json"
REBUILD_HINT = ("reinstall with CUDA: `DEEPATLAS_CUDA=1 pip install --no-build-isolation .` on a machine with nvcc "
                "and a CUDA build of torch (CUDA_HOME set to the toolkit root)")


@dataclasses.dataclass
class LoadState:
    loaded_from: str  # "prebuilt" or "jit"
    cuda_loaded: bool
    config: dict
    libraries: list[str]


def _prebuilt(stem: str) -> Path | None:
    found = sorted(p for p in PACKAGE_DIR.glob(f"{stem}.*.so") if p.name.split(".")[0] == stem)
    return found[0] if found else None


def _load_prebuilt() -> LoadState | None:
    cpu_lib = _prebuilt("_C")
    config_path = PACKAGE_DIR / CONFIG_FILE
    if cpu_lib is None or not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    if config.get("torch_version") != torch.__version__:
        warnings.warn(f"deepatlas_cuda was built for torch {config.get('torch_version')}, but torch "
                      f"{torch.__version__} is installed; rebuilding just in time", stacklevel=3)
        return None
    csrc = PACKAGE_DIR.parent / "csrc"  # present in a source checkout / editable install
    # A config without sources_hash comes from a build older than that check: its sources are unknown, so stale.
    if csrc.is_dir() and config.get("sources_hash") != _build.sources_hash(csrc):
        warnings.warn(f"deepatlas_cuda: the sources in {csrc} changed since the prebuilt library was built (or it "
                      "does not record them); rebuilding just in time (`pip install --no-build-isolation -e .` "
                      "updates the prebuilt one)", stacklevel=3)
        return None
    torch.ops.load_library(str(cpu_lib))
    libraries = [str(cpu_lib)]
    cuda_lib = _prebuilt("_C_cuda")
    if config.get("with_cuda") and cuda_lib is not None:
        torch.ops.load_library(str(cuda_lib))
        libraries.append(str(cuda_lib))
    return LoadState("prebuilt", len(libraries) == 2, config, libraries)


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepatlas_cuda"
    return Path(os.environ.get("DEEPATLAS_CACHE_DIR", default))


def cache_key(params: _build.BuildParams) -> str:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cuda = params.cuda_version.replace(".", "") if params.with_cuda else "cpu"
    return f"torch{torch.__version__.replace('+', '_')}-cu{cuda}-abi{abi}-{params.source_hash()}"


@contextlib.contextmanager
def _build_lock(directory: Path):
    """An flock held for the whole build. The kernel drops it when a process dies, so it is never stale; torch's
    own `lock` file left behind by a killed build is removed once we hold ours."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".deepatlas-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for torch_lock in directory.rglob("lock"):
                torch_lock.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jit_one(name: str, sources: list[str], params: _build.BuildParams, directory: Path, cuda: bool) -> str:
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    if library.exists():
        torch.ops.load_library(str(library))
        return str(library)
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=params.cxx_flags,
            extra_cuda_cflags=params.nvcc_flags if cuda else None,
            extra_ldflags=params.ld_flags,
            extra_include_paths=params.include_dirs,
            build_directory=str(directory),
            with_cuda=cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # the compiler's output is in the message: keep it on disk and point at it
        log = directory / "build.log"
        log.write_text(str(error))
        raise ImportError(
            f"deepatlas_cuda: building the {'CUDA' if cuda else 'CPU'} library failed; the compiler output is in "
            f"{log}. " + ("Set DEEPATLAS_CUDA=0 to build the CPU library alone." if cuda else
                          "A C++17 compiler (g++) and ninja (`pip install ninja`) are required.")) from error
    return str(library)


def _load_jit() -> LoadState:
    params = _build.build_params()
    if not Path(params.csrc, _build.CPU_SOURCES[0]).exists():
        raise ImportError(f"deepatlas_cuda: no usable prebuilt library in {PACKAGE_DIR} and no sources in "
                          f"{params.csrc} to build one; reinstall with `pip install --no-build-isolation .`")
    _build.configure_torch_env(params)
    directory = cache_root() / cache_key(params)
    with _build_lock(directory):
        expected = [directory / "cpu" / "deepatlas_cuda_C.so"]
        if params.with_cuda:
            expected.append(directory / "cuda" / "deepatlas_cuda_C_cuda.so")
        if not all(path.exists() for path in expected):
            what = "CPU + CUDA" if params.with_cuda else "CPU"
            print(f"deepatlas_cuda: building the {what} kernels just in time into {directory} (once)",
                  file=sys.stderr, flush=True)
        libraries = [_jit_one("deepatlas_cuda_C", params.cpu_sources, params, directory / "cpu", cuda=False)]
        if params.with_cuda:
            libraries.append(_jit_one("deepatlas_cuda_C_cuda", params.cuda_sources, params, directory / "cuda",
                                      cuda=True))
    return LoadState("jit", params.with_cuda, params.config(), libraries)


def load() -> LoadState:
    if os.environ.get("DEEPATLAS_FORCE_JIT") != "1":
        state = _load_prebuilt()
        if state is not None:
            return state
    return _load_jit()


STATE = load()
