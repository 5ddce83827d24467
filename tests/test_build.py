"""The build machinery: build parameters, CUDA toolkit discovery, arch clamping, cache keys, locks, build_info."""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import deepatlas_cuda
from deepatlas_cuda import _build, _loader, ops


def test_build_info_reports_the_build():
    info = deepatlas_cuda.build_info()
    assert info["version"] == deepatlas_cuda.__version__
    assert info["torch_version"] == torch.__version__
    assert info["cpu_kernels"] is True
    assert isinstance(info["cuda_kernels"], bool)
    assert info["loaded_from"] in ("prebuilt", "jit")
    assert info["openmp_threads"] == torch.get_num_threads()
    assert isinstance(info["native"], bool)
    assert info["cpu_loops"] in ("avx2", "baseline")
    if info["native"]:
        assert info["cpu_loops"] == "baseline"  # the build's own -march=native: no second copy
    assert all(Path(p).exists() for p in info["libraries"])
    if info["cuda_kernels"]:
        assert info["cuda_version"] and info["cuda_arch_list"]


def test_arch_list_defaults_to_volta_through_hopper_clamped_to_nvcc(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "nvcc_archs", lambda home: ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"])
    assert _build.resolve_arch_list("/cuda") == ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0+PTX"]
    monkeypatch.setattr(_build, "nvcc_archs", lambda home: ["6.0", "7.0", "7.5", "8.0"])
    assert _build.resolve_arch_list("/cuda") == ["7.0", "7.5", "8.0+PTX"]


def test_arch_list_from_environment(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert _build.resolve_arch_list("/cuda") == ["8.0", "9.0+PTX"]


def test_cuda_switch(monkeypatch):
    monkeypatch.setenv("DEEPATLAS_CUDA", "0")
    assert _build.decide_cuda("/cuda") == (False, "DEEPATLAS_CUDA=0")
    monkeypatch.setenv("DEEPATLAS_CUDA", "1")
    with pytest.raises(RuntimeError, match="no CUDA toolkit"):
        _build.decide_cuda(None)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        _build.decide_cuda("/cuda")
    monkeypatch.delenv("DEEPATLAS_CUDA")
    with_cuda, reason = _build.decide_cuda("/cuda")
    assert not with_cuda and "CPU-only build" in reason


def _fake_toolkit(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ _HERE_={root}/bin' >&2\necho 'Cuda compilation tools, release 13.0'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)


def test_cuda_home_found_through_a_wrapper_script(tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper in /usr/local/bin: torch would guess /usr/local; we ask nvcc itself."""
    root = tmp_path / "cuda-13.0"
    _fake_toolkit(root)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrappers}{os.pathsep}{os.environ['PATH']}")
    assert _build.find_cuda_home() == str(root)
    assert _build.nvcc_version(str(root)) == "13.0"


def test_cuda_home_from_environment(tmp_path, monkeypatch):
    _fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    assert _build.find_cuda_home() == str(tmp_path / "toolkit")


def test_max_jobs_bounded_by_cores():
    assert 1 <= _build.default_max_jobs() <= (os.cpu_count() or 1)


def test_cache_key_tracks_torch_abi_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPATLAS_CUDA", "0")
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "ops.cpp").write_text("// one\n")
    params = _build.build_params(csrc)
    key = _loader.cache_key(params)
    assert torch.__version__.replace("+", "_") in key
    assert f"abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}" in key and "-cucpu-" in key
    (csrc / "ops.cpp").write_text("// two\n")
    assert _loader.cache_key(_build.build_params(csrc)) != key
    monkeypatch.setenv("DEEPATLAS_DEBUG", "1")
    assert _loader.cache_key(_build.build_params(csrc)) != key


def test_native_build_targets_this_cpu_without_contracting_to_fma(tmp_path, monkeypatch):
    """DEEPATLAS_NATIVE=1 must not change a result: -march=native alone would let g++ fuse a * b + c."""
    (tmp_path / "ops.cpp").write_text("// one\n")
    monkeypatch.setenv("DEEPATLAS_CUDA", "0")
    default = _build.build_params(tmp_path)
    monkeypatch.setenv("DEEPATLAS_NATIVE", "1")
    native = _build.build_params(tmp_path)
    assert set(native.cxx_flags) - set(default.cxx_flags) == {"-march=native", "-ffp-contract=off"}
    assert set(default.cxx_flags) <= set(native.cxx_flags)
    assert _loader.cache_key(native) != _loader.cache_key(default)
    assert native.config()["native"] is True and default.config()["native"] is False


def test_cpu_avx2_switch_leaves_the_copies_out(tmp_path, monkeypatch):
    """DEEPATLAS_CPU_AVX2=0 builds without the AVX2 copies of the CPU loops (csrc/cpu/isa.h): another library."""
    (tmp_path / "ops.cpp").write_text("// one\n")
    monkeypatch.setenv("DEEPATLAS_CUDA", "0")
    monkeypatch.delenv("DEEPATLAS_CPU_AVX2", raising=False)
    default = _build.build_params(tmp_path)
    monkeypatch.setenv("DEEPATLAS_CPU_AVX2", "0")
    without = _build.build_params(tmp_path)
    assert set(without.cxx_flags) - set(default.cxx_flags) == {"-DDEEPATLAS_NO_AVX2_COPIES"}
    assert _loader.cache_key(without) != _loader.cache_key(default)


def test_release_host_code_drops_the_debug_information_python_cflags_ask_for(tmp_path, monkeypatch):
    """setup.py compiles with Python's CFLAGS, which hold -g; a release build cancels it, a debug build keeps it."""
    (tmp_path / "ops.cpp").write_text("// one\n")
    monkeypatch.setenv("DEEPATLAS_CUDA", "0")
    assert "-g0" in _build.build_params(tmp_path).cxx_flags
    monkeypatch.setenv("DEEPATLAS_DEBUG", "1")
    debug_flags = _build.build_params(tmp_path).cxx_flags
    assert "-g" in debug_flags and "-g0" not in debug_flags


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_loaded_release_library_has_no_debug_sections():
    info = deepatlas_cuda.build_info()
    if info["debug"] or info["loaded_from"] != "prebuilt":
        pytest.skip("a debug or just-in-time build")
    for library in info["libraries"]:
        sections = subprocess.run(["readelf", "-S", "-W", library], capture_output=True, text=True, check=True).stdout
        assert ".debug_info" not in sections, library


def _fake_checkout(tmp_path, monkeypatch):
    """A source checkout with a CPU-only prebuilt "library" recorded as built from its sources: (package, csrc)."""
    monkeypatch.setenv("DEEPATLAS_CUDA", "0")
    csrc, package = tmp_path / "csrc", tmp_path / "deepatlas_cuda"
    csrc.mkdir()
    package.mkdir()
    (csrc / "ops.cpp").write_text("// one\n")
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_text("")
    (package / "_build_config.json").write_text(json.dumps(_build.build_params(csrc).config()))
    return package, csrc


def test_setup_env_skips_the_rebuild_only_when_sources_flags_and_torch_are_unchanged(tmp_path, monkeypatch):
    package, csrc = _fake_checkout(tmp_path, monkeypatch)
    assert _build.installed_build_is_current(package) == (True, "sources, flags and torch unchanged")
    monkeypatch.setenv("DEEPATLAS_DEBUG", "1")
    assert _build.installed_build_is_current(package) == (False, "sources or build flags changed")
    monkeypatch.delenv("DEEPATLAS_DEBUG")
    (csrc / "ops.cpp").write_text("// two\n")
    assert _build.installed_build_is_current(package) == (False, "sources or build flags changed")
    config = json.loads((package / "_build_config.json").read_text())
    (package / "_build_config.json").write_text(json.dumps({**config, "torch_version": "0.0.1"}))
    assert _build.installed_build_is_current(package)[1].startswith("built for torch 0.0.1")
    monkeypatch.setenv("DEEPATLAS_CUDA", "1")
    monkeypatch.setattr(_build, "find_cuda_home", lambda: "/opt/cuda")
    monkeypatch.setattr(_build, "decide_cuda", lambda home: (True, "forced"))
    monkeypatch.setattr(_build, "resolve_arch_list", lambda home: ["9.0"])
    monkeypatch.setattr(_build, "nvcc_version", lambda home: "13.0")
    assert _build.installed_build_is_current(package) == (False, "missing _C_cuda")


def test_prebuilt_library_from_edited_sources_is_not_loaded(tmp_path, monkeypatch):
    package, csrc = _fake_checkout(tmp_path, monkeypatch)
    loaded = []
    monkeypatch.setattr(_loader, "PACKAGE_DIR", package)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    assert _loader._load_prebuilt().loaded_from == "prebuilt" and len(loaded) == 1
    (csrc / "ops.cpp").write_text("// edited after the build\n")
    with pytest.warns(UserWarning, match="sources in .*csrc changed since the prebuilt library was built"):
        assert _loader._load_prebuilt() is None
    assert len(loaded) == 1
    # A library built before builds recorded their sources (as a checkout from before that change has).
    config = _build.build_params(csrc).config()
    del config["sources_hash"]
    (package / "_build_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="or it does not record them"):
        assert _loader._load_prebuilt() is None
    assert len(loaded) == 1


def test_build_lock_removes_a_stale_torch_lock(tmp_path):
    (tmp_path / "cpu").mkdir()
    stale = tmp_path / "cpu" / "lock"  # left behind by a killed torch.utils.cpp_extension build
    stale.write_text("")
    with _loader._build_lock(tmp_path):
        assert not stale.exists()


def test_cuda_tensor_on_a_cpu_only_build_says_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(ops.STATE, "cuda_loaded", False)
    with FakeTensorMode():
        image = torch.empty(1, 1, 4, 4, 4, device="cuda")
        ddf = torch.empty(1, 3, 4, 4, 4, device="cuda")
        with pytest.raises(RuntimeError, match="no CUDA kernels.*DEEPATLAS_CUDA=1 pip install --no-build-isolation"):
            deepatlas_cuda.warp(image, ddf)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_gpu_check_script_says_no_gpu_and_exits_2(tmp_path):
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), "build"], env={**os.environ, "PY": sys.executable,
                                                                "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "sees no CUDA GPU" in done.stderr


@pytest.mark.skipif(any(Path(d, "nvcc").exists() for d in ("/usr/bin", "/bin")), reason="needs nvcc off /usr/bin:/bin")
def test_gpu_check_script_names_a_missing_tool_and_exits_3(tmp_path):
    """On a GPU machine (faked: torch.cuda.is_available patched to True) without nvcc on PATH, the script stops
    before any stage and names the missing compiler."""
    import subprocess
    import sys
    (tmp_path / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("CUDA_HOME", None)
    done = subprocess.run(["bash", str(script), "build"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "missing: nvcc" in done.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()  # no stage ran
